//! The page cache, behind [`PageCache`] so the warmer's logic is testable: which pages of a
//! file are resident, reading ranges back, and locking ranges in memory.
//!
//! [`Kernel`] is the real one: residency is `mincore(2)` over a read-only shared mapping of
//! the file (the mapping faults nothing in, so looking does not warm); reading back is
//! `posix_fadvise(POSIX_FADV_WILLNEED)`, which starts readahead from the calling thread, so
//! the I/O carries that thread's I/O priority (the warmer sets itself to the idle class).
//! `cachestat(2)` (Linux 6.5) counts resident pages of a range more cheaply, but the warmer
//! needs per-page bitmaps to read back only the pages runs touched, so it is not used.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::num::NonZeroU64;
use std::ops::Range;
use std::path::{Path, PathBuf};

use rustix::fs::{Advice, fadvise};

/// A set of page indices of one file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageSet {
    bits: Vec<u64>,
    pages: usize,
}

impl PageSet {
    pub fn empty(pages: usize) -> Self {
        Self { bits: vec![0; pages.div_ceil(64)], pages }
    }

    pub fn from_bools(resident: &[bool]) -> Self {
        let mut s = Self::empty(resident.len());
        for (i, &r) in resident.iter().enumerate() {
            if r {
                s.insert(i);
            }
        }
        s
    }

    pub fn pages(&self) -> usize {
        self.pages
    }

    pub fn insert(&mut self, page: usize) {
        if page < self.pages {
            self.bits[page / 64] |= 1 << (page % 64);
        }
    }

    pub fn contains(&self, page: usize) -> bool {
        page < self.pages && self.bits[page / 64] & (1 << (page % 64)) != 0
    }

    pub fn count(&self) -> usize {
        self.bits.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Adds `other`'s pages; a file that grew keeps the larger size.
    pub fn union_with(&mut self, other: &PageSet) {
        if other.pages > self.pages {
            self.bits.resize(other.pages.div_ceil(64), 0);
            self.pages = other.pages;
        }
        for (a, b) in self.bits.iter_mut().zip(&other.bits) {
            *a |= *b;
        }
    }

    /// Pages in `self` but not in `resident`, as runs of consecutive pages.
    pub fn missing_from(&self, resident: &PageSet) -> Vec<Range<usize>> {
        let mut out: Vec<Range<usize>> = Vec::new();
        for page in 0..self.pages {
            if self.contains(page) && !resident.contains(page) {
                match out.last_mut() {
                    Some(r) if r.end == page => r.end += 1,
                    _ => out.push(page..page + 1),
                }
            }
        }
        out
    }

    /// Pages in both.
    pub fn intersection_count(&self, other: &PageSet) -> usize {
        self.bits.iter().zip(&other.bits).map(|(a, b)| (a & b).count_ones() as usize).sum()
    }
}

/// What the warmer needs of the page cache (and of the files in it).
pub trait PageCache: Send {
    /// The size of a page in bytes.
    fn page_size(&self) -> u64;
    /// Which pages of `path` are resident now.
    fn residency(&mut self, path: &Path) -> io::Result<PageSet>;
    /// Starts reading these page runs of `path` back into the cache.
    fn fetch(&mut self, path: &Path, runs: &[Range<usize>]) -> io::Result<()>;
    /// Locks these page runs of `path` in memory (replacing what was locked of it before);
    /// an empty list unlocks. Returns the bytes now locked for `path`.
    fn lock(&mut self, path: &Path, runs: &[Range<usize>]) -> io::Result<u64>;
    /// The pages of `path` that hold packed hot code (a BOLT variant's new `.text`, see
    /// [`super::hot`]), read back before any other; `None` when it has none.
    fn hot_pages(&mut self, path: &Path) -> io::Result<Option<Range<usize>>>;
}

/// The kernel's page cache.
#[derive(Default)]
pub struct Kernel {
    /// Mappings kept for locked ranges: unmapping releases the lock.
    locked: HashMap<PathBuf, (memmap2::Mmap, u64)>,
}

impl Kernel {
    pub fn new() -> Self {
        Self::default()
    }
}

pub fn system_page_size() -> u64 {
    // The kernel's AT_PAGESZ, which sysconf(_SC_PAGESIZE) reads too.
    rustix::param::page_size() as u64
}

fn map(path: &Path) -> io::Result<Option<(File, memmap2::Mmap)>> {
    let file = File::open(path)?;
    if file.metadata()?.len() == 0 {
        return Ok(None);
    }
    // SAFETY: a read-only shared mapping; we only read its residency (mincore) or lock it,
    // never its bytes, so a concurrent change of the file cannot make us read torn data.
    let map = unsafe { memmap2::MmapOptions::new().map(&file)? };
    Ok(Some((file, map)))
}

impl PageCache for Kernel {
    fn page_size(&self) -> u64 {
        system_page_size()
    }

    fn residency(&mut self, path: &Path) -> io::Result<PageSet> {
        let Some((_file, map)) = map(path)? else { return Ok(PageSet::empty(0)) };
        let pages = map.len().div_ceil(self.page_size() as usize);
        let mut vec = vec![0u8; pages];
        // libc: rustix has no mincore.
        // SAFETY: the mapping is `map.len()` bytes long and `vec` has one byte per page.
        let rc = unsafe { libc::mincore(map.as_ptr() as *mut _, map.len(), vec.as_mut_ptr()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let bools: Vec<bool> = vec.iter().map(|b| b & 1 != 0).collect();
        Ok(PageSet::from_bools(&bools))
    }

    fn fetch(&mut self, path: &Path, runs: &[Range<usize>]) -> io::Result<()> {
        let file = File::open(path)?;
        let ps = self.page_size();
        for r in runs {
            let (off, len) = (r.start as u64 * ps, (r.end - r.start) as u64 * ps);
            // A length of 0 (None) means to the end of the file, as for posix_fadvise.
            fadvise(&file, off, NonZeroU64::new(len), Advice::WillNeed)?;
        }
        Ok(())
    }

    fn lock(&mut self, path: &Path, runs: &[Range<usize>]) -> io::Result<u64> {
        // Dropping the old mapping unlocks what it held.
        self.locked.remove(path);
        if runs.is_empty() {
            return Ok(0);
        }
        let Some((_file, map)) = map(path)? else { return Ok(0) };
        let ps = self.page_size() as usize;
        let mut bytes = 0u64;
        for r in runs {
            let off = r.start * ps;
            let len = ((r.end - r.start) * ps).min(map.len().saturating_sub(off));
            if len == 0 {
                continue;
            }
            // libc: rustix's mlock takes the same raw pointer and is as unsafe.
            // SAFETY: [off, off+len) lies inside the mapping, which stays alive in
            // `self.locked` for as long as the lock should last.
            let rc = unsafe { libc::mlock(map.as_ptr().add(off) as *const _, len) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            bytes += len as u64;
        }
        self.locked.insert(path.to_path_buf(), (map, bytes));
        Ok(bytes)
    }

    fn hot_pages(&mut self, path: &Path) -> io::Result<Option<Range<usize>>> {
        let page = self.page_size();
        Ok(super::hot::packed_hot_text(path)?.map(|bytes| super::hot::pages_of(&bytes, page)))
    }
}

/// Puts the calling thread in the idle I/O class: its reads wait for every other I/O.
pub fn set_idle_io_priority() -> io::Result<()> {
    const IOPRIO_WHO_PROCESS: libc::c_int = 1;
    const IOPRIO_CLASS_IDLE: libc::c_int = 3;
    const IOPRIO_CLASS_SHIFT: libc::c_int = 13;
    // libc: rustix has no ioprio_set.
    // SAFETY: ioprio_set on the calling thread (who 0) takes integers only.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            0,
            IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT,
        )
    };
    if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn page_sets_find_the_missing_runs() {
        let ws = PageSet::from_bools(&[true, true, false, true, true, true, false, true]);
        let resident = PageSet::from_bools(&[true, false, false, false, true, false, true, false]);
        assert_eq!(ws.missing_from(&resident), vec![1..2, 3..4, 5..6, 7..8]);
        assert_eq!(ws.count(), 6);
        assert_eq!(ws.intersection_count(&resident), 2);
        let mut grown = PageSet::from_bools(&[false; 3]);
        grown.union_with(&ws);
        assert_eq!(grown, ws);
    }

    #[test]
    fn evicted_pages_read_back_are_resident_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut f = File::create(&path).unwrap();
        f.write_all(&vec![7u8; 64 * 4096]).unwrap();
        f.sync_all().unwrap();
        let mut k = Kernel::new();
        let evict = || {
            let f = File::open(&path).unwrap();
            let _ = fadvise(&f, 0, None, Advice::DontNeed);
        };
        evict();
        let before = k.residency(&path).unwrap();
        assert!(before.count() < 64, "DONTNEED left {} of 64 pages", before.count());
        let all = PageSet::from_bools(&[true; 64]);
        k.fetch(&path, &all.missing_from(&before)).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let now = k.residency(&path).unwrap().count();
            if now == 64 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "only {now} of 64 pages came back");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
