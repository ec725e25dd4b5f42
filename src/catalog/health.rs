//! Is the catalog fit to open? Checked once before mounting, so that a bad catalog is
//! reported as what it is (and the mount never comes up on it) instead of as a crashing
//! server, and a damaged one is never silently replaced by an empty one.
//!
//! SQLite itself, on opening, quietly drops every WAL frame from the first one whose
//! checksum fails: the pins, exclusions and measurements committed after it vanish and the
//! daemon would start as if they had never been. So the write-ahead log is read here first
//! ([`inspect_wal`]): a frame that fails its checksum with committed transactions after it
//! is damage, not a torn last write. A catalog whose files hold data but no tables is
//! damage too. Clean stops checkpoint the WAL into the database ([`super::Catalog::checkpoint`]),
//! so after one the WAL is empty and nothing depends on it.

use std::path::Path;

use anyhow::{Context, bail};
use rusqlite::{Connection, OpenFlags};

const WAL_HEADER: usize = 32;
const FRAME_HEADER: usize = 24;

/// What a write-ahead log holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WalReport {
    /// Frames SQLite will use (through the last valid commit).
    pub valid_frames: usize,
    /// The first frame of this log's generation that fails its checksum, if any.
    pub broken_at: Option<usize>,
    /// Commit frames of this generation after the broken one: transactions SQLite would drop.
    pub commits_lost: usize,
}

/// Reads a WAL file's frames and checksums (the format of sqlite.org/fileformat2.html).
pub fn inspect_wal(bytes: &[u8]) -> WalReport {
    let mut report = WalReport::default();
    if bytes.len() < WAL_HEADER {
        return report;
    }
    let magic = be32(&bytes[0..4]);
    let big_endian = match magic {
        0x377f0682 => false,
        0x377f0683 => true,
        _ => return report,
    };
    let page_size = match be32(&bytes[8..12]) {
        1 => 65536,
        n => n as usize,
    };
    if page_size < 512 || !page_size.is_power_of_two() {
        return report;
    }
    let salts = &bytes[16..24];
    let mut sum = checksum(&bytes[..24], (0, 0), big_endian);
    if sum != (be32(&bytes[24..28]), be32(&bytes[28..32])) {
        // A header that fails its own checksum: SQLite ignores the whole log.
        report.broken_at = Some(0);
        report.commits_lost = count_commits(bytes, page_size, salts, 0);
        return report;
    }
    let frame_len = FRAME_HEADER + page_size;
    let mut index = 0;
    let mut offset = WAL_HEADER;
    while offset + frame_len <= bytes.len() {
        let frame = &bytes[offset..offset + frame_len];
        if &frame[8..16] != salts {
            return report; // an older generation's frame: the log's live part ended
        }
        sum = checksum(&frame[..8], sum, big_endian);
        sum = checksum(&frame[FRAME_HEADER..], sum, big_endian);
        if sum != (be32(&frame[16..20]), be32(&frame[20..24])) {
            report.broken_at = Some(index);
            report.commits_lost = count_commits(bytes, page_size, salts, index + 1);
            return report;
        }
        index += 1;
        if be32(&frame[4..8]) != 0 {
            report.valid_frames = index;
        }
        offset += frame_len;
    }
    report
}

/// Commit frames with the log's salts from frame `from` on.
fn count_commits(bytes: &[u8], page_size: usize, salts: &[u8], from: usize) -> usize {
    let frame_len = FRAME_HEADER + page_size;
    let mut offset = WAL_HEADER + from * frame_len;
    let mut commits = 0;
    while offset + frame_len <= bytes.len() {
        let frame = &bytes[offset..offset + frame_len];
        if &frame[8..16] == salts && be32(&frame[4..8]) != 0 {
            commits += 1;
        }
        offset += frame_len;
    }
    commits
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

fn checksum(data: &[u8], (mut s0, mut s1): (u32, u32), big_endian: bool) -> (u32, u32) {
    let word = |b: &[u8]| {
        let a: [u8; 4] = b.try_into().unwrap();
        if big_endian { u32::from_be_bytes(a) } else { u32::from_le_bytes(a) }
    };
    for pair in data.chunks_exact(8) {
        s0 = s0.wrapping_add(word(&pair[..4])).wrapping_add(s1);
        s1 = s1.wrapping_add(word(&pair[4..])).wrapping_add(s0);
    }
    (s0, s1)
}

/// Checks the catalog at `path` before the daemon mounts (a missing one is fine: it will be
/// created). Errors name the file, what is wrong and what to do.
pub fn check(path: &Path) -> anyhow::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading the catalog {}", path.display())),
    };
    if !meta.is_file() {
        bail!(
            "the catalog {} is not a file (a {}); move it aside to start with an empty catalog",
            path.display(),
            if meta.is_dir() { "directory" } else { "special file" }
        );
    }
    let wal_path = sidecar(path, "-wal");
    let wal = match std::fs::read(&wal_path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", wal_path.display())),
    };
    let report = inspect_wal(&wal);
    if let Some(at) = report.broken_at
        && report.commits_lost > 0
    {
        bail!(
            "the catalog's write-ahead log {} is damaged at frame {at}: {} committed \
             transaction(s) after it would be silently dropped (pins, exclusions, \
             measurements). Restore it from a backup, or move {} aside to start from the \
             last checkpoint",
            wal_path.display(),
            report.commits_lost,
            wal_path.display()
        );
    }
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)
        .with_context(|| format!("opening the catalog {}", path.display()))?;
    let damaged = |what: String| {
        anyhow::anyhow!(
            "the catalog {} is damaged ({what}); restore it from a backup, or move catalog.db* \
             aside to start with an empty catalog",
            path.display()
        )
    };
    let tables: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
        .map_err(|e| damaged(e.to_string()))?;
    if tables == 0 && (meta.len() > 4096 || report.valid_frames == 0 && wal.len() > WAL_HEADER) {
        return Err(damaged(format!(
            "no tables, but its files hold {} bytes",
            meta.len() + wal.len() as u64
        )));
    }
    let verdict: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(|e| damaged(e.to_string()))?;
    if verdict != "ok" {
        return Err(damaged(verdict));
    }
    Ok(())
}

fn sidecar(path: &Path, suffix: &str) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    name.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A catalog killed before it could checkpoint: everything sits in the WAL.
    fn catalog_left_in_wal(dir: &Path) -> std::path::PathBuf {
        let path = dir.join("catalog.db");
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        conn.execute_batch("CREATE TABLE controls (path TEXT PRIMARY KEY, pin TEXT)").unwrap();
        for i in 0..20 {
            conn.execute("INSERT INTO controls VALUES (?1, 'original')", [format!("/bin/p{i}")])
                .unwrap();
        }
        // Leak the connection: no checkpoint at close, like a killed process.
        std::mem::forget(conn);
        path
    }

    #[test]
    fn an_intact_wal_is_fine_and_a_damaged_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = catalog_left_in_wal(dir.path());
        let wal_path = sidecar(&path, "-wal");
        let wal = std::fs::read(&wal_path).unwrap();
        let report = inspect_wal(&wal);
        assert!(report.valid_frames >= 20, "{report:?}");
        assert_eq!(report.broken_at, None);
        check(&path).unwrap();

        // One flipped byte in the first frame's page: SQLite would drop all 21 commits.
        let mut damaged = wal.clone();
        damaged[WAL_HEADER + FRAME_HEADER + 100] ^= 0xff;
        std::fs::write(&wal_path, &damaged).unwrap();
        let report = inspect_wal(&damaged);
        assert_eq!(report.broken_at, Some(0));
        assert!(report.commits_lost >= 20, "{report:?}");
        let err = format!("{:#}", check(&path).unwrap_err());
        assert!(err.contains("damaged at frame 0"), "{err}");
    }

    #[test]
    fn garbage_and_directories_are_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let err = format!("{:#}", check(&path).unwrap_err());
        assert!(err.contains("not a database") && err.contains("damaged"), "{err}");
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        let err = format!("{:#}", check(&path).unwrap_err());
        assert!(err.contains("is not a file (a directory)"), "{err}");
        check(&dir.path().join("missing.db")).unwrap();
    }
}
