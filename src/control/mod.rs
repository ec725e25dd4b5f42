//! The `.optbin/` directory under the mount, like sysfs: files that show status and a
//! file that takes commands.
//!
//! | file            | mode | what it does |
//! |-----------------|------|--------------|
//! | `status`        | 0444 | the status table for people, rendered at open |
//! | `status.json`   | 0444 | the same as JSON |
//! | `control`       | 0644 | takes one command per write (root only); reading shows the grammar |
//! | `last_error`    | 0444 | why the last rejected command was rejected |
//! | `bins/NAME/...` | 0444 | per-binary files contributed by subsystems (e.g. `profile.fdata`) |
//!
//! This module renders and parses; the daemon supplies the data ([`StatusSource`]) and
//! carries commands out ([`ControlActions`]).

pub mod command;
pub mod details;
pub mod resolve;
pub mod sections;
pub mod status;
pub mod subsystem;

use std::sync::Mutex;

use crate::error::{FsError, FsResult};
use crate::fs::{ControlFile, ControlPlane};
pub use command::Command;
pub use status::StatusReport;
pub use subsystem::{BinFiles, BinFilesSet, CommandHooks, SubsystemStatus};

/// Where the status comes from.
pub trait StatusSource: Send + Sync {
    fn report(&self) -> anyhow::Result<StatusReport>;
    /// Extra read-only files under `bins/` as `(relative path, contents)`, e.g.
    /// `("rustc/profile.fdata", ...)`. Listing is cheap; contents are produced on read.
    fn bin_files(&self) -> Vec<String> {
        Vec::new()
    }
    fn bin_file(&self, _relative: &str) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(None)
    }
}

/// Read-only files other subsystems add to the directory (e.g. `flame.svg`,
/// `host/use`), by their path relative to `.optbin/`. They are rendered elsewhere, never
/// on a FUSE request: `read` only hands out bytes, or the reason they could not be made
/// (an `EIO`).
pub trait ExtraFiles: Send + Sync {
    fn names(&self) -> Vec<String>;
    fn read(&self, name: &str) -> Option<Result<Vec<u8>, String>>;
}

/// A command that was understood but could not be carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ActionError {
    pub errno: libc::c_int,
    pub message: String,
}

impl ActionError {
    pub fn invalid(message: impl Into<String>) -> Self {
        Self { errno: libc::EINVAL, message: message.into() }
    }

    pub fn io(message: impl Into<String>) -> Self {
        Self { errno: libc::EIO, message: message.into() }
    }
}

/// Carries commands out. Returns a sentence saying what was done (logged).
pub trait ControlActions: Send + Sync {
    fn apply(&self, command: &Command) -> Result<String, ActionError>;
}

/// The control directory's behaviour, independent of FUSE.
pub struct ControlDir {
    status: Box<dyn StatusSource>,
    actions: Box<dyn ControlActions>,
    last_error: Mutex<String>,
    extra: Vec<std::sync::Arc<dyn ExtraFiles>>,
}

pub const STATUS: &str = "status";
pub const STATUS_JSON: &str = "status.json";
pub const CONTROL: &str = "control";
pub const LAST_ERROR: &str = "last_error";

impl ControlPlane for ControlDir {
    fn files(&self) -> Vec<ControlFile> {
        ControlDir::files(self)
    }

    fn read(&self, name: &str) -> FsResult<Vec<u8>> {
        ControlDir::read(self, name)
    }

    fn write(&self, name: &str, uid: u32, data: &[u8]) -> FsResult<()> {
        ControlDir::write(self, name, uid, data)
    }
}

impl ControlDir {
    pub fn new(status: Box<dyn StatusSource>, actions: Box<dyn ControlActions>) -> Self {
        Self { status, actions, last_error: Mutex::new(String::new()), extra: Vec::new() }
    }

    /// Adds a subsystem's read-only files.
    pub fn with_files(mut self, files: std::sync::Arc<dyn ExtraFiles>) -> Self {
        self.extra.push(files);
        self
    }

    pub fn files(&self) -> Vec<ControlFile> {
        let mut files = vec![
            ControlFile { name: STATUS.into(), mode: 0o444, writable: false },
            ControlFile { name: STATUS_JSON.into(), mode: 0o444, writable: false },
            ControlFile { name: CONTROL.into(), mode: 0o644, writable: true },
            ControlFile { name: LAST_ERROR.into(), mode: 0o444, writable: false },
        ];
        files.extend(self.status.bin_files().into_iter().map(|name| ControlFile {
            name: format!("bins/{name}"),
            mode: 0o444,
            writable: false,
        }));
        for extra in &self.extra {
            files.extend(extra.names().into_iter().map(|name| ControlFile {
                name,
                mode: 0o444,
                writable: false,
            }));
        }
        files
    }

    /// The contents of a file at open time.
    pub fn read(&self, name: &str) -> FsResult<Vec<u8>> {
        let report = || {
            self.status.report().map_err(|e| {
                tracing::error!(error = %format!("{e:#}"), "building the status report failed");
                FsError::new(libc::EIO, format!("building the status report: {e:#}"))
            })
        };
        match name {
            STATUS => Ok(status::render_text(&report()?).into_bytes()),
            STATUS_JSON => {
                let mut json = serde_json::to_vec_pretty(&report()?)
                    .map_err(|e| FsError::new(libc::EIO, format!("serializing status: {e}")))?;
                json.push(b'\n');
                Ok(json)
            }
            CONTROL => Ok(format!(
                "# write one command per write, as root:\n#   {}\n# see docs/control.md\n",
                command::USAGE
            )
            .into_bytes()),
            LAST_ERROR => {
                let last = self.last_error.lock().map(|s| s.clone()).unwrap_or_default();
                Ok(if last.is_empty() { Vec::new() } else { format!("{last}\n").into_bytes() })
            }
            other if let Some(r) = self.extra.iter().find_map(|e| e.read(other)) => {
                r.map_err(|reason| {
                    tracing::error!(file = other, "{reason}");
                    FsError::new(libc::EIO, reason)
                })
            }
            other => match other.strip_prefix("bins/") {
                Some(rel) => match self.status.bin_file(rel) {
                    Ok(Some(bytes)) => Ok(bytes),
                    Ok(None) => Err(FsError::not_found(format!(".optbin/{other}"))),
                    Err(e) => Err(FsError::new(libc::EIO, format!(".optbin/{other}: {e:#}"))),
                },
                None => Err(FsError::not_found(format!(".optbin/{other}"))),
            },
        }
    }

    /// One write to a file of the directory: only `control` takes writes, only from root.
    pub fn write(&self, name: &str, uid: u32, data: &[u8]) -> FsResult<()> {
        if name != CONTROL {
            return Err(FsError::new(libc::EACCES, format!(".optbin/{name} is read-only")));
        }
        if uid != 0 {
            // default_permissions already refuses non-root writers (mode 0644, owner root);
            // this is the second lock on the door.
            tracing::warn!(uid, "control write refused: not root");
            return Err(FsError::new(libc::EACCES, format!("control: uid {uid} is not root")));
        }
        let result = command::parse(data)
            .map_err(|e| ActionError::invalid(e.0))
            .and_then(|cmd| self.apply_off_request_thread(&cmd).map(|done| (cmd, done)));
        match result {
            Ok((cmd, done)) => {
                tracing::info!(command = %cmd, "control: {done}");
                self.set_last_error(String::new());
                Ok(())
            }
            Err(e) => {
                let shown = String::from_utf8_lossy(data).trim_end().to_string();
                tracing::warn!(command = %shown, errno = e.errno, "control command rejected: {}", e.message);
                self.set_last_error(format!("{shown:?}: {}", e.message));
                Err(FsError::new(e.errno, e.message))
            }
        }
    }

    /// Carries the command out on a thread of its own. Invalidations caused from a FUSE
    /// request thread are queued (the kernel may be waiting on that thread); from any other
    /// thread they reach the kernel before the call returns. So when `echo 'exclude x' >
    /// control` returns, the next exec of `x` already sees the change.
    fn apply_off_request_thread(&self, cmd: &Command) -> Result<String, ActionError> {
        std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("optbin-control".into())
                .spawn_scoped(scope, || self.actions.apply(cmd))
                .map_err(|e| ActionError::io(format!("starting a control thread: {e}")))?
                .join()
                .unwrap_or_else(|_| {
                    Err(ActionError::io("the command panicked (a bug; see the log)"))
                })
        })
    }

    fn set_last_error(&self, text: String) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = text;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoStatus;
    impl StatusSource for NoStatus {
        fn report(&self) -> anyhow::Result<StatusReport> {
            Ok(StatusReport { version: "t".into(), ..Default::default() })
        }
    }

    struct Recorder(Mutex<Vec<String>>);
    impl ControlActions for &'static Recorder {
        fn apply(&self, command: &Command) -> Result<String, ActionError> {
            if command.name() == "missing" {
                return Err(ActionError::invalid("no binary named \"missing\""));
            }
            self.0.lock().unwrap().push(command.to_string());
            Ok("done".into())
        }
    }

    #[test]
    fn writes_parse_apply_and_remember_errors() {
        let rec: &'static Recorder = Box::leak(Box::new(Recorder(Mutex::new(vec![]))));
        let dir = ControlDir::new(Box::new(NoStatus), Box::new(rec));
        dir.write(CONTROL, 0, b"exclude node\n").unwrap();
        assert_eq!(rec.0.lock().unwrap().as_slice(), ["exclude node"]);
        assert!(dir.read(LAST_ERROR).unwrap().is_empty());

        let err = dir.write(CONTROL, 0, b"bogus x").unwrap_err();
        assert_eq!(err.errno, libc::EINVAL);
        let last = String::from_utf8(dir.read(LAST_ERROR).unwrap()).unwrap();
        assert!(last.contains("unknown command"), "{last}");

        let err = dir.write(CONTROL, 0, b"exclude missing").unwrap_err();
        assert_eq!(err.errno, libc::EINVAL);
        assert!(String::from_utf8(dir.read(LAST_ERROR).unwrap()).unwrap().contains("no binary"));

        assert_eq!(dir.write(CONTROL, 1000, b"exclude node").unwrap_err().errno, libc::EACCES);
        assert_eq!(dir.write(STATUS, 0, b"x").unwrap_err().errno, libc::EACCES);
        assert_eq!(rec.0.lock().unwrap().len(), 1, "rejected writes change nothing");
        assert!(String::from_utf8(dir.read(STATUS).unwrap()).unwrap().starts_with("optbin t"));
        assert_eq!(dir.read("nope").unwrap_err().errno, libc::ENOENT);
    }
}
