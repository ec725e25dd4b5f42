//! Open handles of the mount: what a file handle number stands for, for its whole life.
//!
//! - a served file: the file whose bytes the node serves, opened once (reads of a handle
//!   never see other bytes, whatever happens to the path), and the FUSE passthrough backing
//!   id registered for it (`B`: the adapter's type; the core only keeps it alive);
//! - a control file: its content, snapshotted at open, or its name for writes;
//! - a directory: its listing, snapshotted at opendir, so that the READDIR requests of one
//!   listing read consistent offsets (a name added or removed meanwhile shifts nothing) and
//!   the directory is listed once per opendir, not once per request.
//!
//! Handle numbers carry the server process's generation in their top bits, so a restarted
//! server never reuses a number its predecessor gave out; a handle it does not know (opened
//! by the predecessor) is reopened from the node id, which names the same bytes.
//!
//! Recently used backing ids stay registered after their last handle closed
//! ([`RETAINED_BACKINGS`]), so the next exec of the same binary opens no file at all.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use crate::error::{FsError, FsResult};
use crate::fs::{DirEntry, NodeType, Overlay};

/// How many recently opened served files keep their backing id registered after their last
/// handle closed. A retained id pins its backing file (an old version of a binary stays on
/// disk until evicted), hence the small bound.
pub const RETAINED_BACKINGS: usize = 128;

/// What a handle number stands for.
#[derive(Debug)]
pub enum Handle<B> {
    /// `file` is None for passthrough opens served from a retained backing id (the kernel
    /// reads the backing file itself; a read reaching us reopens the node's bytes).
    Binary {
        file: Option<Arc<File>>,
        backing: Option<Arc<B>>,
    },
    Control {
        name: String,
        content: Vec<u8>,
        writable: bool,
    },
    Dir {
        entries: Arc<Vec<DirEntry>>,
    },
}

/// Receives the entries of one READDIR reply (the adapter's buffer).
pub trait DirectoryReplier {
    /// Adds one entry; `offset` is the offset of the *next* entry. True when the reply is
    /// full (the entry was not added).
    fn add(&mut self, ino: u64, offset: u64, kind: NodeType, name: &OsStr) -> bool;
}

struct Inner<B> {
    open: HashMap<u64, Handle<B>>,
    backing_by_ino: HashMap<u64, Weak<B>>,
    /// Most recently used last.
    retained: VecDeque<(u64, Arc<B>)>,
    next: u64,
}

impl<B> Default for Inner<B> {
    fn default() -> Self {
        Self {
            open: HashMap::new(),
            backing_by_ino: HashMap::new(),
            retained: VecDeque::new(),
            next: 0,
        }
    }
}

/// The handle table of one server process.
pub struct HandleTable<B> {
    inner: Mutex<Inner<B>>,
}

impl<B> Default for HandleTable<B> {
    fn default() -> Self {
        Self { inner: Mutex::default() }
    }
}

impl<B> std::fmt::Debug for HandleTable<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandleTable").field("open", &self.lock().open.len()).finish()
    }
}

impl<B> HandleTable<B> {
    fn lock(&self) -> MutexGuard<'_, Inner<B>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `handle` and returns its number (`generation` in the top bits).
    pub fn insert(&self, generation: u64, handle: Handle<B>) -> u64 {
        let mut inner = self.lock();
        inner.next += 1;
        let fh = (generation << 40) | inner.next;
        inner.open.insert(fh, handle);
        fh
    }

    /// Forgets a handle (unknown ones, from a previous server process, are fine).
    pub fn remove(&self, fh: u64) -> Option<Handle<B>> {
        self.lock().open.remove(&fh)
    }

    pub fn len(&self) -> usize {
        self.lock().open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The retained backing id of node `ino`, marked most recently used.
    pub fn retained(&self, ino: u64) -> Option<Arc<B>> {
        let mut inner = self.lock();
        let pos = inner.retained.iter().position(|(i, _)| *i == ino)?;
        let entry = inner.retained.remove(pos)?;
        let id = entry.1.clone();
        inner.retained.push_back(entry);
        Some(id)
    }

    /// The backing id of node `ino` while any handle holds it.
    pub fn backing_of(&self, ino: u64) -> Option<Arc<B>> {
        self.lock().backing_by_ino.get(&ino).and_then(Weak::upgrade)
    }

    /// Registers a new backing id of node `ino` and retains it, and returns the id to
    /// answer the open with: `id`, or the one another open of the same node registered
    /// meanwhile (opens run on several threads). The kernel refuses, with EIO to the
    /// process, an open whose backing differs from the one an open file of the node
    /// already uses; the caller drops an `id` not returned.
    pub fn register_backing(&self, ino: u64, id: Arc<B>) -> Arc<B> {
        let mut inner = self.lock();
        if let Some(live) = inner.backing_by_ino.get(&ino).and_then(Weak::upgrade) {
            return live;
        }
        inner.backing_by_ino.insert(ino, Arc::downgrade(&id));
        if inner.retained.iter().any(|(i, _)| *i == ino) {
            return id;
        }
        if inner.retained.len() >= RETAINED_BACKINGS {
            inner.retained.pop_front();
        }
        inner.retained.push_back((ino, id.clone()));
        id
    }

    /// The name of the writable control file behind `fh` of node `ino` (EBADF for anything
    /// else). A handle this process does not know was opened by a previous server process
    /// (a write in flight across a restart): the node id names the control file.
    pub fn control_for_write(&self, overlay: &Overlay, fh: u64, ino: u64) -> FsResult<String> {
        match self.lock().open.get(&fh) {
            Some(Handle::Control { name, writable: true, .. }) => Ok(name.clone()),
            None => overlay.writable_control_name(ino),
            Some(_) => Err(FsError::new(libc::EBADF, "not a handle of a writable control file")),
        }
    }

    /// Reads `size` bytes at `offset` from the handle `fh` of node `ino`.
    pub fn read(
        &self,
        overlay: &Overlay,
        fh: u64,
        ino: u64,
        offset: u64,
        size: u32,
    ) -> FsResult<Vec<u8>> {
        let file = {
            let inner = self.lock();
            match inner.open.get(&fh) {
                Some(Handle::Binary { file: Some(file), .. }) => file.clone(),
                Some(Handle::Control { content, .. }) => {
                    let start = usize::try_from(offset).unwrap_or(usize::MAX).min(content.len());
                    let end = start.saturating_add(size as usize).min(content.len());
                    return Ok(content[start..end].to_vec());
                }
                Some(Handle::Dir { .. }) => {
                    return Err(FsError::new(libc::EISDIR, "read of a directory handle"));
                }
                Some(Handle::Binary { file: None, .. }) | None => {
                    drop(inner);
                    // A handle a previous server process opened (or a passthrough handle
                    // whose read reached us after all): reopen the same bytes.
                    let file = Arc::new(overlay.open_backing(&*overlay.file_node(ino)?)?);
                    let mut inner = self.lock();
                    let backing = match inner.open.remove(&fh) {
                        Some(Handle::Binary { backing, .. }) => backing,
                        _ => None,
                    };
                    inner.open.insert(fh, Handle::Binary { file: Some(file.clone()), backing });
                    file
                }
            }
        };
        read_full(&file, offset, size)
    }

    /// Fills `reply` from the listing snapshotted for `fh`, starting after `offset` (0: from
    /// the start). A handle this process does not know is listed now.
    pub fn readdir(
        &self,
        overlay: &Overlay,
        fh: u64,
        ino: u64,
        caller: &crate::fs::Caller,
        offset: u64,
        reply: &mut dyn DirectoryReplier,
    ) -> FsResult<()> {
        let known = match self.lock().open.get(&fh) {
            Some(Handle::Dir { entries }) => Some(entries.clone()),
            Some(_) => return Err(FsError::new(libc::ENOTDIR, "readdir of a file handle")),
            None => None,
        };
        let entries = match known {
            Some(e) => e,
            None => {
                let entries = Arc::new(overlay.opendir(ino, caller)?);
                self.lock().open.insert(fh, Handle::Dir { entries: entries.clone() });
                entries
            }
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, e) in entries.iter().enumerate().skip(start) {
            if reply.add(e.ino, (i + 1) as u64, e.kind, &e.name) {
                break;
            }
        }
        Ok(())
    }
}

/// Reads up to `size` bytes at `offset` (short only at the end of the file).
pub fn read_full(file: &File, offset: u64, size: u32) -> FsResult<Vec<u8>> {
    let mut buf = vec![0u8; size as usize];
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(FsError::io(e, "reading a served file")),
        }
    }
    buf.truncate(done);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    struct Collect {
        room: usize,
        got: Vec<(u64, OsString)>,
    }

    impl DirectoryReplier for Collect {
        fn add(&mut self, _ino: u64, offset: u64, _kind: NodeType, name: &OsStr) -> bool {
            if self.got.len() == self.room {
                return true;
            }
            self.got.push((offset, name.to_os_string()));
            false
        }
    }

    fn entry(name: &str) -> DirEntry {
        DirEntry { ino: 1 << 20, kind: NodeType::Symlink, name: name.into() }
    }

    #[test]
    fn handles_carry_the_generation_and_retained_backings_are_bounded() {
        let table: HandleTable<u32> = HandleTable::default();
        let a = table
            .insert(3, Handle::Control { name: "control".into(), content: vec![], writable: true });
        let b = table
            .insert(3, Handle::Control { name: "status".into(), content: vec![], writable: false });
        assert_eq!(a >> 40, 3);
        assert_ne!(a, b);
        let tmp = tempfile::tempdir().unwrap();
        let overlay = empty_overlay(tmp.path());
        let dir = overlay.lookup(crate::fs::node::ROOT_ID, OsStr::new(".optbin")).unwrap();
        let ino_of = |name: &str| overlay.lookup(dir.attr.ino, OsStr::new(name)).unwrap().attr.ino;
        let (control, status) = (ino_of("control"), ino_of("status"));
        assert_eq!(table.control_for_write(&overlay, a, control).unwrap(), "control");
        assert_eq!(table.control_for_write(&overlay, b, status).unwrap_err().errno, libc::EBADF);
        // A handle a previous server process opened: the node names the control file.
        assert_eq!(table.control_for_write(&overlay, 999, control).unwrap(), "control");
        assert_eq!(
            table.control_for_write(&overlay, 999, status).unwrap_err().errno,
            libc::EBADF,
            "not writable"
        );
        for ino in 0..(RETAINED_BACKINGS as u64 + 5) {
            table.register_backing(ino, Arc::new(ino as u32));
        }
        assert!(table.retained(0).is_none(), "the oldest was evicted");
        assert_eq!(
            table.retained(RETAINED_BACKINGS as u64 + 4).as_deref(),
            Some(&(RETAINED_BACKINGS as u32 + 4))
        );
        assert!(table.backing_of(0).is_none(), "no handle holds the evicted one");
        // Two opens of one node racing: the second one's id is not used.
        let first = table.register_backing(7_000, Arc::new(1));
        assert_eq!(*table.register_backing(7_000, Arc::new(2)), 1);
        drop(first);
        assert_eq!(*table.register_backing(7_000, Arc::new(3)), 1, "the retained one is live");
        assert!(table.remove(a).is_some());
        assert!(table.remove(a).is_none());
    }

    /// An overlay of no directories, with a `status` and a writable `control` file.
    fn empty_overlay(dir: &std::path::Path) -> Arc<Overlay> {
        crate::fs::Overlay::new(
            crate::fs::OverlayConfig {
                mountpoint: dir.join("mnt"),
                overlay_dirs: vec![],
                originals: None,
            },
            crate::fs::ServingTable::new(),
            None,
            Arc::new(crate::fs::StaticControl::new(&[("status", "ok\n")])),
            Arc::new(crate::fs::NoEvents),
        )
        .unwrap()
    }

    #[test]
    fn a_listing_is_read_from_its_snapshot_in_pages() {
        let table: HandleTable<()> = HandleTable::default();
        let entries: Vec<DirEntry> = (0..5).map(|i| entry(&format!("e{i}"))).collect();
        let fh = table.insert(0, Handle::Dir { entries: Arc::new(entries) });
        // The overlay is not asked for a handle whose listing is known.
        let tmp = tempfile::tempdir().unwrap();
        let overlay = empty_overlay(tmp.path());
        let mut page = Collect { room: 2, got: vec![] };
        table.readdir(&overlay, fh, 1, &crate::fs::Caller::ROOT, 0, &mut page).unwrap();
        assert_eq!(page.got, vec![(1, "e0".into()), (2, "e1".into())]);
        let mut page = Collect { room: 10, got: vec![] };
        table.readdir(&overlay, fh, 1, &crate::fs::Caller::ROOT, 2, &mut page).unwrap();
        assert_eq!(page.got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![3, 4, 5]);
        let mut page = Collect { room: 10, got: vec![] };
        table.readdir(&overlay, fh, 1, &crate::fs::Caller::ROOT, 5, &mut page).unwrap();
        assert!(page.got.is_empty(), "the end");
    }
}
