//! Profiles that survive upgrades: every successful BOLT build also writes its profile in
//! BOLT's YAML format (`-w`, block hashes of the input binary); that YAML is kept per path
//! (not per content), root-only under `<state_dir>/stale-profiles/`. When the content at a
//! path changes (a package upgrade, a rebuild), the new version is built at once from the
//! previous version's YAML with `-infer-stale-profile` (BOLT matches functions by name and
//! blocks by hash, and infers counts for changed functions), and the canary decides as for
//! any variant. The new version's own profile replaces the bridge later: a stale build is
//! recorded as built from [`STALE_PROFILE_SAMPLES`] samples, so any own mature profile is
//! "twice as big" for the retry policy.
//!
//! Both BOLT versions on the project's machines (19 and 22) take `-w` while optimizing from
//! fdata, detect a YAML profile given to `-data=` by its content, and accept
//! `-infer-stale-profile` (which changes nothing for a profile of the same binary).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::identity::ContentId;

/// The profile size a stale build is recorded with (see the module doc).
pub const STALE_PROFILE_SAMPLES: u64 = 1;

/// What a stale build's request says of its profile: the previous version's profile was
/// judged worth a build; this version's own share of the samples is not known yet.
pub const STALE_PROFILE_NUMBERS: super::ProfileNumbers =
    super::ProfileNumbers { samples: STALE_PROFILE_SAMPLES, own_text_share: 1.0, front_end: None };

/// Where BOLT writes the YAML profile of a build whose output is `output`.
pub fn yaml_beside(output: &Path) -> PathBuf {
    output.with_extension("yaml")
}

/// What is known about a kept YAML profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptProfile {
    /// The path whose binary it describes.
    pub path: String,
    /// The content (sha256) of the binary it was written for.
    pub sha256: String,
    /// `llvm-bolt --version` of the build that wrote it.
    pub bolt_version: String,
}

/// A kept profile offered to a new version of its path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleSource {
    /// The YAML file (root-only; the runner copies it into the job's scratch directory).
    pub yaml: PathBuf,
    pub kept: KeptProfile,
}

impl StaleSource {
    /// For this content: None when the profile was written for this very content.
    pub fn for_content(&self, current: &str) -> Option<&Self> {
        (self.kept.sha256 != current).then_some(self)
    }
}

/// The kept YAML profiles, one per path.
#[derive(Debug, Clone)]
pub struct StaleProfiles {
    dir: PathBuf,
}

impl StaleProfiles {
    /// `<state_dir>/stale-profiles` (created root-only on first use).
    pub fn in_state_dir(state_dir: &Path) -> Self {
        Self { dir: state_dir.join("stale-profiles") }
    }

    fn key(path: &str) -> String {
        hex::encode(&Sha256::digest(path.as_bytes())[..16])
    }

    fn files(&self, path: &str) -> (PathBuf, PathBuf) {
        let key = Self::key(path);
        (self.dir.join(format!("{key}.yaml")), self.dir.join(format!("{key}.json")))
    }

    /// Keeps `yaml` (BOLT's output, in a scratch dir the sandbox user owns: read, never
    /// trusted beyond being a profile) as the profile of `path` at `content`, replacing
    /// the one kept before.
    pub fn keep(
        &self,
        path: &str,
        content: &ContentId,
        bolt_version: &str,
        yaml: &Path,
    ) -> anyhow::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let bytes = {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(yaml)
                .with_context(|| format!("opening {}", yaml.display()))?;
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut std::io::BufReader::new(f), &mut v)?;
            v
        };
        anyhow::ensure!(bytes.starts_with(b"---"), "{} is not a YAML profile", yaml.display());
        let meta = KeptProfile {
            path: path.to_string(),
            sha256: content.hex(),
            bolt_version: bolt_version.to_string(),
        };
        let (yaml_dst, meta_dst) = self.files(path);
        write_atomically(&yaml_dst, &bytes)?;
        write_atomically(&meta_dst, &serde_json::to_vec(&meta)?)?;
        Ok(())
    }

    /// The profile kept for `path`, when it was written for another content than
    /// `current` (the same content has its own profile).
    pub fn previous_version(&self, path: &str, current: &ContentId) -> Option<StaleSource> {
        let (yaml, meta) = self.files(path);
        let meta: KeptProfile = serde_json::from_slice(&std::fs::read(meta).ok()?).ok()?;
        (meta.path == path && meta.sha256 != current.hex() && yaml.is_file())
            .then_some(StaleSource { yaml, kept: meta })
    }

    /// Every kept profile, by path (one directory listing: the maturity driver asks once
    /// per scan instead of once per binary).
    pub fn kept(&self) -> HashMap<String, StaleSource> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return HashMap::new() };
        let mut out = HashMap::new();
        for entry in entries.flatten() {
            let meta_file = entry.path();
            if meta_file.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let Some(kept) = std::fs::read(&meta_file)
                .ok()
                .and_then(|b| serde_json::from_slice::<KeptProfile>(&b).ok())
            else {
                continue;
            };
            let (yaml, meta) = self.files(&kept.path);
            if meta == meta_file && yaml.is_file() {
                out.insert(kept.path.clone(), StaleSource { yaml, kept });
            }
        }
        out
    }

    /// Forgets the profile kept for `path` (`reset NAME`).
    pub fn forget(&self, path: &str) {
        let (yaml, meta) = self.files(path);
        let _ = std::fs::remove_file(yaml);
        let _ = std::fs::remove_file(meta);
    }
}

fn write_atomically(dst: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = dst.with_extension("tmp");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dst).with_context(|| format!("renaming to {}", dst.display()))?;
    Ok(())
}

/// How a stale build's profile is recorded in its flags (the variant's `flags` column,
/// which status shows and nothing rewrites): `-data=<stale profile of version 1a2b3c4d5e6f>`.
const DATA_FLAG_PREFIX: &str = "-data=<stale profile of version ";

/// The old content's short sha256 (12 hex digits).
fn short_version(kept: &KeptProfile) -> &str {
    &kept.sha256[..12.min(kept.sha256.len())]
}

/// The recorded `-data=` flag of a build from `kept` (see [`DATA_FLAG_PREFIX`]).
pub fn data_flag(kept: &KeptProfile) -> String {
    format!("{DATA_FLAG_PREFIX}{}>", short_version(kept))
}

/// The previous version a build's recorded flags say its profile came from, if any.
pub fn version_in_flags(flags: &str) -> Option<&str> {
    let rest = &flags[flags.find(DATA_FLAG_PREFIX)? + DATA_FLAG_PREFIX.len()..];
    Some(&rest[..rest.find('>')?])
}

/// What status and the event log say of a stale build: which version's profile, and how
/// it matched when BOLT said.
pub fn describe(version: &str, matched: Option<StaleMatch>) -> String {
    match matched {
        Some(m) => format!("built from the stale profile of version {version} ({})", m.text()),
        None => format!("built from the stale profile of version {version}"),
    }
}

/// [`describe`] for a build from `kept`.
pub fn note(kept: &KeptProfile, matched: Option<StaleMatch>) -> String {
    describe(short_version(kept), matched)
}

/// How a stale profile matched the new binary, read from BOLT's output: functions with a
/// profile, of all functions, and how many of those had to be inferred (changed since).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StaleMatch {
    pub profiled: u64,
    pub functions: u64,
    pub inferred: u64,
}

impl StaleMatch {
    /// Parses `BOLT-INFO: 10 out of 14 functions in the binary (71.4%) have non-empty
    /// execution profile` and `BOLT-INFO: inferred profile for 1 (...` lines.
    pub fn parse(output: &str) -> Option<Self> {
        let mut m = StaleMatch::default();
        let mut seen = false;
        for line in output.lines() {
            if let Some(rest) = line.strip_prefix("BOLT-INFO: ")
                && rest.contains("functions in the binary")
                && rest.contains("non-empty execution profile")
            {
                let words: Vec<&str> = rest.split_whitespace().collect();
                if let (Some(a), Some(b)) = (words.first(), words.get(3)) {
                    m.profiled = a.parse().ok()?;
                    m.functions = b.parse().ok()?;
                    seen = true;
                }
            } else if let Some(rest) = line.strip_prefix("BOLT-INFO: inferred profile for ") {
                m.inferred = rest.split_whitespace().next()?.parse().ok()?;
            }
        }
        seen.then_some(m)
    }

    pub fn text(&self) -> String {
        format!(
            "{} of {} functions have a profile, {} of them inferred after changes",
            self.profiled, self.functions, self.inferred
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_per_path_and_offered_only_to_another_content() {
        let dir = tempfile::tempdir().unwrap();
        let stale = StaleProfiles::in_state_dir(dir.path());
        let yaml = dir.path().join("out.yaml");
        std::fs::write(&yaml, "---\nheader:\n").unwrap();
        let (v1, v2) = (ContentId::of_bytes(b"v1"), ContentId::of_bytes(b"v2"));
        assert!(stale.previous_version("/usr/bin/x", &v2).is_none(), "nothing kept");
        stale.keep("/usr/bin/x", &v1, "22.1.8", &yaml).unwrap();
        assert!(stale.previous_version("/usr/bin/x", &v1).is_none(), "same content");
        let source = stale.previous_version("/usr/bin/x", &v2).unwrap();
        assert_eq!(std::fs::read_to_string(&source.yaml).unwrap(), "---\nheader:\n");
        assert_eq!(source.kept.sha256, v1.hex());
        let kept = stale.kept();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept["/usr/bin/x"], source);
        assert!(kept["/usr/bin/x"].for_content(&v1.hex()).is_none());
        assert!(kept["/usr/bin/x"].for_content(&v2.hex()).is_some());
        assert!(stale.previous_version("/usr/bin/y", &v2).is_none(), "another path");
        std::fs::write(&yaml, "not yaml").unwrap();
        assert!(stale.keep("/usr/bin/x", &v2, "22", &yaml).is_err());
        stale.forget("/usr/bin/x");
        assert!(stale.previous_version("/usr/bin/x", &v2).is_none());
    }

    #[test]
    fn the_version_is_recorded_in_the_flags() {
        let kept = KeptProfile {
            path: "/usr/bin/x".into(),
            sha256: ContentId::of_bytes(b"v1").hex(),
            bolt_version: "22.1.8".into(),
        };
        let flags = format!("{} -infer-stale-profile -dyno-stats", data_flag(&kept));
        assert_eq!(version_in_flags(&flags), Some(&kept.sha256[..12]));
        assert_eq!(version_in_flags("-data=<profile> -dyno-stats"), None);
        assert!(note(&kept, None).ends_with(&kept.sha256[..12]));
    }

    #[test]
    fn the_match_is_read_from_bolts_output() {
        let out = "BOLT-INFO: pre-processing profile using YAML profile reader\n\
                   BOLT-INFO: 10 out of 14 functions in the binary (71.4%) have non-empty execution profile\n\
                   BOLT-WARNING: 1 (10.0% of all profiled) function have invalid (possibly stale) profile.\n\
                   BOLT-INFO: inferred profile for 1 (10.00% of profiled, 100.00% of stale) functions responsible for 50.00% samples\n";
        assert_eq!(
            StaleMatch::parse(out),
            Some(StaleMatch { profiled: 10, functions: 14, inferred: 1 })
        );
        assert_eq!(StaleMatch::parse("nothing"), None);
    }
}
