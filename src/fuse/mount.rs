//! Mounting: fuser options, preparing the mountpoint (clearing a stale mount a dead server
//! left, refusing to mount over a live one), an in-process background mount for tests and
//! tools ([`mount_background`]), and unmounting.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use fuser::{Config, MountOption, SessionACL};
use rustix::mount::UnmountFlags;

use crate::fs::Overlay;
use crate::fuse::adapter::{NotifierInvalidator, OptbinFs};

/// The source name of optbin mounts in /proc/mounts.
pub const FS_NAME: &str = "optbin";

/// How to mount and (for [`crate::fuse::run_supervised`]) how to keep serving.
#[derive(Debug, Clone)]
pub struct MountOptions {
    pub mountpoint: PathBuf,
    /// Request threads (all on one /dev/fuse fd: a restarted server must see the requests a
    /// dead one left, so no `clone_fd`).
    pub threads: usize,
    /// The supervisor writes each serving process's pid here (for tools and tests).
    pub server_pid_file: Option<PathBuf>,
    /// After this many crashes within `restart_window` the supervisor serves the mount in
    /// safe mode.
    pub max_crashes: usize,
    pub restart_window: Duration,
    /// The directories the safe-mode server overlays (see [`crate::fuse::safe_mode`]).
    pub overlay_dirs: Vec<PathBuf>,
    /// How long safe mode lasts before the full server is tried again; doubled after each
    /// failed try (at most 10 minutes).
    pub safe_mode_retry: Duration,
    /// Use FUSE passthrough when the kernel has it (default). Off: reads are served by
    /// optbin (the fallback for older kernels; tests and benchmarks switch it off to
    /// exercise that path).
    pub passthrough: bool,
}

impl MountOptions {
    pub fn new(mountpoint: impl Into<PathBuf>) -> Self {
        Self {
            mountpoint: mountpoint.into(),
            threads: 4,
            server_pid_file: None,
            max_crashes: 5,
            restart_window: Duration::from_secs(10),
            overlay_dirs: Vec::new(),
            safe_mode_retry: Duration::from_secs(30),
            passthrough: true,
        }
    }
}

/// `[supervisor]` in the config file.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisorSettings {
    /// This many server crashes within `crash_window_secs` put the mount in safe mode.
    pub max_crashes: usize,
    pub crash_window_secs: u64,
    /// Seconds in safe mode before the full server is tried again (doubled after each
    /// failed try, at most 600).
    pub safe_mode_retry_secs: u64,
}

impl Default for SupervisorSettings {
    fn default() -> Self {
        Self { max_crashes: 5, crash_window_secs: 10, safe_mode_retry_secs: 30 }
    }
}

impl SupervisorSettings {
    pub fn apply(&self, opts: &mut MountOptions) {
        opts.max_crashes = self.max_crashes.max(1);
        opts.restart_window = Duration::from_secs(self.crash_window_secs);
        opts.safe_mode_retry = Duration::from_secs(self.safe_mode_retry_secs.max(1));
    }
}

pub(crate) fn fuser_config(opts: &MountOptions) -> Config {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(FS_NAME.into()),
        // With allow_other, the kernel must check permissions itself: otherwise one user's
        // access check would be reused for another's.
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoAtime,
    ];
    config.acl = SessionACL::All;
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = false;
    config
}

/// What is at a mountpoint now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountState {
    NotMounted,
    /// A FUSE mount whose server is gone (stat says ENOTCONN).
    Stale,
    /// A live optbin mount.
    LiveOptbin,
    /// Some other live mount.
    Other(String),
}

/// A mount as /proc/self/mountinfo lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub fstype: String,
    pub source: String,
}

impl MountEntry {
    pub fn is_optbin(&self) -> bool {
        self.fstype.starts_with("fuse") && self.source == FS_NAME
    }

    pub fn describe(&self) -> String {
        format!("{} from {}", self.fstype, self.source)
    }
}

/// What is mounted at `mountpoint` (the topmost mount), from mountinfo alone: never touches
/// the mount itself, so it cannot hang on a stopped server.
pub fn mount_entry(mountpoint: &Path) -> anyhow::Result<Option<MountEntry>> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    Ok(mountinfo.lines().rev().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mount_path = unescape(left.split(' ').nth(4)?);
        let mut r = right.split(' ');
        let fstype = r.next()?.to_string();
        let source = r.next()?.to_string();
        (Path::new(&mount_path) == mountpoint).then_some(MountEntry { fstype, source })
    }))
}

/// Looks at the mountpoint (a lookup on a dead FUSE mount fails fast with ENOTCONN; a
/// live one answers).
pub fn mount_state(mountpoint: &Path) -> anyhow::Result<MountState> {
    let Some(entry) = mount_entry(mountpoint)? else { return Ok(MountState::NotMounted) };
    // The root's attributes may be cached by the kernel even on a dead connection, so probe
    // a name that is never cached: a dead connection answers ENOTCONN, a live one ENOENT.
    let probe = mountpoint.join(format!(".optbin-probe-{}", std::process::id()));
    match std::fs::symlink_metadata(&probe) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(MountState::Stale),
        _ if entry.is_optbin() => Ok(MountState::LiveOptbin),
        _ => Ok(MountState::Other(entry.describe())),
    }
}

pub(super) fn unescape(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4].iter().all(u8::is_ascii_digit)
        {
            let n = u8::from_str_radix(&s[i + 1..i + 4], 8).unwrap_or(b'?');
            out.push(n);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Makes `mountpoint` ready for a new mount: creates it if missing, lazily unmounts a
/// stale optbin mount a dead server left (ENOTCONN), and refuses a live mount.
pub fn prepare_mountpoint(mountpoint: &Path) -> anyhow::Result<PathBuf> {
    let mountpoint = crate::fs::absolute_mountpoint(mountpoint)?;
    loop {
        match mount_state(&mountpoint)? {
            MountState::NotMounted => break,
            MountState::Stale => {
                tracing::warn!(mountpoint = %mountpoint.display(), "clearing a stale mount (its server died)");
                detach(&mountpoint).context("unmounting the stale mount")?;
            }
            MountState::LiveOptbin => bail!(
                "{} is already served by a live optbin (stop it first: optbin umount {0})",
                mountpoint.display()
            ),
            MountState::Other(what) => {
                bail!(
                    "{} is already a mount point ({what}); refusing to mount over it",
                    mountpoint.display()
                )
            }
        }
    }
    std::fs::create_dir_all(&mountpoint)
        .with_context(|| format!("creating the mountpoint {}", mountpoint.display()))?;
    Ok(mountpoint)
}

fn cpath(path: &Path) -> anyhow::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).context("mountpoint contains a NUL byte")
}

fn detach(mountpoint: &Path) -> std::io::Result<()> {
    let c = cpath(mountpoint).map_err(std::io::Error::other)?;
    Ok(rustix::mount::unmount(&*c, UnmountFlags::DETACH)?)
}

/// Detaches the mount at once (MNT_DETACH): never waits on its server.
pub fn unmount_lazily(mountpoint: &Path) -> anyhow::Result<()> {
    detach(mountpoint).with_context(|| format!("lazy unmount of {}", mountpoint.display()))
}

/// Detaches the mount at once and aborts its connection (`MNT_FORCE | MNT_DETACH`), for a
/// server that does not answer. A lazy unmount alone is not enough there: a request the
/// server had read before it stopped waits for its answer uninterruptibly, so the process
/// that made it (`optbin umount` itself, if it asked for status) could not even exit. After
/// the abort every request still waiting on the connection, in any process, fails with
/// ECONNABORTED, and the server's session ends as after an unmount once it runs again.
pub fn unmount_forcibly(mountpoint: &Path) -> anyhow::Result<()> {
    let c = cpath(mountpoint)?;
    match rustix::mount::unmount(&*c, UnmountFlags::FORCE | UnmountFlags::DETACH) {
        // Gone meanwhile (a plain unmount that finished late): nothing left to abort.
        Ok(()) | Err(rustix::io::Errno::INVAL) => Ok(()),
        Err(e) => Err(std::io::Error::from(e))
            .with_context(|| format!("forced unmount of {}", mountpoint.display())),
    }
}

/// How [`unmount`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmounted {
    /// Gone; the server's session loop ends.
    Clean,
    /// Busy (programs started from the mount still run): detached from the namespace; the
    /// kernel keeps serving their open files until they end. With passthrough their pages
    /// come from the backing files, so they keep running even after the server exits.
    Detached,
    NotMounted,
}

/// Unmounts an optbin mount (`optbin umount`): a plain unmount, lazily if busy. After a
/// clean unmount the server's session loop ends at once (it runs its shutdown hook and the
/// supervisor exits 0); after a lazy one it ends when the last program started from the
/// mount closes its files. SIGTERM to the supervisor is the prompt, clean way to stop.
pub fn unmount(mountpoint: &Path) -> anyhow::Result<Unmounted> {
    let mountpoint = crate::fs::absolute_mountpoint(mountpoint)?;
    // Variants bind-mounted over entries (`super::bind`) would make the mount busy.
    super::bind::detach_submounts(&mountpoint);
    let c = cpath(&mountpoint)?;
    let Err(err) = rustix::mount::unmount(&*c, UnmountFlags::empty()) else {
        return Ok(Unmounted::Clean);
    };
    let err = std::io::Error::from(err);
    match err.raw_os_error() {
        Some(libc::EBUSY) => {
            detach(&mountpoint)
                .with_context(|| format!("lazy unmount of {}", mountpoint.display()))?;
            Ok(Unmounted::Detached)
        }
        Some(libc::EINVAL) | Some(libc::ENOENT) => Ok(Unmounted::NotMounted),
        _ => Err(err).with_context(|| format!("unmounting {}", mountpoint.display())),
    }
}

/// An in-process mount served by a background thread; unmounts on drop (also when a test
/// panics).
pub struct MountGuard {
    session: Option<fuser::BackgroundSession>,
    overlay: Arc<Overlay>,
    mountpoint: PathBuf,
}

impl std::fmt::Debug for MountGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MountGuard").field("mountpoint", &self.mountpoint).finish()
    }
}

impl MountGuard {
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    pub fn overlay(&self) -> &Arc<Overlay> {
        &self.overlay
    }

    /// Unmounts now, reporting how.
    pub fn unmount(mut self) -> anyhow::Result<Unmounted> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> anyhow::Result<Unmounted> {
        let Some(session) = self.session.take() else { return Ok(Unmounted::NotMounted) };
        self.overlay.detach();
        let how = unmount(&self.mountpoint);
        match how {
            Ok(Unmounted::Clean) | Ok(Unmounted::NotMounted) => {
                if let Err(e) = session.join() {
                    tracing::warn!(error = %e, "session thread ended with an error");
                }
            }
            _ => {
                // Detached while busy: the session thread keeps serving the open files until
                // they close. Dropping the session would try to unmount a path that may by
                // then belong to another mount, so it is deliberately leaked.
                std::mem::forget(session);
            }
        }
        how
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_inner() {
            tracing::error!(mountpoint = %self.mountpoint.display(), error = %e, "unmount failed");
        }
    }
}

/// Mounts `overlay` at its mountpoint, served by background threads of this process.
pub fn mount_background(overlay: Arc<Overlay>, opts: &MountOptions) -> anyhow::Result<MountGuard> {
    let mountpoint = prepare_mountpoint(&opts.mountpoint)?;
    if mountpoint != overlay.mountpoint() {
        bail!(
            "the overlay was built for {} but the mount is at {}",
            overlay.mountpoint().display(),
            mountpoint.display()
        );
    }
    let session = fuser::Session::new(
        OptbinFs::new(overlay.clone(), 0, opts.passthrough),
        &mountpoint,
        &fuser_config(opts),
    )
    .with_context(|| format!("mounting {}", mountpoint.display()))?;
    let notifier = session.notifier();
    let session = session.spawn().context("starting the session thread")?;
    let mut guard = MountGuard { session: Some(session), overlay: overlay.clone(), mountpoint };
    if let Err(e) = overlay.attach(Arc::new(NotifierInvalidator(notifier))) {
        let _ = guard.unmount_inner();
        return Err(e.context("attaching the overlay"));
    }
    Ok(guard)
}
