//! Configuration: the config file (`/etc/optbin/config.toml`) merged with command-line flags,
//! then validated into a [`Config`] the daemon can trust (absolute, existing, non-overlapping
//! paths).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
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
    /// `[profile]`: sampling and maturity settings (parsed by the profiler's wiring).
    pub profile: Option<toml::Table>,
    /// `[optimizer]`: BOLT settings (parsed by the optimizer's wiring).
    pub optimizer: Option<toml::Table>,
    /// `[policy]`: measurement and promotion settings (parsed by the policy's wiring).
    pub policy: Option<toml::Table>,
    /// `[warm]`: keeping hot binaries in the page cache.
    #[serde(default)]
    pub warm: crate::warm::Settings,
    /// `[supervisor]`: crash limit and safe mode.
    pub supervisor: Option<crate::fuse::SupervisorSettings>,
    /// `[metrics]`: the Prometheus HTTP endpoint (`crate::observe`).
    pub metrics: Option<crate::observe::MetricsSettings>,
    /// `[fleet]`: sharing profiles and verdicts through Redis; absent = this machine alone.
    pub fleet: Option<crate::fleet::FleetSettings>,
    /// `[train]`: training commands (`crate::train`).
    #[serde(default)]
    pub train: crate::train::TrainSettings,
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
        toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
    }
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
    /// Raw subsystem sections; each subsystem's wiring parses and validates its own.
    pub sections: Sections,
    /// `[warm]`, validated.
    pub warm: crate::warm::Settings,
    pub supervisor: crate::fuse::SupervisorSettings,
    pub metrics: crate::observe::MetricsSettings,
    pub fleet: Option<crate::fleet::FleetSettings>,
    /// `[train]`, validated.
    pub train: crate::train::TrainSettings,
}

/// The subsystem sections of the config file, as written.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sections {
    pub profile: toml::Table,
    pub optimizer: toml::Table,
    pub policy: toml::Table,
}

impl Sections {
    /// Parses a section into its settings type (unknown keys are errors when the type says
    /// `deny_unknown_fields`).
    pub fn parse<T: serde::de::DeserializeOwned>(
        table: &toml::Table,
        name: &str,
    ) -> anyhow::Result<T> {
        T::deserialize(toml::Value::Table(table.clone()))
            .with_context(|| format!("in the [{name}] section of the config"))
    }
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
        for pattern in file.deny.iter().chain(&file.allow) {
            if !pattern.starts_with('/') {
                bail!("allow/deny patterns must be absolute path patterns, got {pattern:?}");
            }
        }
        file.warm.validate()?;
        file.train.validate()?;
        Ok(Self {
            mountpoint,
            state_dir,
            overlay,
            overlay_skipped,
            log: cli.log.or(file.log).unwrap_or_else(|| "info".into()),
            deny: file.deny,
            allow: file.allow,
            sections: Sections {
                profile: file.profile.unwrap_or_default(),
                optimizer: file.optimizer.unwrap_or_default(),
                policy: file.policy.unwrap_or_default(),
            },
            warm: file.warm,
            supervisor: file.supervisor.unwrap_or_default(),
            metrics: {
                let m = file.metrics.unwrap_or_default();
                m.validate()?;
                m
            },
            fleet: file.fleet,
            train: file.train,
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
        let text = path.to_string_lossy();
        if self.deny.iter().any(|p| glob_match(p, &text)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|p| glob_match(p, &text))
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

/// Path globbing: `*` matches within one path component, `**` across components.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    fn go(p: &[u8], t: &[u8]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some((b'*', rest)) if rest.first() == Some(&b'*') => {
                let rest = &rest[1..];
                (0..=t.len()).any(|i| go(rest, &t[i..]))
            }
            Some((b'*', rest)) => {
                let limit = t.iter().position(|&c| c == b'/').unwrap_or(t.len());
                (0..=limit).any(|i| go(rest, &t[i..]))
            }
            Some((&c, rest)) => t.first() == Some(&c) && go(rest, &t[1..]),
        }
    }
    go(pattern.as_bytes(), text.as_bytes())
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

    #[test]
    fn globs() {
        assert!(glob_match("/usr/sbin/*", "/usr/sbin/sshd"));
        assert!(!glob_match("/usr/sbin/*", "/usr/sbin/x/y"));
        assert!(glob_match("/usr/**", "/usr/sbin/x/y"));
        assert!(glob_match("/usr/bin/python3*", "/usr/bin/python3.11"));
        assert!(!glob_match("/usr/bin/python3*", "/usr/bin/perl"));
    }

    #[test]
    fn config_file_rejects_unknown_keys() {
        let err = toml::from_str::<FileConfig>("mountpont = \"/x\"").unwrap_err();
        assert!(err.to_string().contains("mountpont"));
    }
}
