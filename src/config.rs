//! Configuration: the config file (`/etc/optbin/config.toml`) merged with command-line flags,
//! then validated into a [`Config`] the daemon can trust (absolute, existing, non-overlapping
//! paths, every value in range).
//!
//! Three layers, as in ripgrep's flags: [`FileConfig`] is the file as written (every field
//! optional; an unknown key anywhere is an error that names the key and its section),
//! [`Overrides`] are the command-line flags, and [`Config::resolve`] merges them into the
//! validated [`Config`]. The file is parsed once, here: each subsystem's section is a typed
//! settings struct that lives with its domain (`profile::Settings` for `[profile]`,
//! `bolt::Settings` for `[optimizer]`, `policy::Settings` for `[policy]`, `warm::Settings`
//! for `[warm]`, `fuse::SupervisorSettings` for `[supervisor]`, `observe::MetricsSettings`
//! for `[metrics]`, `train::TrainSettings` for `[train]`), implements [`Section`] (its name and its own range checks), and is
//! handed down from [`Config`]. `[fleet]` is optional as a whole (absent: this machine
//! alone), so it is an `Option` checked with `fleet::FleetSettings::validate`.
//! A new section is one such struct plus one field in [`FileConfig`] and one in [`Config`].

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub const DEFAULT_MOUNTPOINT: &str = "/opt/optbin";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/optbin";
pub const DEFAULT_CONFIG_FILE: &str = "/etc/optbin/config.toml";

/// The config file as written by a person: every field optional.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub mountpoint: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    /// Directories to overlay, in PATH order. Default: the directories of `$PATH`.
    pub overlay: Option<Vec<PathBuf>>,
    /// A `tracing` filter, e.g. `info` or `optbin=debug`.
    pub log: Option<String>,
    /// Paths optbin must never touch: glob patterns (`*` within a name, `**` across names).
    #[serde(default)]
    pub deny: Vec<String>,
    /// When not empty, only paths matching one of these are candidates.
    #[serde(default)]
    pub allow: Vec<String>,
    /// `[profile]`: sampling, maturity, retention and instrumentation.
    #[serde(default)]
    pub profile: crate::profile::Settings,
    /// `[optimizer]`: how BOLT is found, run and limited, and which binaries are worth it.
    #[serde(default)]
    pub optimizer: crate::bolt::Settings,
    /// `[policy]`: measurement and promotion.
    #[serde(default)]
    pub policy: crate::policy::Settings,
    /// `[warm]`: keeping hot binaries in the page cache.
    #[serde(default)]
    pub warm: crate::warm::Settings,
    /// `[supervisor]`: crash limit and safe mode.
    #[serde(default)]
    pub supervisor: crate::fuse::SupervisorSettings,
    /// `[metrics]`: the Prometheus HTTP endpoint (`crate::observe`).
    #[serde(default)]
    pub metrics: crate::observe::MetricsSettings,
    /// `[fleet]`: sharing profiles and verdicts through Redis; absent = this machine alone.
    pub fleet: Option<crate::fleet::FleetSettings>,
    /// `[train]`: training commands (`crate::train`).
    #[serde(default)]
    pub train: crate::train::TrainSettings,
}

/// One `[section]` of the config file: a typed struct owned by its domain, parsed with
/// `#[serde(default, deny_unknown_fields)]` (every key optional, an unknown key an error),
/// and validated once by [`Config::resolve`].
pub trait Section: DeserializeOwned + Default {
    /// The section's name in the file, without brackets.
    const NAME: &'static str;
    /// Checks every value is in range; errors name the key.
    fn validate(&self) -> anyhow::Result<()>;
}

impl Section for crate::profile::Settings {
    const NAME: &'static str = "profile";
    fn validate(&self) -> anyhow::Result<()> {
        crate::profile::Settings::validate(self)
    }
}

impl Section for crate::bolt::Settings {
    const NAME: &'static str = "optimizer";
    fn validate(&self) -> anyhow::Result<()> {
        crate::bolt::Settings::validate(self)
    }
}

impl Section for crate::policy::Settings {
    const NAME: &'static str = "policy";
    fn validate(&self) -> anyhow::Result<()> {
        crate::policy::Settings::validate(self)
    }
}

impl Section for crate::warm::Settings {
    const NAME: &'static str = "warm";
    fn validate(&self) -> anyhow::Result<()> {
        crate::warm::Settings::validate(self)
    }
}

impl Section for crate::fuse::SupervisorSettings {
    const NAME: &'static str = "supervisor";
    fn validate(&self) -> anyhow::Result<()> {
        // Every value is usable: `apply` raises a zero crash limit or retry to one.
        Ok(())
    }
}

impl Section for crate::observe::MetricsSettings {
    const NAME: &'static str = "metrics";
    fn validate(&self) -> anyhow::Result<()> {
        crate::observe::MetricsSettings::validate(self)
    }
}

impl Section for crate::train::TrainSettings {
    const NAME: &'static str = "train";
    fn validate(&self) -> anyhow::Result<()> {
        crate::train::TrainSettings::validate(self)
    }
}

/// Parses the body of one section (the lines after its `[name]` header) and validates it:
/// for tests of a section on its own.
pub fn parse_section<T: Section>(name: &str, body: &str) -> anyhow::Result<T> {
    debug_assert_eq!(name, T::NAME);
    let s: T = toml::from_str(body)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("in the [{}] section of the config", T::NAME))?;
    s.validate()?;
    Ok(s)
}

impl FileConfig {
    /// Reads the file; a missing file at the default location is an empty config, a missing
    /// file the user named is an error.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let (path, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_FILE), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(Self::default());
            }
            Err(e) => {
                return Err(e).with_context(|| format!("reading config file {}", path.display()));
            }
        };
        Self::parse(&text).with_context(|| format!("parsing config file {}", path.display()))
    }

    /// Parses the text of a config file. Errors name the key and the section it is in
    /// (`in the [profile] section: unknown field `frequncy_hz`, expected one of ...`) and
    /// show the line.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        toml::from_str(text).map_err(|e| {
            let section = e.span().and_then(|span| section_at(text, span.start));
            match section {
                Some(name) => anyhow::anyhow!("in the [{name}] section: {e}"),
                None => anyhow::anyhow!("{e}"),
            }
        })
    }
}

/// The name of the `[table]` header that the byte `offset` of `text` falls under, if any.
fn section_at(text: &str, offset: usize) -> Option<String> {
    let before = text.get(..offset.min(text.len()))?;
    before.lines().rev().find_map(|line| {
        let line = line.trim();
        let name = line.strip_prefix('[')?.split(']').next()?.trim();
        (!name.is_empty() && !name.starts_with('[')).then(|| name.to_string())
    })
}

/// Validated configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub mountpoint: PathBuf,
    pub state_dir: PathBuf,
    /// Canonical, existing, deduplicated directories, in PATH order, none under the mount.
    pub overlay: Vec<PathBuf>,
    /// Directories that were asked for but left out, with the reason (shown in status).
    pub overlay_skipped: Vec<(PathBuf, String)>,
    pub log: String,
    pub deny: Vec<String>,
    pub allow: Vec<String>,
    /// The `deny` and `allow` patterns, compiled.
    #[serde(skip)]
    pub patterns: PathPatterns,
    /// `[profile]`, validated.
    pub profile: crate::profile::Settings,
    /// `[optimizer]`, validated (its scratch directory outside the state directory and the
    /// mount).
    pub optimizer: crate::bolt::Settings,
    /// `[policy]`, validated.
    pub policy: crate::policy::Settings,
    /// `[warm]`, validated.
    pub warm: crate::warm::Settings,
    /// `[supervisor]`, validated.
    pub supervisor: crate::fuse::SupervisorSettings,
    /// `[metrics]`, validated.
    pub metrics: crate::observe::MetricsSettings,
    /// `[fleet]` with its values checked (the credentials file and the machine id are
    /// read when the fleet starts); None: this machine alone.
    pub fleet: Option<crate::fleet::FleetSettings>,
    /// `[train]`, validated.
    pub train: crate::train::TrainSettings,
}

/// Validates a section, naming it in the error.
fn validated<T: Section>(section: T) -> anyhow::Result<T> {
    section.validate()?;
    Ok(section)
}

/// Flags given on the command line; they win over the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub mountpoint: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub overlay: Vec<PathBuf>,
    pub log: Option<String>,
}

impl Config {
    pub fn resolve(
        file: FileConfig,
        cli: Overrides,
        env_path: Option<&str>,
    ) -> anyhow::Result<Self> {
        let mountpoint =
            cli.mountpoint.or(file.mountpoint).unwrap_or_else(|| PathBuf::from(DEFAULT_MOUNTPOINT));
        if !mountpoint.is_absolute() {
            bail!("the mountpoint must be an absolute path, got {}", mountpoint.display());
        }
        let mountpoint = normalize(&mountpoint);
        let state_dir =
            cli.state_dir.or(file.state_dir).unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        if !state_dir.is_absolute() {
            bail!("the state directory must be an absolute path, got {}", state_dir.display());
        }
        if state_dir.starts_with(&mountpoint) {
            bail!(
                "the state directory {} must not be inside the mountpoint {}",
                state_dir.display(),
                mountpoint.display()
            );
        }
        let asked: Vec<PathBuf> = if !cli.overlay.is_empty() {
            cli.overlay
        } else if let Some(dirs) = file.overlay {
            dirs
        } else {
            std::env::split_paths(env_path.unwrap_or("")).collect()
        };
        let (overlay, overlay_skipped) = choose_overlay_dirs(&asked, &mountpoint);
        if overlay.is_empty() {
            bail!(
                "no directory to overlay: {}",
                if overlay_skipped.is_empty() {
                    "none was given (set --overlay or PATH)".to_string()
                } else {
                    overlay_skipped
                        .iter()
                        .map(|(d, why)| format!("{} ({why})", d.display()))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            );
        }
        let patterns = PathPatterns::new(&file.deny, &file.allow)?;
        let optimizer = validated(file.optimizer)?;
        if optimizer.scratch_dir.starts_with(&state_dir) {
            bail!(
                "[optimizer] scratch_dir {} must not be inside the state directory {} (the \
                 sandbox user cannot enter it)",
                optimizer.scratch_dir.display(),
                state_dir.display()
            );
        }
        if optimizer.scratch_dir.starts_with(&mountpoint) {
            bail!("[optimizer] scratch_dir must not be inside the mountpoint");
        }
        let fleet = match file.fleet {
            Some(fleet) => {
                fleet.validate()?;
                Some(fleet)
            }
            None => None,
        };
        Ok(Self {
            mountpoint,
            state_dir,
            overlay,
            overlay_skipped,
            log: cli.log.or(file.log).unwrap_or_else(|| "info".into()),
            deny: file.deny,
            allow: file.allow,
            patterns,
            profile: validated(file.profile)?,
            optimizer,
            policy: validated(file.policy)?,
            warm: validated(file.warm)?,
            supervisor: validated(file.supervisor)?,
            metrics: validated(file.metrics)?,
            fleet,
            train: validated(file.train)?,
        })
    }

    pub fn catalog_path(&self) -> PathBuf {
        self.state_dir.join("catalog.db")
    }

    pub fn pid_file(&self) -> PathBuf {
        self.state_dir.join("optbin.pid")
    }

    /// Whether allow/deny lists let optbin optimize `path` (they never hide it from PATH).
    pub fn permits(&self, path: &Path) -> bool {
        self.patterns.permits(path)
    }
}

/// The config's `deny` and `allow` path patterns, compiled once: `*` matches within one
/// path component, `**` across components (`globset` with `literal_separator`).
#[derive(Debug, Clone, Default)]
pub struct PathPatterns {
    deny: globset::GlobSet,
    allow: Option<globset::GlobSet>,
}

impl PathPatterns {
    /// Compiles the patterns; each must be an absolute path pattern.
    pub fn new(deny: &[String], allow: &[String]) -> anyhow::Result<Self> {
        let build = |patterns: &[String]| -> anyhow::Result<globset::GlobSet> {
            let mut set = globset::GlobSetBuilder::new();
            for pattern in patterns {
                if !pattern.starts_with('/') {
                    bail!("allow/deny patterns must be absolute path patterns, got {pattern:?}");
                }
                let glob = globset::GlobBuilder::new(pattern)
                    .literal_separator(true)
                    .backslash_escape(true)
                    .build()
                    .with_context(|| format!("the allow/deny pattern {pattern:?}"))?;
                set.add(glob);
            }
            set.build().context("compiling the allow/deny patterns")
        };
        Ok(Self {
            deny: build(deny)?,
            allow: if allow.is_empty() { None } else { Some(build(allow)?) },
        })
    }

    /// Whether any path is denied (an allow list alone denies nothing by pattern).
    pub fn denies_any(&self) -> bool {
        !self.deny.is_empty()
    }

    /// Whether `path` is allowed and not denied.
    pub fn permits(&self, path: &Path) -> bool {
        !self.deny.is_match(path) && self.allow.as_ref().is_none_or(|a| a.is_match(path))
    }
}

/// Keeps the directories that exist, canonical and deduplicated, never the mount or below it.
fn choose_overlay_dirs(
    asked: &[PathBuf],
    mountpoint: &Path,
) -> (Vec<PathBuf>, Vec<(PathBuf, String)>) {
    let mut chosen = Vec::new();
    let mut skipped = Vec::new();
    let mut seen = HashSet::new();
    for dir in asked {
        if dir.as_os_str().is_empty() || !dir.is_absolute() {
            skipped.push((dir.clone(), "not an absolute path".into()));
            continue;
        }
        if normalize(dir).starts_with(mountpoint) {
            skipped.push((dir.clone(), "inside the optbin mount".into()));
            continue;
        }
        let canonical = match std::fs::canonicalize(dir) {
            Ok(c) => c,
            Err(e) => {
                skipped.push((dir.clone(), format!("cannot be resolved: {e}")));
                continue;
            }
        };
        if canonical.starts_with(mountpoint) || mountpoint.starts_with(&canonical) {
            skipped.push((dir.clone(), "overlaps the optbin mount".into()));
            continue;
        }
        if !canonical.is_dir() {
            skipped.push((dir.clone(), "not a directory".into()));
            continue;
        }
        if seen.insert(canonical.clone()) {
            chosen.push(canonical);
        }
    }
    (chosen, skipped)
}

/// Removes `.` and `..` and duplicate slashes without touching the filesystem (the
/// mountpoint may be a dead FUSE mount that cannot be canonicalized).
/// Whether `path` is an entry of one of the overlaid directories `overlay` (directly in it:
/// the mirror serves a directory's own entries, not deeper ones).
pub fn in_overlaid_dir(overlay: &[PathBuf], path: &Path) -> bool {
    path.parent().is_some_and(|dir| overlay.iter().any(|o| o == dir))
}

pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_dirs_are_canonical_deduplicated_and_never_the_mount() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::create_dir(&a).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&a, &link).unwrap();
        let mnt = dir.path().join("mnt");
        let path = std::env::join_paths([
            mnt.join("bin"),
            a.clone(),
            link.clone(),
            dir.path().join("missing"),
            PathBuf::from("relative"),
        ])
        .unwrap();
        let cfg = Config::resolve(
            FileConfig::default(),
            Overrides {
                mountpoint: Some(mnt.clone()),
                state_dir: Some(dir.path().join("s")),
                ..Default::default()
            },
            Some(path.to_str().unwrap()),
        )
        .unwrap();
        assert_eq!(cfg.overlay, vec![std::fs::canonicalize(&a).unwrap()]);
        assert_eq!(cfg.overlay_skipped.len(), 3);
    }

    #[test]
    fn state_dir_inside_mount_is_refused() {
        let err = Config::resolve(
            FileConfig::default(),
            Overrides {
                mountpoint: Some("/opt/optbin".into()),
                state_dir: Some("/opt/optbin/state".into()),
                overlay: vec!["/usr/bin".into()],
                ..Default::default()
            },
            None,
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("must not be inside"));
    }

    fn glob_match(pattern: &str, path: &str) -> bool {
        PathPatterns::new(&[pattern.to_string()], &[]).unwrap().deny.is_match(path)
    }

    #[test]
    fn globs() {
        assert!(glob_match("/usr/sbin/*", "/usr/sbin/sshd"));
        assert!(!glob_match("/usr/sbin/*", "/usr/sbin/x/y"));
        assert!(glob_match("/usr/**", "/usr/sbin/x/y"));
        assert!(glob_match("/usr/bin/python3*", "/usr/bin/python3.11"));
        assert!(!glob_match("/usr/bin/python3*", "/usr/bin/perl"));
        let p = PathPatterns::new(&["/usr/sbin/*".into()], &["/usr/**".into()]).unwrap();
        assert!(!p.permits(Path::new("/usr/sbin/sshd")));
        assert!(p.permits(Path::new("/usr/bin/ls")));
        assert!(!p.permits(Path::new("/opt/x")));
        assert!(PathPatterns::new(&["usr/*".into()], &[]).is_err());
    }

    /// The hand-written matcher this replaced backtracked over every split of the text per
    /// star: this pattern took it exponential time on a path of 40 names.
    #[test]
    fn many_stars_match_in_linear_time() {
        let pattern = format!("/{}x", "**a".repeat(20));
        let path = format!("/{}", "a/".repeat(40));
        let started = std::time::Instant::now();
        assert!(!glob_match(&pattern, &path));
        assert!(started.elapsed() < std::time::Duration::from_secs(1), "{:?}", started.elapsed());
    }

    fn resolve(text: &str) -> anyhow::Result<Config> {
        Config::resolve(
            FileConfig::parse(text)?,
            Overrides {
                mountpoint: Some("/mnt/optbin-test".into()),
                state_dir: Some("/var/lib/optbin-test".into()),
                overlay: vec![std::env::temp_dir()],
                ..Default::default()
            },
            None,
        )
    }

    #[test]
    fn config_file_rejects_unknown_keys() {
        let err = FileConfig::parse("mountpont = \"/x\"").unwrap_err();
        assert!(err.to_string().contains("mountpont"));
    }

    #[test]
    fn an_unknown_key_in_a_section_is_named_with_its_section() {
        for (text, key, section) in [
            ("[profile]\nfrequncy_hz = 5\n", "frequncy_hz", "[profile]"),
            ("log = \"info\"\n[optimizer]\nmin_txt_bytes = 1\n", "min_txt_bytes", "[optimizer]"),
            (
                "[profile]\nmin_runs = 2\n\n[policy]\ncanary_shares = 0.2\n",
                "canary_shares",
                "[policy]",
            ),
            ("[warm]\nbudget_mb = 3\n", "budget_mb", "[warm]"),
            ("[supervisor]\nmax_crash = 3\n", "max_crash", "[supervisor]"),
            ("[metrics]\nlisten_on = \"127.0.0.1:1\"\n", "listen_on", "[metrics]"),
            (
                "[fleet]\nurl = \"redis://127.0.0.1:1\"\nintervl_secs = 1\n",
                "intervl_secs",
                "[fleet]",
            ),
            ("[train]\ncheck_sec = 3\n", "check_sec", "[train]"),
            ("[polcy]\nmeasure = false\n", "polcy", ""),
        ] {
            let err = format!("{:#}", resolve(text).unwrap_err());
            assert!(err.contains(key) && err.contains(section), "{text:?}: {err}");
        }
    }

    #[test]
    fn a_bad_value_is_named_with_its_key() {
        for (text, key) in [
            ("[profile]\nmin_samples = \"many\"\n", "min_samples"),
            ("[profile]\nfrequency_hz = 0\n", "frequency_hz"),
            ("[optimizer]\nmin_own_text_share = 2\n", "min_own_text_share"),
            ("[optimizer]\nscratch_dir = \"/var/lib/optbin-test/scratch\"\n", "scratch_dir"),
            ("[optimizer]\nscratch_dir = \"/mnt/optbin-test/x\"\n", "scratch_dir"),
            ("[policy]\nrescan_ms = 1\n", "rescan_ms"),
            ("[policy]\nmin_runs = -1\n", "min_runs"),
            ("[warm]\nbudget_mib = 8\nlock_mib = 16\n", "lock_mib"),
            ("[metrics]\nlisten = \"0.0.0.0:9187\"\n", "allow_remote"),
            ("[fleet]\nurl = \"redis://127.0.0.1:1\"\ninterval_secs = 0\n", "interval_secs"),
            ("[fleet]\nurl = \"redis://127.0.0.1:1\"\nmachine_id = \"a b\"\n", "machine_id"),
        ] {
            let err = format!("{:#}", resolve(text).unwrap_err());
            assert!(err.contains(key), "{text:?}: {err}");
        }
    }

    #[test]
    fn missing_sections_and_keys_are_the_domains_defaults() {
        let cfg = resolve("").unwrap();
        assert_eq!(cfg.profile, crate::profile::Settings::default());
        assert_eq!(cfg.optimizer, crate::bolt::Settings::default());
        assert_eq!(cfg.policy, crate::policy::Settings::default());
        assert_eq!(cfg.warm, crate::warm::Settings::default());
        assert_eq!(cfg.supervisor, crate::fuse::SupervisorSettings::default());
        assert_eq!(cfg.metrics, crate::observe::MetricsSettings::default());
        assert_eq!(cfg.fleet, None);
        assert_eq!(cfg.train, crate::train::TrainSettings::default());
        let cfg = resolve("[profile]\nmin_samples = 500\n").unwrap();
        assert_eq!(cfg.profile.thresholds().min_samples, 500);
        assert_eq!(cfg.profile.min_runs, crate::profile::Settings::default().min_runs);
    }
}
