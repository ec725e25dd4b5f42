//! The FUSE connection the supervisor owns, kept apart from any fuser `Session`.
//!
//! fuser ties the mount to a session: `Session::new` mounts, and the session's guard
//! unmounts when the session (or `Session::run`, which consumes it) ends, whether the loop
//! ended because the mount went or because it failed. A server process whose loop fails
//! must never unmount the mount the supervisor keeps for its successor, and a supervisor
//! that adopts a live connection (from systemd's file descriptor store or the holder,
//! [`crate::fuse::fdstore`]) has no session at all. So optbin mounts by itself:
//!
//! - [`Connection::mount`] opens `/dev/fuse`, mounts it with mount(2) and reads the kernel's
//!   INIT request, which it keeps as bytes;
//! - [`Connection::handshake`] answers that INIT once, through a fuser session (so fuser
//!   negotiates as always), when the mount is new;
//! - [`Connection::session`] makes a fuser session for each server process by replaying the
//!   INIT to fuser over a socket pair, dropping fuser's answer (the kernel has its own), then
//!   putting the live `/dev/fuse` descriptor in the socket's place. The session holds no
//!   mount: neither its end nor its drop can unmount anything. Unmounting is always an
//!   explicit [`crate::fuse::unmount`].

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{Context, bail};
use fuser::{Config, Filesystem, Session, SessionACL};
use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::io::Errno;
use rustix::mount::{MountFlags, UnmountFlags, mount, unmount};
use rustix::net::{AddressFamily, SocketFlags, SocketType, socketpair};

/// A mounted FUSE connection and the INIT request the kernel opened it with.
#[derive(Debug)]
pub struct Connection {
    fuse: OwnedFd,
    init: Vec<u8>,
}

const FUSE_NOTIFY_RESEND: i32 = 7;
/// fuse_in_header: len u32, opcode u32, unique u64, nodeid u64, uid, gid, pid, padding.
const FUSE_IN_HEADER: usize = 40;
const FUSE_INIT: u32 = 26;

impl Connection {
    /// Opens `/dev/fuse`, mounts it at `mountpoint` (an existing directory) with optbin's
    /// options, and reads the kernel's INIT request. Needs root (CAP_SYS_ADMIN).
    pub fn mount(mountpoint: &Path) -> anyhow::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(mountpoint)
            .with_context(|| format!("reading {}", mountpoint.display()))?
            .permissions()
            .mode();
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .context("opening /dev/fuse (is the fuse module loaded?)")?;
        let fuse = OwnedFd::from(dev);
        // With allow_other the kernel must check permissions itself
        // (default_permissions): otherwise one user's access check would be reused for
        // another's.
        let data = format!(
            "fd={},rootmode={:o},user_id={},group_id={},default_permissions,allow_other",
            fuse.as_raw_fd(),
            mode,
            rustix::process::getuid().as_raw(),
            rustix::process::getgid().as_raw(),
        );
        let source = CString::new(crate::fuse::FS_NAME)?;
        let target = CString::new(mountpoint.as_os_str().as_bytes())
            .context("mountpoint contains a NUL byte")?;
        let fstype = CString::new("fuse")?;
        let data = CString::new(data)?;
        let flags = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOATIME;
        if let Err(e) = mount(&*source, &*target, &*fstype, flags, &*data) {
            let e = std::io::Error::from(e);
            if e.raw_os_error() == Some(libc::EPERM) {
                bail!("mounting {}: {e} (optbin mounts as root)", mountpoint.display());
            }
            return Err(e).with_context(|| format!("mounting {}", mountpoint.display()));
        }
        let init = match read_init(&fuse) {
            Ok(init) => init,
            Err(e) => {
                let _ = unmount(&*target, UnmountFlags::DETACH);
                return Err(e);
            }
        };
        Ok(Self { fuse, init })
    }

    /// A connection handed over by a previous supervisor (its descriptor and its INIT).
    pub fn adopt(fuse: OwnedFd, init: Vec<u8>) -> anyhow::Result<Self> {
        check_init(&init)?;
        Ok(Self { fuse, init })
    }

    /// The INIT request as the kernel sent it.
    pub fn init_request(&self) -> &[u8] {
        &self.init
    }

    /// Answers the kernel's INIT: call once for a new mount, before any server runs.
    pub fn handshake<FS: Filesystem>(&self, fs: FS, config: &Config) -> anyhow::Result<()> {
        let (session, reply) = self.replay(fs, config)?;
        drop(session);
        write_all(self.fuse.as_fd(), &reply).context("answering the kernel's INIT")
    }

    /// A fuser session on this connection, past its INIT (see the module doc). It holds no
    /// mount guard.
    pub fn session<FS: Filesystem>(&self, fs: FS, config: &Config) -> anyhow::Result<Session<FS>> {
        let (session, _reply) = self.replay(fs, config)?;
        // libc: rustix's dup3 takes the target as an `&mut OwnedFd` of ours; this one is
        // owned by the fuser session.
        // SAFETY: both descriptors are valid; dup3 atomically replaces the session's socket
        // with the live connection (no thread reads it yet).
        let r = unsafe {
            libc::dup3(self.fuse.as_raw_fd(), session.as_fd().as_raw_fd(), libc::O_CLOEXEC)
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error()).context("dup3 of the FUSE descriptor");
        }
        Ok(session)
    }

    fn replay<FS: Filesystem>(
        &self,
        fs: FS,
        config: &Config,
    ) -> anyhow::Result<(Session<FS>, Vec<u8>)> {
        let (ours, fusers) =
            socketpair(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)
                .map_err(std::io::Error::from)
                .context("socketpair")?;
        write_all(ours.as_fd(), &self.init).context("replaying INIT")?;
        let session = Session::from_fd(fs, fusers, SessionACL::All, config.clone())
            .context("the FUSE handshake")?;
        let mut reply = vec![0u8; 4096];
        let n = match rustix::io::read(&ours, &mut reply[..]) {
            Ok(0) => Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
            Ok(n) => Ok(n),
            Err(e) => Err(e.into()),
        };
        reply.truncate(n.context("reading fuser's INIT answer")?);
        Ok((session, reply))
    }

    /// Whether the kernel still has the connection (poll reports an error once it was
    /// aborted or unmounted).
    pub fn alive(&self) -> bool {
        alive(self.fuse.as_fd())
    }

    /// Asks the kernel to queue again the requests a dead server had read but not
    /// answered (FUSE_NOTIFY_RESEND, Linux >= 6.9).
    pub fn resend_interrupted_requests(&self) {
        // struct fuse_out_header { u32 len; i32 error (the notify code); u64 unique (0) }
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&16u32.to_ne_bytes());
        header[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
        match write_all(self.fuse.as_fd(), &header) {
            Ok(()) => tracing::info!("asked the kernel to resend interrupted requests"),
            Err(e) => {
                tracing::warn!(error = %e, "FUSE_NOTIFY_RESEND failed (kernel < 6.9?)")
            }
        }
    }
}

impl AsFd for Connection {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fuse.as_fd()
    }
}

/// Whether a `/dev/fuse` descriptor's connection still exists.
pub fn alive(fd: BorrowedFd<'_>) -> bool {
    let mut pfd = [PollFd::from_borrowed_fd(fd, PollFlags::empty())];
    // No wait. A failed poll leaves revents empty: alive, as before.
    let _ = poll(&mut pfd, Some(&Timespec { tv_sec: 0, tv_nsec: 0 }));
    !pfd[0].revents().contains(PollFlags::ERR)
}

fn read_init(fuse: &OwnedFd) -> anyhow::Result<Vec<u8>> {
    // The kernel refuses reads into buffers smaller than a request could be.
    let mut buf = vec![0u8; (1 << 20) + 4096];
    loop {
        let n = match rustix::io::read(fuse, &mut buf[..]) {
            Ok(n) => n,
            Err(Errno::INTR | Errno::AGAIN) => continue,
            Err(e) => {
                return Err(std::io::Error::from(e)).context("reading the kernel's INIT request");
            }
        };
        buf.truncate(n);
        check_init(&buf)?;
        return Ok(buf);
    }
}

fn check_init(init: &[u8]) -> anyhow::Result<()> {
    if init.len() < FUSE_IN_HEADER
        || u32::from_ne_bytes(init[4..8].try_into().unwrap()) != FUSE_INIT
        || u32::from_ne_bytes(init[..4].try_into().unwrap()) as usize != init.len()
    {
        bail!("not a FUSE INIT request ({} bytes)", init.len());
    }
    Ok(())
}

fn write_all(fd: BorrowedFd<'_>, bytes: &[u8]) -> std::io::Result<()> {
    let n = rustix::io::write(fd, bytes)?;
    if n != bytes.len() {
        return Err(std::io::Error::other(format!("short write: {n} of {}", bytes.len())));
    }
    Ok(())
}
