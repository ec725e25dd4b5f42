//! Keeping the FUSE connection alive when the whole service dies.
//!
//! The supervisor's descriptor keeps the connection while a server restarts; but if the
//! supervisor dies too (OOM kill, `systemctl kill`, a bug), the last descriptor closes, the
//! mount answers ENOTCONN, and glibc's `execvp` stops there: every command fails. So the
//! supervisor hands a copy of the descriptor to a keeper that outlives it, over systemd's
//! file descriptor store protocol (sd_notify(3) `FDSTORE=1`; sd_listen_fds(3)):
//!
//! - under systemd the keeper is systemd itself (`FileDescriptorStoreMax=` in the unit);
//! - outside systemd it is optbin's holder ([`crate::fuse::holder`]), which speaks the same
//!   protocol and restarts the daemon like `Restart=on-failure`.
//!
//! A restarted supervisor finds the descriptors in `LISTEN_FDS` and adopts the live
//! connection instead of mounting: requests made meanwhile waited in the kernel, and the
//! new server asks the kernel to resend those the dead one had read.
//!
//! Two descriptors are stored: the `/dev/fuse` connection ([`FUSE_NAME`]) and a memfd
//! ([`STATE_NAME`]) holding the next server generation (8 bytes) and the kernel's INIT
//! request, which a new session needs (see [`crate::fuse::connection`]).

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use anyhow::{Context, bail};

use crate::fuse::connection::Connection;

pub const FUSE_NAME: &str = "optbin-fuse";
pub const STATE_NAME: &str = "optbin-fuse-state";

/// The connection's state kept beside it in the store.
#[derive(Debug)]
pub struct StoredState {
    file: std::fs::File,
}

impl StoredState {
    /// A new memfd holding `generation` and the INIT request.
    pub fn create(generation: u64, init: &[u8]) -> anyhow::Result<Self> {
        // SAFETY: a valid C string; flags are plain bits.
        let fd = unsafe { libc::memfd_create(c"optbin-fuse-state".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("memfd_create");
        }
        // SAFETY: a fresh descriptor we own.
        let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.write_all(&generation.to_le_bytes())?;
        file.write_all(init)?;
        Ok(Self { file })
    }

    fn from_fd(fd: OwnedFd) -> Self {
        Self { file: std::fs::File::from(fd) }
    }

    /// Records the generation the next server gets (seen by whoever holds the memfd).
    pub fn set_generation(&self, generation: u64) {
        use std::os::unix::fs::FileExt;
        if let Err(e) = self.file.write_at(&generation.to_le_bytes(), 0) {
            tracing::warn!(error = %e, "recording the server generation");
        }
    }

    fn read(&mut self) -> anyhow::Result<(u64, Vec<u8>)> {
        let mut bytes = Vec::new();
        self.file.seek(SeekFrom::Start(0))?;
        self.file.read_to_end(&mut bytes)?;
        if bytes.len() < 8 {
            bail!("the stored connection state is truncated");
        }
        let generation = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        Ok((generation, bytes[8..].to_vec()))
    }

    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// A connection handed down through `LISTEN_FDS`, with the generation to go on from.
pub struct Adopted {
    pub connection: Connection,
    pub state: StoredState,
    pub generation: u64,
}

/// Takes the connection systemd or the holder handed down, if there is a live one. The
/// `LISTEN_*` variables are removed so that nothing started later sees them.
pub fn take_stored() -> anyhow::Result<Option<Adopted>> {
    let pid = std::env::var("LISTEN_PID").ok();
    let count = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    // SAFETY: single-threaded at this point (the supervisor's documented requirement).
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    let (Some(pid), Some(count)) = (pid, count) else { return Ok(None) };
    if pid.parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(None);
    }
    let count: i32 = count.parse().context("LISTEN_FDS")?;
    let names: Vec<&str> = names.split(':').collect();
    let mut fuse = None;
    let mut state = None;
    for i in 0..count {
        let fd = 3 + i;
        // SAFETY: sd_listen_fds(3): descriptors 3.. are ours; each is taken once.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: setting FD_CLOEXEC on our own descriptor.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        match names.get(i as usize).copied() {
            Some(FUSE_NAME) => fuse = Some(owned),
            Some(STATE_NAME) => state = Some(StoredState::from_fd(owned)),
            other => tracing::warn!(fd, name = ?other, "ignoring an unknown stored descriptor"),
        }
    }
    let (Some(fuse), Some(mut state)) = (fuse, state) else {
        if count > 0 {
            tracing::warn!("the stored descriptors are incomplete; mounting afresh");
        }
        return Ok(None);
    };
    if !crate::fuse::connection::alive(std::os::fd::AsFd::as_fd(&fuse)) {
        tracing::info!("the stored FUSE connection is gone; mounting afresh");
        forget();
        return Ok(None);
    }
    let (generation, init) = state.read()?;
    let connection = Connection::adopt(fuse, init)?;
    Ok(Some(Adopted { connection, state, generation }))
}

/// Whether a keeper listens (systemd's or the holder's notify socket).
pub fn available() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// Hands copies of the connection and its state to the keeper. Returns whether it was sent.
pub fn store(connection: &Connection, state: &StoredState) -> bool {
    use std::os::fd::AsFd;
    let sent =
        notify(&format!("FDSTORE=1\nFDNAME={FUSE_NAME}\n"), &[connection.as_fd().as_raw_fd()])
            .and_then(|()| notify(&format!("FDSTORE=1\nFDNAME={STATE_NAME}\n"), &[state.raw_fd()]));
    match sent {
        Ok(()) => {
            tracing::info!("the FUSE connection is kept in the service manager's descriptor store");
            true
        }
        Err(e) => {
            if available() {
                tracing::warn!(error = format!("{e:#}"), "storing the FUSE connection failed");
            }
            false
        }
    }
}

/// Tells the keeper to drop the stored descriptors (after a clean stop).
pub fn forget() {
    for name in [FUSE_NAME, STATE_NAME] {
        let _ = notify(&format!("FDSTOREREMOVE=1\nFDNAME={name}\n"), &[]);
    }
}

/// Sends one sd_notify datagram with `fds` attached (SCM_RIGHTS).
pub fn notify(message: &str, fds: &[RawFd]) -> anyhow::Result<()> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { bail!("no NOTIFY_SOCKET") };
    let addr = unix_addr(path.as_encoded_bytes())?;
    // SAFETY: plain socket creation.
    let sock = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(std::io::Error::last_os_error()).context("socket");
    }
    // SAFETY: a fresh descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    send_with_fds(sock.as_raw_fd(), Some(&addr), message.as_bytes(), fds)
        .context("sending to NOTIFY_SOCKET")
}

/// A sockaddr_un for a path, or an abstract name written `@name`.
pub fn unix_addr(path: &[u8]) -> anyhow::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain data.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    if path.is_empty() || path.len() >= addr.sun_path.len() {
        bail!("bad socket address ({} bytes)", path.len());
    }
    for (i, b) in path.iter().enumerate() {
        addr.sun_path[i] = *b as libc::c_char;
    }
    if path[0] == b'@' {
        addr.sun_path[0] = 0;
    }
    let base = std::mem::offset_of!(libc::sockaddr_un, sun_path);
    Ok((addr, (base + path.len()) as libc::socklen_t))
}

/// sendmsg(2) of `data` with `fds` as SCM_RIGHTS.
pub fn send_with_fds(
    sock: RawFd,
    addr: Option<&(libc::sockaddr_un, libc::socklen_t)>,
    data: &[u8],
    fds: &[RawFd],
) -> anyhow::Result<()> {
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut _, iov_len: data.len() };
    let fd_bytes = std::mem::size_of_val(fds) as u32;
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = if fds.is_empty() { 0 } else { (unsafe { libc::CMSG_SPACE(fd_bytes) }) as usize };
    let mut control = vec![0u8; space];
    // SAFETY: msghdr is plain data; every pointer set below outlives the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    if let Some((a, len)) = addr {
        msg.msg_name = a as *const _ as *mut _;
        msg.msg_namelen = *len;
    }
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer has room for one header with the descriptors.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast(), fds.len());
        }
    }
    // SAFETY: a valid message.
    if unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) } < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// recvmsg(2) of one datagram, the descriptors that came with it and, on a socket with
/// SO_PASSCRED, the sender's uid.
pub fn recv_with_fds(
    sock: RawFd,
    buf: &mut [u8],
) -> std::io::Result<(usize, Vec<OwnedFd>, Option<libc::uid_t>)> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // Room for a few descriptors.
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = (unsafe {
        libc::CMSG_SPACE((16 * std::mem::size_of::<RawFd>()) as u32)
            + libc::CMSG_SPACE(std::mem::size_of::<libc::ucred>() as u32)
    }) as usize;
    let mut control = vec![0u8; space];
    // SAFETY: msghdr is plain data; its pointers outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: a valid message buffer.
    let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    let mut uid = None;
    // SAFETY: walks the control messages the kernel filled in.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg) as *const RawFd;
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_CREDENTIALS
            {
                let cred: libc::ucred =
                    std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const libc::ucred);
                uid = Some(cred.uid);
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((n as usize, fds, uid))
}
