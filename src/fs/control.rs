//! The `.optbin/` control directory's contract: the overlay presents whatever files a
//! [`ControlPlane`] lists (nested names such as `bins/rustc/profile.fdata` get their
//! directories) and delegates reads and writes to it. The real implementation (status
//! rendered from the catalog, commands parsed into catalog changes) lives on the daemon side;
//! [`StaticControl`] is a small one for tests and tools.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::error::FsError;

/// One file of the control directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlFile {
    /// Relative name, `/`-separated for nested files (`status`, `bins/rustc/profile.fdata`).
    pub name: String,
    /// 0o444 or 0o644 (the kernel checks it: `default_permissions`).
    pub mode: u16,
    pub writable: bool,
}

/// The daemon side of `.optbin/`. Reads are snapshotted at open; each `write()` system call
/// is one call to [`ControlPlane::write`] (one command per write).
pub trait ControlPlane: Send + Sync {
    fn files(&self) -> Vec<ControlFile>;
    fn read(&self, name: &str) -> Result<Vec<u8>, FsError>;
    fn write(&self, name: &str, uid: u32, data: &[u8]) -> Result<(), FsError>;
}

/// A fixed set of readable files plus one writable `control` file that records every
/// write (only root may write; an empty write is EINVAL). For tests and tools.
#[derive(Debug, Default)]
pub struct StaticControl {
    files: Mutex<BTreeMap<String, Vec<u8>>>,
    writes: Mutex<Vec<(u32, Vec<u8>)>>,
}

impl StaticControl {
    pub fn new(files: &[(&str, &str)]) -> Self {
        let files = files.iter().map(|(n, c)| (n.to_string(), c.as_bytes().to_vec())).collect();
        Self { files: Mutex::new(files), writes: Mutex::default() }
    }

    /// Replaces (or adds) a readable file.
    pub fn set(&self, name: &str, content: &str) {
        self.files.lock().unwrap_or_else(|e| e.into_inner()).insert(name.into(), content.into());
    }

    /// Everything written to `control`, with the writer's uid.
    pub fn writes(&self) -> Vec<(u32, Vec<u8>)> {
        self.writes.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl ControlPlane for StaticControl {
    fn files(&self) -> Vec<ControlFile> {
        let files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<ControlFile> = files
            .keys()
            .map(|name| ControlFile { name: name.clone(), mode: 0o444, writable: false })
            .collect();
        out.push(ControlFile { name: "control".into(), mode: 0o644, writable: true });
        out
    }

    fn read(&self, name: &str) -> Result<Vec<u8>, FsError> {
        if name == "control" {
            return Ok(Vec::new());
        }
        let files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        files.get(name).cloned().ok_or_else(|| FsError::not_found(format!("control file {name}")))
    }

    fn write(&self, name: &str, uid: u32, data: &[u8]) -> Result<(), FsError> {
        if name != "control" {
            return Err(FsError::new(libc::EACCES, format!("{name} is not writable")));
        }
        if uid != 0 {
            return Err(FsError::new(libc::EACCES, "only root may write control"));
        }
        if data.iter().all(|b| b.is_ascii_whitespace()) {
            return Err(FsError::new(libc::EINVAL, "empty command"));
        }
        self.writes.lock().unwrap_or_else(|e| e.into_inner()).push((uid, data.to_vec()));
        Ok(())
    }
}
