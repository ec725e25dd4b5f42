//! Finding `llvm-bolt` and learning its version: the configured path, else the newest
//! `/usr/lib/llvm-*/bin/llvm-bolt`, else `llvm-bolt` on PATH. A missing BOLT is a state
//! ([`BoltState::Missing`]) that status shows, not an error to retry in a loop.
//!
//! `perf2bolt` is taken from the same directory as the chosen `llvm-bolt`, never through
//! the `/usr/bin/perf2bolt-19` symlink: that one runs as `llvm-bolt` (the tool dispatches on
//! its own name) and can overwrite its `-o` file with an ELF.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

/// A BOLT version as `llvm-bolt --version` prints it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BoltVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl BoltVersion {
    /// Reads "LLVM version 19.1.7" (also "Debian LLVM version 22.1.8") out of the output.
    pub fn parse(version_output: &str) -> Option<Self> {
        let rest = version_output.split("LLVM version").nth(1)?;
        let word = rest.split_whitespace().next()?;
        let mut parts = word.split(|c: char| !c.is_ascii_digit()).filter(|p| !p.is_empty());
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        let patch = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        Some(Self { major, minor, patch })
    }

    /// perf2bolt's "samples without branch stacks" flag: `-nl` up to LLVM 20, then renamed
    /// to `-ba` (`--basic-events`); 22 no longer accepts `-nl` (checked with
    /// `perf2bolt --help-hidden` of 19 and 22).
    pub fn perf2bolt_no_lbr_flag(&self) -> &'static str {
        if self.major <= 20 { "-nl" } else { "-ba" }
    }
}

impl std::fmt::Display for BoltVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// A usable BOLT installation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoltTool {
    pub llvm_bolt: PathBuf,
    /// `perf2bolt` next to `llvm-bolt`, when present.
    pub perf2bolt: Option<PathBuf>,
    pub version: BoltVersion,
}

impl BoltTool {
    /// Asks the binary at `llvm_bolt` for its version.
    pub fn probe(llvm_bolt: &Path) -> Result<Self, String> {
        let out = Command::new(llvm_bolt)
            .arg("--version")
            .output()
            .map_err(|e| format!("running {} --version: {e}", llvm_bolt.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let version = BoltVersion::parse(&text)
            .ok_or_else(|| format!("{} --version printed no LLVM version", llvm_bolt.display()))?;
        let perf2bolt = llvm_bolt.parent().map(|d| d.join("perf2bolt")).filter(|p| p.is_file());
        Ok(Self { llvm_bolt: llvm_bolt.to_path_buf(), perf2bolt, version })
    }
}

/// What discovery found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BoltState {
    Found(BoltTool),
    /// No usable `llvm-bolt`; `looked_in` lists the places tried, with why each failed.
    Missing {
        looked_in: Vec<String>,
    },
}

impl BoltState {
    pub fn tool(&self) -> Option<&BoltTool> {
        match self {
            BoltState::Found(t) => Some(t),
            BoltState::Missing { .. } => None,
        }
    }
}

/// Finds BOLT on this machine.
pub fn discover(configured: Option<&Path>) -> BoltState {
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let path_dirs: Vec<PathBuf> = std::env::split_paths(&path_var).collect();
    discover_in(configured, Path::new("/usr/lib"), &path_dirs)
}

/// [`discover`] with its search roots given (for tests).
pub fn discover_in(configured: Option<&Path>, lib_root: &Path, path_dirs: &[PathBuf]) -> BoltState {
    let mut looked_in = Vec::new();
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = configured {
        candidates.push(p.to_path_buf());
    } else {
        candidates.extend(llvm_versioned_bolts(lib_root));
        if candidates.is_empty() {
            looked_in.push(format!("{}/llvm-*/bin/llvm-bolt: none", lib_root.display()));
        }
        candidates.extend(path_dirs.iter().map(|d| d.join("llvm-bolt")));
    }
    for candidate in candidates {
        if !candidate.is_file() {
            looked_in.push(format!("{}: not found", candidate.display()));
            continue;
        }
        match BoltTool::probe(&candidate) {
            Ok(tool) => return BoltState::Found(tool),
            Err(e) => looked_in.push(e),
        }
    }
    BoltState::Missing { looked_in }
}

/// `<root>/llvm-N/bin/llvm-bolt` for every N, newest first.
fn llvm_versioned_bolts(lib_root: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(lib_root) else { return Vec::new() };
    let mut found: Vec<(u32, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n: u32 = name.strip_prefix("llvm-")?.parse().ok()?;
            let bolt = e.path().join("bin/llvm-bolt");
            bolt.is_file().then_some((n, bolt))
        })
        .collect();
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    found.into_iter().map(|(_, p)| p).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_debian_version_lines() {
        let v = BoltVersion::parse("Debian LLVM version 19.1.7\n  Optimized build.\n").unwrap();
        assert_eq!(v, BoltVersion { major: 19, minor: 1, patch: 7 });
        assert_eq!(v.perf2bolt_no_lbr_flag(), "-nl");
        let v = BoltVersion::parse("LLVM (http://llvm.org/):\n  LLVM version 22.1.8\n").unwrap();
        assert_eq!(v.to_string(), "22.1.8");
        assert_eq!(v.perf2bolt_no_lbr_flag(), "-ba");
        assert_eq!(BoltVersion::parse("llvm-bolt: unknown option"), None);
    }

    #[test]
    fn missing_bolt_is_a_state_listing_where_it_looked() {
        let empty = tempfile::tempdir().unwrap();
        let state = discover_in(None, empty.path(), &[empty.path().to_path_buf()]);
        let BoltState::Missing { looked_in } = state else { panic!("found BOLT in an empty dir") };
        assert_eq!(looked_in.len(), 2, "{looked_in:?}");
        let state = discover_in(Some(&empty.path().join("nope")), empty.path(), &[]);
        assert!(matches!(state, BoltState::Missing { .. }));
    }

    #[test]
    fn picks_the_newest_installed_llvm() {
        // Real installations on this machine: bolt-19 and bolt-22.
        let state = discover(None);
        let tool = state.tool().expect("BOLT is installed on this machine");
        assert!(tool.llvm_bolt.to_string_lossy().starts_with("/usr/lib/llvm-"), "{state:?}");
        let installed = llvm_versioned_bolts(Path::new("/usr/lib"));
        let newest: u32 = installed[0]
            .components()
            .find_map(|c| c.as_os_str().to_str()?.strip_prefix("llvm-")?.parse().ok())
            .unwrap();
        assert_eq!(tool.version.major, newest);
        assert_eq!(
            tool.perf2bolt.as_deref(),
            Some(tool.llvm_bolt.with_file_name("perf2bolt").as_path())
        );
    }
}
