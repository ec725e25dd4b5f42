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

use std::io::{IoSlice, IoSliceMut, Read, Seek, SeekFrom, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use anyhow::{Context, bail};
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType, recvmsg, sendmsg,
    sendmsg_addr, socket_with,
};

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
        let fd = rustix::fs::memfd_create(c"optbin-fuse-state", rustix::fs::MemfdFlags::CLOEXEC)
            .map_err(std::io::Error::from)
            .context("memfd_create")?;
        let mut file = std::fs::File::from(fd);
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

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
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
        let _ = rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC);
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
    let sent = notify(&format!("FDSTORE=1\nFDNAME={FUSE_NAME}\n"), &[connection.as_fd()])
        .and_then(|()| notify(&format!("FDSTORE=1\nFDNAME={STATE_NAME}\n"), &[state.as_fd()]));
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
pub fn notify(message: &str, fds: &[BorrowedFd<'_>]) -> anyhow::Result<()> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { bail!("no NOTIFY_SOCKET") };
    let addr = unix_addr(path.as_encoded_bytes())?;
    let sock = socket_with(AddressFamily::UNIX, SocketType::DGRAM, SocketFlags::CLOEXEC, None)
        .map_err(std::io::Error::from)
        .context("socket")?;
    send_with_fds(sock.as_fd(), Some(&addr), message.as_bytes(), fds)
        .context("sending to NOTIFY_SOCKET")
}

/// A Unix socket address for a path, or an abstract name written `@name`.
pub fn unix_addr(path: &[u8]) -> anyhow::Result<SocketAddrUnix> {
    // sun_path's size, as before: a path must leave room for its NUL.
    const SUN_PATH: usize = 108;
    if path.is_empty() || path.len() >= SUN_PATH {
        bail!("bad socket address ({} bytes)", path.len());
    }
    let addr = match path.strip_prefix(b"@") {
        Some(name) => SocketAddrUnix::new_abstract_name(name),
        None => SocketAddrUnix::new(std::ffi::OsStr::from_bytes(path)),
    };
    addr.map_err(std::io::Error::from).context("bad socket address")
}

/// sendmsg(2) of `data` with `fds` as SCM_RIGHTS.
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    addr: Option<&SocketAddrUnix>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> anyhow::Result<()> {
    let iov = [IoSlice::new(data)];
    let space = if fds.is_empty() { 0 } else { rustix::cmsg_space!(ScmRights(fds.len())) };
    let mut space = vec![MaybeUninit::uninit(); space];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        bail!("no room for {} descriptors", fds.len());
    }
    let sent = match addr {
        Some(addr) => sendmsg_addr(sock, addr, &iov, &mut control, SendFlags::NOSIGNAL),
        None => sendmsg(sock, &iov, &mut control, SendFlags::NOSIGNAL),
    };
    sent.map_err(std::io::Error::from)?;
    Ok(())
}

/// recvmsg(2) of one datagram, the descriptors that came with it and, on a socket with
/// SO_PASSCRED, the sender's uid.
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> std::io::Result<(usize, Vec<OwnedFd>, Option<libc::uid_t>)> {
    // Room for a few descriptors and the sender's credentials.
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(16), ScmCredentials(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received =
        recvmsg(sock, &mut [IoSliceMut::new(buf)], &mut control, RecvFlags::CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    let mut uid = None;
    for message in control.drain() {
        match message {
            RecvAncillaryMessage::ScmRights(received_fds) => fds.extend(received_fds),
            RecvAncillaryMessage::ScmCredentials(cred) => uid = Some(cred.uid.as_raw()),
            _ => {}
        }
    }
    Ok((received.bytes, fds, uid))
}
