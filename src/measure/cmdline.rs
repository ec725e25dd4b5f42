//! The command-line hash that lets runs of the same command be compared with each other.

use sha2::{Digest, Sha256};

/// The hash used when the command line could not be read (the process was already gone
/// when its exec was handled): such runs form one "unknown command" class of their own.
pub const UNKNOWN_CMD: &str = "unknown";

/// The hash of a run whose command line was deliberately not read: a bound run outside the
/// sample that reads it (see `crate::daemon::serving::binding`). Reading `/proc/PID/cmdline`
/// takes the new process's memory-map lock just when its dynamic loader maps its libraries:
/// measured at 2-3% of a small program's exec+exit, more than everything else a bound exec
/// costs. The safety checks compare such a run with the original's runs of every command.
pub const UNREAD_CMD: &str = "unread";

/// sha256 of the argv strings joined with NULs, as 16 hex digits (64 bits: collisions are
/// irrelevant at the scale of one machine's commands). `raw` is `/proc/PID/cmdline` as
/// read: NUL-terminated strings; the trailing NUL is dropped so both spellings agree.
pub fn cmd_hash(raw: &[u8]) -> String {
    let trimmed = raw.strip_suffix(b"\0").unwrap_or(raw);
    if trimmed.is_empty() {
        return UNKNOWN_CMD.to_string();
    }
    let digest = Sha256::digest(trimmed);
    hex::encode(&digest[..8])
}

/// Hash of an argv given as strings (tests and tools that know the arguments).
pub fn cmd_hash_of_args<S: AsRef<[u8]>>(args: &[S]) -> String {
    let mut raw = Vec::new();
    for a in args {
        raw.extend_from_slice(a.as_ref());
        raw.push(0);
    }
    cmd_hash(&raw)
}

/// Reads `/proc/PID/cmdline`; `None` when the process is gone. A zombie reads as empty.
pub fn read_cmdline(pid: i32) -> Option<Vec<u8>> {
    std::fs::read(format!("/proc/{pid}/cmdline")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_args_equal_hash_different_args_differ() {
        assert_eq!(cmd_hash(b"ls\0-l\0"), cmd_hash(b"ls\0-l"));
        assert_eq!(cmd_hash(b"ls\0-l\0"), cmd_hash_of_args(&["ls", "-l"]));
        assert_ne!(cmd_hash(b"ls\0-l\0"), cmd_hash(b"ls\0-la\0"));
        // Joining with NULs keeps argument boundaries: "a b" is not "a", "b".
        assert_ne!(cmd_hash_of_args(&["a b"]), cmd_hash_of_args(&["a", "b"]));
        assert_eq!(cmd_hash(b""), UNKNOWN_CMD);
        assert_eq!(cmd_hash(b"ls\0").len(), 16);
    }
}
