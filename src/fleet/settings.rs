//! The `[fleet]` section of the config file and the credentials file it names.
//!
//! Without `[fleet]` the machine works alone. With it, the daemon refuses to start when the
//! credentials file is not owned by root or is readable by group or others: a leaked writer
//! password lets anyone poison every machine's profiles.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// `[fleet]` as written in `/etc/optbin/config.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSettings {
    /// One `redis://host:port/db` URL, or several (the seed nodes of a Redis Cluster);
    /// `rediss://` for TLS (all of them or none).
    pub url: Urls,
    /// PEM file of the certificate authority that signed the Redis servers' certificates,
    /// for `rediss://` URLs. Default: the system's trusted roots.
    pub ca_file: Option<PathBuf>,
    /// File holding the ACL user and password (`username = "..."`, `password = "..."`);
    /// must be owned by root and not readable by group or others.
    pub credentials: Option<PathBuf>,
    /// `read-write` (push this machine's profile and verdicts) or `read` (use the fleet's,
    /// never write).
    #[serde(default)]
    pub mode: Mode,
    /// This machine's id in the fleet (letters, digits, `.`, `_`, `-`; up to 64).
    /// Default: `/etc/machine-id`.
    pub machine_id: Option<String>,
    /// Seconds between two rounds of pushing and pulling.
    #[serde(default = "defaults::interval_secs")]
    pub interval_secs: f64,
    /// Timeout of one Redis round trip, in milliseconds.
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
    /// Days a machine's profile contribution lives without being refreshed (Redis TTL).
    #[serde(default = "defaults::profile_ttl_days")]
    pub profile_ttl_days: f64,
    /// Days a machine's verdicts live without being refreshed (Redis TTL).
    #[serde(default = "defaults::verdict_ttl_days")]
    pub verdict_ttl_days: f64,
    /// The largest share of the merged profile any one machine may hold (0.05..=1).
    #[serde(default = "defaults::max_machine_share")]
    pub max_machine_share: f64,
    /// Largest value read or written, in bytes: bigger ones are refused (reads) or trimmed
    /// to their hottest entries (writes). This is the per-binary, per-machine size cap.
    #[serde(default = "defaults::max_value_bytes")]
    pub max_value_bytes: usize,
    /// Contributions merged per binary at most (a random sample beyond that).
    #[serde(default = "defaults::max_machines")]
    pub max_machines: usize,
    /// Pushes waiting while Redis is unreachable, at most (the newest per binary is kept;
    /// beyond this the oldest binaries' pushes wait for the next collection).
    #[serde(default = "defaults::queue_limit")]
    pub queue_limit: usize,
    /// Machines that must have rejected a variant of the same inputs before this machine
    /// stops building it.
    #[serde(default = "defaults::reject_quorum")]
    pub reject_quorum: usize,
}

mod defaults {
    pub fn interval_secs() -> f64 {
        15.0
    }
    pub fn timeout_ms() -> u64 {
        2_000
    }
    pub fn profile_ttl_days() -> f64 {
        14.0
    }
    pub fn verdict_ttl_days() -> f64 {
        90.0
    }
    pub fn max_machine_share() -> f64 {
        0.5
    }
    pub fn max_value_bytes() -> usize {
        1 << 20
    }
    pub fn max_machines() -> usize {
        256
    }
    pub fn queue_limit() -> usize {
        4096
    }
    pub fn reject_quorum() -> usize {
        2
    }
}

/// One URL or a list of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Urls {
    One(String),
    Many(Vec<String>),
}

impl Urls {
    pub fn list(&self) -> Vec<String> {
        match self {
            Urls::One(u) => vec![u.clone()],
            Urls::Many(v) => v.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    #[default]
    ReadWrite,
    Read,
}

impl Mode {
    pub fn writes(self) -> bool {
        self == Mode::ReadWrite
    }
}

/// The ACL user and password (never logged, never in status).
#[derive(Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub username: Option<String>,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<hidden>")
            .finish()
    }
}

/// Settings checked and completed: what the fleet task runs with.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub settings: FleetSettings,
    pub urls: Vec<String>,
    pub machine: String,
    pub credentials: Option<Credentials>,
    /// The `ca_file`'s certificates (PEM), checked to hold at least one.
    pub ca_pem: Option<Vec<u8>>,
}

impl Resolved {
    pub fn interval(&self) -> Duration {
        Duration::from_secs_f64(self.settings.interval_secs)
    }
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.settings.timeout_ms)
    }
    pub fn profile_ttl_secs(&self) -> u64 {
        (self.settings.profile_ttl_days * 86_400.0) as u64
    }
    pub fn verdict_ttl_secs(&self) -> u64 {
        (self.settings.verdict_ttl_days * 86_400.0) as u64
    }
}

impl FleetSettings {
    /// Checks every value (URLs, ranges, the machine id when set) without reading any file;
    /// the error names the key and says what to fix.
    pub fn validate(&self) -> anyhow::Result<()> {
        let urls = self.url.list();
        if urls.is_empty() {
            bail!("[fleet] url: give at least one redis:// URL");
        }
        let tls = urls.iter().filter(|u| u.starts_with("rediss://")).count();
        if tls != 0 && tls != urls.len() {
            bail!("[fleet] url: either every URL is rediss:// (TLS) or none is");
        }
        if self.ca_file.is_some() && tls == 0 {
            bail!("[fleet] ca_file is for TLS: give rediss:// URLs, or remove ca_file");
        }
        for u in &urls {
            if !(u.starts_with("redis://") || u.starts_with("rediss://")) {
                bail!("[fleet] url {u:?}: must start with redis:// (or rediss:// for TLS)");
            }
            if url_has_password(u) {
                bail!(
                    "[fleet] url: put the password in the credentials file, not in the URL \
                     (the config file is readable by everyone)"
                );
            }
        }
        let positive = |v: f64, name: &str| {
            if v.is_finite() && v > 0.0 { Ok(()) } else { bail!("[fleet] {name} must be > 0") }
        };
        positive(self.interval_secs, "interval_secs")?;
        positive(self.profile_ttl_days, "profile_ttl_days")?;
        positive(self.verdict_ttl_days, "verdict_ttl_days")?;
        if !(0.05..=1.0).contains(&self.max_machine_share) {
            bail!("[fleet] max_machine_share must be within 0.05..=1");
        }
        if self.max_value_bytes < 4096 || self.max_value_bytes > 64 << 20 {
            bail!("[fleet] max_value_bytes must be within 4096..=67108864");
        }
        if self.max_machines == 0 || self.queue_limit == 0 || self.reject_quorum == 0 {
            bail!("[fleet] max_machines, queue_limit and reject_quorum must be >= 1");
        }
        if self.timeout_ms == 0 {
            bail!("[fleet] timeout_ms must be >= 1");
        }
        if let Some(machine) = &self.machine_id {
            super::keys::check_machine_id(machine)
                .map_err(|why| anyhow::anyhow!("[fleet] machine_id {machine:?}: {why}"))?;
        }
        Ok(())
    }

    /// Validates the settings, reads the machine id and the credentials file (checking its
    /// owner and mode). Every error says what to fix.
    pub fn resolve(&self) -> anyhow::Result<Resolved> {
        self.validate()?;
        let urls = self.url.list();
        let machine = match &self.machine_id {
            Some(m) => m.clone(),
            None => std::fs::read_to_string("/etc/machine-id")
                .context("[fleet] machine_id is not set and /etc/machine-id is unreadable")?
                .trim()
                .to_string(),
        };
        super::keys::check_machine_id(&machine)
            .map_err(|why| anyhow::anyhow!("[fleet] machine_id {machine:?}: {why}"))?;
        let credentials = match &self.credentials {
            Some(path) => Some(read_credentials(path)?),
            None => None,
        };
        let ca_pem = match &self.ca_file {
            Some(path) => Some(read_ca(path)?),
            None => None,
        };
        Ok(Resolved { settings: self.clone(), urls, machine, credentials, ca_pem })
    }
}

/// `redis://user:password@host` carries a password.
fn url_has_password(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or("");
    authority.split_once('@').is_some_and(|(userinfo, _)| userinfo.contains(':'))
}

/// Reads the CA file: PEM with at least one certificate (a certificate is public: no owner
/// or mode check).
fn read_ca(path: &Path) -> anyhow::Result<Vec<u8>> {
    let pem = std::fs::read(path)
        .with_context(|| format!("[fleet] reading the ca_file {}", path.display()))?;
    if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
        bail!("[fleet] the ca_file {} holds no PEM certificate", path.display());
    }
    Ok(pem)
}

/// Reads the credentials file after checking it is root's and private.
pub fn read_credentials(path: &Path) -> anyhow::Result<Credentials> {
    let md = std::fs::metadata(path)
        .with_context(|| format!("[fleet] credentials file {}", path.display()))?;
    check_private(path, md.uid(), md.mode())?;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("[fleet] reading the credentials file {}", path.display()))?;
    // The parse error may quote the file: name the file and the key only.
    let creds: Credentials = toml::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "[fleet] the credentials file {} must hold `password = \"...\"` and optionally \
             `username = \"...\"` ({})",
            path.display(),
            e.message()
        )
    })?;
    if creds.password.is_empty() {
        bail!("[fleet] the credentials file {} has an empty password", path.display());
    }
    Ok(creds)
}

/// Owned by root, no permission bits for group or others.
pub fn check_private(path: &Path, uid: u32, mode: u32) -> anyhow::Result<()> {
    if uid != 0 {
        bail!(
            "refusing to start: the fleet credentials file {} is owned by uid {uid}, not root \
             (fix: chown root:root {})",
            path.display(),
            path.display()
        );
    }
    if mode & 0o077 != 0 {
        bail!(
            "refusing to start: the fleet credentials file {} has mode {:o}: group or others \
             may read it (fix: chmod 600 {})",
            path.display(),
            mode & 0o7777,
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<FleetSettings> {
        Ok(toml::from_str(text)?)
    }

    #[test]
    fn one_or_several_urls_and_defaults() {
        let s = parse("url = \"redis://h:1/0\"\nmachine_id = \"m1\"").unwrap();
        assert_eq!(s.mode, Mode::ReadWrite);
        assert_eq!(s.resolve().unwrap().urls, vec!["redis://h:1/0"]);
        let s =
            parse("url = [\"redis://a:1\", \"redis://b:2\"]\nmode = \"read\"\nmachine_id = \"m\"")
                .unwrap();
        assert_eq!(s.url.list().len(), 2);
        assert!(!s.mode.writes());
    }

    #[test]
    fn tls_is_all_urls_or_none_and_a_ca_file_needs_it() {
        let bad = |text: &str| format!("{:#}", parse(text).unwrap().resolve().unwrap_err());
        let mixed = "url = [\"rediss://a:1\", \"redis://b:2\"]\nmachine_id = \"m\"";
        assert!(bad(mixed).contains("every URL is rediss://"), "{}", bad(mixed));
        let plain_with_ca = "url = \"redis://a:1\"\nmachine_id = \"m\"\nca_file = \"/x\"";
        assert!(bad(plain_with_ca).contains("ca_file is for TLS"));
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("ca.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let ca = format!("url = \"rediss://a:1\"\nmachine_id = \"m\"\nca_file = {not_pem:?}");
        assert!(bad(&ca).contains("holds no PEM certificate"), "{}", bad(&ca));
        let tls = parse("url = \"rediss://a:1/0\"\nmachine_id = \"m\"").unwrap();
        assert_eq!(tls.resolve().unwrap().ca_pem, None);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let err = parse("url = \"redis://h\"\nmachine = \"x\"").unwrap_err();
        assert!(format!("{err:#}").contains("machine"), "{err:#}");
        let err = parse("url = \"redis://h\"\nmode = \"write\"").unwrap_err();
        assert!(format!("{err:#}").contains("write"), "{err:#}");
        let bad = |t: &str| parse(t).unwrap().resolve().unwrap_err().to_string();
        assert!(bad("url = \"http://h\"\nmachine_id = \"m\"").contains("redis://"));
        assert!(bad("url = \"redis://u:pw@h\"\nmachine_id = \"m\"").contains("credentials file"));
        assert!(bad("url = \"redis://h\"\nmachine_id = \"a b\"").contains("machine_id"));
        assert!(
            bad("url = \"redis://h\"\nmachine_id = \"m\"\nmax_machine_share = 0")
                .contains("max_machine_share")
        );
    }

    #[test]
    fn credentials_must_be_roots_and_private() {
        let p = Path::new("/etc/optbin/fleet.secret");
        assert!(check_private(p, 0, 0o100600).is_ok());
        let e = check_private(p, 1000, 0o100600).unwrap_err().to_string();
        assert!(e.contains("owned by uid 1000") && e.contains("chown"), "{e}");
        let e = check_private(p, 0, 0o100644).unwrap_err().to_string();
        assert!(e.contains("mode 644") && e.contains("chmod 600"), "{e}");
        assert!(check_private(p, 0, 0o100640).is_err());
    }

    #[test]
    fn credentials_file_is_parsed_and_its_secret_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("secret");
        std::fs::write(&f, "username = \"m1\"\npassword = \"hunter2\"\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        // The tests run as root (the daemon needs it); elsewhere only the owner check fails.
        if rustix::process::geteuid().is_root() {
            let c = read_credentials(&f).unwrap();
            assert_eq!(c.username.as_deref(), Some("m1"));
            assert!(!format!("{c:?}").contains("hunter2"));
            std::fs::write(&f, "user = \"m1\"\npassword = \"hunter2\"\n").unwrap();
            let e = format!("{:#}", read_credentials(&f).unwrap_err());
            assert!(e.contains("user") && !e.contains("hunter2"), "{e}");
        }
    }
}
