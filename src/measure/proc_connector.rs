//! The netlink process connector: a socket on which the kernel announces every fork, exec
//! and exit on the machine, decoded here by hand (the `proc-connector` crate misreads exits).
//!
//! Layout (include/uapi/linux/cn_proc.h, connector.h): each datagram holds netlink messages
//! `nlmsghdr (16 B) | cn_msg (20 B) | proc_event`, and a `proc_event` is
//! `what u32 | cpu u32 | timestamp_ns u64 | event_data`. In the exit event `exit_code` is a
//! wait(2)-style status (`WIFEXITED`/`WTERMSIG` decode it) and `exit_signal` is the signal
//! sent to the parent (SIGCHLD), NOT the signal that killed the process; it is ignored.
//! Needs CAP_NET_ADMIN (the daemon runs as root). On Linux >= 6.6 the listener asks for
//! exec and exit events only: every fork and clone on the machine would otherwise wake the
//! reader thread for nothing (a third of its cost per exec measured on this machine).
//! [`ProcEvent::Fork`] then never arrives; the pid-reuse it detects is caught by the sweep.

use rustix::io::Errno;
use rustix::net::{self, netlink, sockopt};
use std::io;
use std::os::fd::OwnedFd;
use std::time::Duration;

use super::RunExit;

const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
const PROC_CN_MCAST_LISTEN: u32 = 1;
const NLMSG_HDRLEN: usize = 16;
const CN_MSG_LEN: usize = 20;
const NLMSG_DONE: u16 = 3;
const NLMSG_ERROR: u16 = 2;
const NLMSG_NOOP: u16 = 1;

const PROC_EVENT_FORK: u32 = 0x0000_0001;
const PROC_EVENT_EXEC: u32 = 0x0000_0002;
const PROC_EVENT_EXIT: u32 = 0x8000_0000;

/// The process events the measurer cares about. `pid` is the kernel's task id (a thread id),
/// `tgid` the process id; they are equal for a process's main thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcEvent {
    /// A new task was created; if that happened after a measurement of `child_pid` was
    /// registered, the measured process died unseen and the pid was reused.
    Fork { child_pid: i32, child_tgid: i32, ts_ns: u64 },
    /// `tgid` finished an execve. Every `ts_ns` is the kernel's CLOCK_MONOTONIC.
    Exec { pid: i32, tgid: i32, ts_ns: u64 },
    /// A task exited with a wait(2)-style `status`.
    Exit { pid: i32, tgid: i32, status: u32, ts_ns: u64 },
}

/// Decodes a wait(2)-style status into how the process ended.
pub fn decode_wait_status(status: u32) -> RunExit {
    let sig = status & 0x7f;
    if sig == 0 {
        RunExit::Exited(((status >> 8) & 0xff) as i32)
    } else {
        RunExit::Signaled(sig as i32)
    }
}

/// A subscribed proc-connector socket.
#[derive(Debug)]
pub struct ProcConnector {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl ProcConnector {
    /// Opens, binds and subscribes; `poll_timeout` bounds how long [`Self::recv`] blocks, so
    /// the reading thread can notice a shutdown.
    pub fn open(poll_timeout: Duration) -> io::Result<Self> {
        let fd = net::socket_with(
            net::AddressFamily::NETLINK,
            net::SocketType::DGRAM,
            net::SocketFlags::CLOEXEC,
            Some(netlink::CONNECTOR),
        )?;
        // A big receive buffer: every fork/exec/exit on the machine lands here, and a full
        // buffer drops events (ENOBUFS). FORCE works as root; the plain one is the fallback.
        let want = 8 << 20;
        if sockopt::set_socket_recv_buffer_size_force(&fd, want).is_err() {
            let _ = sockopt::set_socket_recv_buffer_size(&fd, want);
        }
        // A zero timeout meant "block forever" to the kernel; rustix spells that None (it
        // refuses a zero duration).
        let timeout = Some(poll_timeout).filter(|t| !t.is_zero());
        sockopt::set_socket_timeout(&fd, sockopt::Timeout::Recv, timeout)?;
        // Port 0: the kernel picks a unique one, so several listeners may coexist.
        net::bind(&fd, &netlink::SocketAddrNetlink::new(0, CN_IDX_PROC))?;
        let msg = listen_message(kernel_filters_events());
        net::send(&fd, &msg, net::SendFlags::empty())?;
        Ok(Self { fd, buf: vec![0u8; 64 * 1024] })
    }

    /// Waits (up to the poll timeout) for one datagram and appends its events to `out`.
    /// A timeout returns Ok with nothing appended; ENOBUFS (events were dropped by the
    /// kernel) is returned as an error of kind `OutOfMemory` so the caller can note the loss.
    pub fn recv(&mut self, out: &mut Vec<ProcEvent>) -> io::Result<()> {
        let n = match net::recv(&self.fd, &mut self.buf[..], net::RecvFlags::empty()) {
            Ok((n, _)) => n,
            Err(Errno::AGAIN | Errno::INTR) => return Ok(()),
            Err(Errno::NOBUFS) => {
                return Err(io::Error::new(
                    io::ErrorKind::OutOfMemory,
                    io::Error::from(Errno::NOBUFS),
                ));
            }
            Err(e) => return Err(e.into()),
        };
        parse_datagram(&self.buf[..n], out);
        Ok(())
    }
}

/// Whether the kernel filters proc connector events per listener (Linux >= 6.6: a
/// `proc_input { mcast_op, event_type }` listen message). Older kernels ignore a listen
/// message of that size altogether, so it is only sent where it is understood.
fn kernel_filters_events() -> bool {
    let uname = rustix::system::uname();
    release_at_least(&uname.release().to_string_lossy(), (6, 6))
}

/// Whether a kernel release string (`6.18.3-amd64`) is at least `major.minor`.
fn release_at_least(release: &str, (major, minor): (u32, u32)) -> bool {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let num = |p: Option<&str>| p.and_then(|x| x.parse::<u32>().ok());
    match (num(parts.next()), num(parts.next())) {
        (Some(a), Some(b)) => (a, b) >= (major, minor),
        _ => false,
    }
}

/// `nlmsghdr | cn_msg{id: proc} | PROC_CN_MCAST_LISTEN`, with `filtered`, followed by the
/// event types wanted (exec and exit: the only ones the measurer acts on without a sweep;
/// forks, the most frequent events, then never wake the reader), else without a filter
/// (every event; every kernel with the connector understands that).
fn listen_message(filtered: bool) -> Vec<u8> {
    let data_len: u16 = if filtered { 8 } else { 4 };
    let total = NLMSG_HDRLEN + CN_MSG_LEN + data_len as usize;
    let mut m = Vec::with_capacity(total);
    m.extend_from_slice(&(total as u32).to_ne_bytes());
    m.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
    m.extend_from_slice(&0u16.to_ne_bytes()); // flags
    m.extend_from_slice(&0u32.to_ne_bytes()); // seq
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
    m.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
    m.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes()); // seq
    m.extend_from_slice(&0u32.to_ne_bytes()); // ack
    m.extend_from_slice(&data_len.to_ne_bytes()); // len of data
    m.extend_from_slice(&0u16.to_ne_bytes()); // flags
    m.extend_from_slice(&PROC_CN_MCAST_LISTEN.to_ne_bytes());
    if filtered {
        m.extend_from_slice(&(PROC_EVENT_EXEC | PROC_EVENT_EXIT).to_ne_bytes());
    }
    m
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Parses every netlink message of one datagram; malformed or foreign messages are skipped.
pub fn parse_datagram(data: &[u8], out: &mut Vec<ProcEvent>) {
    let mut off = 0usize;
    while off + NLMSG_HDRLEN <= data.len() {
        let Some(len) = u32_at(data, off).map(|l| l as usize) else { break };
        let Some(kind) = u16_at(data, off + 4) else { break };
        if len < NLMSG_HDRLEN || off + len > data.len() {
            break;
        }
        if kind != NLMSG_ERROR
            && kind != NLMSG_NOOP
            && let Some(ev) = parse_cn_msg(&data[off + NLMSG_HDRLEN..off + len])
        {
            out.push(ev);
        }
        off += (len + 3) & !3; // NLMSG_ALIGN
    }
}

fn parse_cn_msg(m: &[u8]) -> Option<ProcEvent> {
    if u32_at(m, 0)? != CN_IDX_PROC || u32_at(m, 4)? != CN_VAL_PROC {
        return None;
    }
    let data_len = u16_at(m, 16)? as usize;
    let ev = m.get(CN_MSG_LEN..CN_MSG_LEN + data_len)?;
    let what = u32_at(ev, 0)?;
    let ts_ns = u64_at(ev, 8)?;
    let d = 16;
    let i = |k: usize| u32_at(ev, d + 4 * k).map(|v| v as i32);
    match what {
        PROC_EVENT_FORK => Some(ProcEvent::Fork { child_pid: i(2)?, child_tgid: i(3)?, ts_ns }),
        PROC_EVENT_EXEC => Some(ProcEvent::Exec { pid: i(0)?, tgid: i(1)?, ts_ns }),
        PROC_EVENT_EXIT => {
            Some(ProcEvent::Exit { pid: i(0)?, tgid: i(1)?, status: u32_at(ev, d + 8)?, ts_ns })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(what: u32, ts: u64, fields: &[u32]) -> Vec<u8> {
        let mut ev = Vec::new();
        ev.extend_from_slice(&what.to_ne_bytes());
        ev.extend_from_slice(&1u32.to_ne_bytes());
        ev.extend_from_slice(&ts.to_ne_bytes());
        for f in fields {
            ev.extend_from_slice(&f.to_ne_bytes());
        }
        let total = NLMSG_HDRLEN + CN_MSG_LEN + ev.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(total as u32).to_ne_bytes());
        m.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        m.extend_from_slice(&[0u8; 10]);
        m.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
        m.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
        m.extend_from_slice(&[0u8; 8]);
        m.extend_from_slice(&(ev.len() as u16).to_ne_bytes());
        m.extend_from_slice(&[0u8; 2]);
        m.extend_from_slice(&ev);
        while m.len() % 4 != 0 {
            m.push(0);
        }
        m
    }

    #[test]
    fn decodes_exit_status_not_exit_signal() {
        // SIGSEGV with core dump: status 0x8b; exit_signal field is SIGCHLD (17).
        let mut d = message(PROC_EVENT_EXIT, 99, &[42, 42, 0x8b, 17, 1, 1]);
        d.extend(message(PROC_EVENT_EXEC, 7, &[5, 5]));
        d.extend(message(PROC_EVENT_FORK, 8, &[1, 1, 6, 6]));
        let mut out = Vec::new();
        parse_datagram(&d, &mut out);
        assert_eq!(
            out,
            vec![
                ProcEvent::Exit { pid: 42, tgid: 42, status: 0x8b, ts_ns: 99 },
                ProcEvent::Exec { pid: 5, tgid: 5, ts_ns: 7 },
                ProcEvent::Fork { child_pid: 6, child_tgid: 6, ts_ns: 8 },
            ]
        );
        assert_eq!(decode_wait_status(0x8b), RunExit::Signaled(11));
        assert_eq!(decode_wait_status(3 << 8), RunExit::Exited(3));
        assert_eq!(decode_wait_status(0), RunExit::Exited(0));
    }

    #[test]
    fn truncated_input_is_skipped_not_panicking() {
        let d = message(PROC_EVENT_EXIT, 99, &[42, 42, 0x8b, 17, 1, 1]);
        for cut in 0..d.len() {
            let mut out = Vec::new();
            parse_datagram(&d[..cut], &mut out);
            assert!(out.is_empty());
        }
    }

    #[test]
    fn the_event_filter_is_asked_for_only_where_the_kernel_has_it() {
        assert!(release_at_least("6.18.3-amd64", (6, 6)));
        assert!(release_at_least("6.6.0", (6, 6)));
        assert!(!release_at_least("6.1.0-28-amd64", (6, 6)));
        assert!(!release_at_least("5.19.0", (6, 6)));
        assert!(!release_at_least("garbage", (6, 6)));
        let plain = listen_message(false);
        let filtered = listen_message(true);
        assert_eq!(plain.len(), NLMSG_HDRLEN + CN_MSG_LEN + 4);
        assert_eq!(filtered.len(), NLMSG_HDRLEN + CN_MSG_LEN + 8);
        assert_eq!(u32_at(&filtered, 0), Some(filtered.len() as u32));
        assert_eq!(u32_at(&filtered, filtered.len() - 4), Some(PROC_EVENT_EXEC | PROC_EVENT_EXIT));
    }
}
