//! Training files: `/etc/optbin/train.d/*.toml`, one command each, parsed into a typed
//! [`TrainCommand`] (unknown keys are errors that name the key).
//!
//! ```toml
//! binary = "lua"                       # a PATH-view name or an absolute path
//! args = ["bench.lua", "--quick"]      # the arguments (argv[0] is the binary's name)
//! dir = "/srv/lua-bench"               # working directory [default: /]
//! env = { LANG = "C" }                 # added to a minimal environment
//! user = "nobody"                      # who runs it [default: nobody]
//! timeout_secs = 60                    # killed after this [default: 60]
//! runs = 5                             # runs per round while it is needed [default: 1]
//! ```
//!
//! Running as root is refused unless the file says `user = "root"` *and* is owned by root
//! and writable by nobody else: otherwise anyone who can write the file could run commands
//! as root.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;

/// The file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrainFile {
    binary: String,
    #[serde(default)]
    args: Vec<String>,
    dir: Option<PathBuf>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    user: Option<String>,
    timeout_secs: Option<u64>,
    runs: Option<u32>,
}

/// A validated training command.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TrainCommand {
    /// The file it came from.
    pub file: PathBuf,
    pub binary: String,
    pub args: Vec<String>,
    pub dir: PathBuf,
    pub env: BTreeMap<String, String>,
    pub user: String,
    pub uid: u32,
    pub gid: u32,
    pub timeout_secs: u64,
    /// Runs per round while the binary needs runs.
    pub runs: u32,
}

pub const DEFAULT_USER: &str = "nobody";
pub const DEFAULT_TIMEOUT_SECS: u64 = 60;

/// A user's uid and primary gid (`getpwnam_r`).
pub fn lookup_user(name: &str) -> anyhow::Result<(u32, u32)> {
    let cname = std::ffi::CString::new(name).context("a user name with a NUL byte")?;
    // libc: rustix has no user database lookup (getpwnam_r goes through NSS).
    // SAFETY: getpwnam_r with a buffer we own; the result points into it, and only the
    // plain uid and gid are copied out while the buffer lives.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let r =
            libc::getpwnam_r(cname.as_ptr(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result);
        if r != 0 || result.is_null() {
            bail!("no user named {name:?} on this machine");
        }
        Ok((pwd.pw_uid, pwd.pw_gid))
    }
}

/// Parses and validates one training file.
pub fn load(file: &Path) -> anyhow::Result<TrainCommand> {
    let meta = std::fs::metadata(file).with_context(|| format!("reading {}", file.display()))?;
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let raw: RawTrainFile =
        toml::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
    validate(file, raw, meta.uid(), meta.mode())
}

fn validate(file: &Path, raw: RawTrainFile, owner: u32, mode: u32) -> anyhow::Result<TrainCommand> {
    let at = file.display();
    if raw.binary.is_empty() {
        bail!("{at}: `binary` is empty");
    }
    let user = raw.user.unwrap_or_else(|| DEFAULT_USER.to_string());
    let (uid, gid) = lookup_user(&user).with_context(|| format!("{at}: `user`"))?;
    if uid == 0 {
        if owner != 0 {
            bail!(
                "{at}: `user = \"{user}\"` runs the command as root, but the file is owned by \
                 uid {owner}: only a root-owned file may ask for root"
            );
        }
        if mode & 0o022 != 0 {
            bail!(
                "{at}: `user = \"{user}\"` runs the command as root, but the file is writable \
                 by group or others (mode {:o})",
                mode & 0o7777
            );
        }
    }
    let dir = raw.dir.unwrap_or_else(|| PathBuf::from("/"));
    if !dir.is_absolute() {
        bail!("{at}: `dir` must be an absolute path, got {}", dir.display());
    }
    let timeout_secs = raw.timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS);
    if !(1..=86_400).contains(&timeout_secs) {
        bail!("{at}: `timeout_secs` must be 1 to 86400, got {timeout_secs}");
    }
    let runs = raw.runs.unwrap_or(1);
    if !(1..=1000).contains(&runs) {
        bail!("{at}: `runs` must be 1 to 1000, got {runs}");
    }
    Ok(TrainCommand {
        runs,
        file: file.to_path_buf(),
        binary: raw.binary,
        args: raw.args,
        dir,
        env: raw.env,
        user,
        uid,
        gid,
        timeout_secs,
    })
}

/// Every `*.toml` in `dir`, in name order: the valid commands and, per bad file, why.
pub fn load_dir(dir: &Path) -> (Vec<TrainCommand>, Vec<(PathBuf, String)>) {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return (Vec::new(), vec![(dir.to_path_buf(), format!("reading it: {e}"))]),
    };
    files.sort();
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for f in files {
        match load(&f) {
            Ok(c) => ok.push(c),
            Err(e) => bad.push((f, format!("{e:#}"))),
        }
    }
    (ok, bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, owner: u32, mode: u32) -> anyhow::Result<TrainCommand> {
        let raw: RawTrainFile = toml::from_str(text)?;
        validate(Path::new("/etc/optbin/train.d/t.toml"), raw, owner, mode)
    }

    #[test]
    fn a_full_file_parses_with_defaults() {
        let c =
            parse("binary = \"lua\"\nargs = [\"x.lua\"]\nenv = { A = \"1\" }\n", 0, 0o644).unwrap();
        assert_eq!(c.binary, "lua");
        assert_eq!(c.args, ["x.lua"]);
        assert_eq!(c.user, "nobody");
        assert_eq!((c.uid, c.dir.as_path()), (65534, Path::new("/")));
        assert_eq!(c.timeout_secs, DEFAULT_TIMEOUT_SECS);
        assert_eq!(c.env["A"], "1");
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = parse("binary = \"lua\"\nargv = [\"x\"]\n", 0, 0o644).unwrap_err();
        assert!(format!("{err:#}").contains("unknown field `argv`"), "{err:#}");
    }

    #[test]
    fn root_only_from_a_root_owned_file_nobody_else_can_write() {
        assert!(parse("binary = \"x\"\nuser = \"root\"\n", 0, 0o644).is_ok());
        let err = parse("binary = \"x\"\nuser = \"root\"\n", 1000, 0o644).unwrap_err();
        assert!(err.to_string().contains("owned by uid 1000"), "{err}");
        let err = parse("binary = \"x\"\nuser = \"root\"\n", 0, 0o666).unwrap_err();
        assert!(err.to_string().contains("writable by group or others"), "{err}");
        assert!(parse("binary = \"x\"\nuser = \"nobody\"\n", 1000, 0o666).is_ok());
        let err = parse("binary = \"x\"\nuser = \"no-such-user-here\"\n", 0, 0o644).unwrap_err();
        assert!(format!("{err:#}").contains("no user named"), "{err:#}");
        let err = parse("binary = \"x\"\ndir = \"rel\"\n", 0, 0o644).unwrap_err();
        assert!(err.to_string().contains("absolute"), "{err}");
    }
}
