//! Which files a benchmark runs: the binary and its variants as the mount's `status.json`
//! lists them, the original read from its real path, a variant read from
//! `<mount>/.optbin/bins/NAME/variant-ID` (checked against the sha256 status gives), each
//! copied into one private temporary directory under the binary's own file name.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::bench::Arm;
use crate::bench::files::VARIANT_FILE_PREFIX;
use crate::identity::ContentId;

/// The arms, ready to run. The temporary directory goes when this is dropped.
#[derive(Debug)]
pub struct Prepared {
    pub name: String,
    pub path: String,
    pub argv0: String,
    pub arms: Vec<super::Arm>,
    pub files: Vec<PathBuf>,
    _dir: tempfile::TempDir,
}

/// Reads and parses `<mount>/.optbin/status.json`.
pub fn read_status(mount: &Path) -> anyhow::Result<Value> {
    let file = mount.join(".optbin/status.json");
    let bytes = std::fs::read(&file).map_err(|e| {
        if e.raw_os_error() == Some(libc::ENOTCONN) {
            anyhow::anyhow!("the mount at {} is stale: its daemon died", mount.display())
        } else {
            anyhow::anyhow!(
                "reading {} (is optbin mounted at {}? --mount DIR names another): {e}",
                file.display(),
                mount.display()
            )
        }
    })?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", file.display()))
}

/// The status entry of `name` (a PATH-view name or an absolute path).
pub fn find_binary<'a>(status: &'a Value, name: &str) -> anyhow::Result<&'a Value> {
    let binaries = status["binaries"].as_array().map(Vec::as_slice).unwrap_or_default();
    let found = binaries.iter().find(|b| {
        if name.contains('/') {
            b["path"].as_str() == Some(name)
        } else {
            b["name"].as_str() == Some(name)
        }
    });
    match found {
        Some(b) => Ok(b),
        None => {
            let mut known: Vec<&str> = binaries
                .iter()
                .filter_map(|b| b["name"].as_str().filter(|n| !n.is_empty()))
                .collect();
            known.sort();
            let shown = known.iter().take(12).copied().collect::<Vec<_>>().join(", ");
            bail!(
                "optbin has not seen a binary named {name:?} (run it once through the mount); \
                 it knows: {shown}{}",
                if known.len() > 12 { ", ..." } else { "" }
            )
        }
    }
}

/// The variant id the mount serves for this binary (fully or as a canary), if any.
pub fn served_variant(binary: &Value) -> Option<i64> {
    let served = binary["served"].as_str()?;
    served.strip_prefix("variant ")?.split_whitespace().next()?.parse().ok()
}

fn write_copy(dir: &Path, sub: &str, file_name: &str, bytes: &[u8]) -> anyhow::Result<PathBuf> {
    let d = dir.join(sub);
    std::fs::create_dir(&d).with_context(|| format!("creating {}", d.display()))?;
    let p = d.join(file_name);
    std::fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
    Ok(p)
}

/// Finds the arms of `optbin bench NAME --against AGAINST [--aa]` and copies them.
pub fn prepare(mount: &Path, name: &str, against: &str, aa: bool) -> anyhow::Result<Prepared> {
    let status = read_status(mount)?;
    let binary = find_binary(&status, name)?;
    let path = binary["path"].as_str().context("status entry without a path")?.to_string();
    let view_name = binary["name"].as_str().unwrap_or_default().to_string();
    let sha = binary["sha256"]
        .as_str()
        .with_context(|| format!("{path} is not indexed yet; try again in a moment"))?
        .to_string();
    let file_name = Path::new(&path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .context("a binary path without a file name")?;
    let original = std::fs::read(&path).with_context(|| format!("reading {path}"))?;
    let got = ContentId::of_bytes(&original).hex();
    if got != sha {
        bail!("{path} changed since optbin indexed it (sha256 {got}, catalog {sha}); try again");
    }
    let variants = binary["variants"].as_array().map(Vec::as_slice).unwrap_or_default();
    let variant_id = match against {
        "original" => None,
        "served" => Some(served_variant(binary).with_context(|| {
            let ids: Vec<String> = variants
                .iter()
                .map(|v| format!("{} ({})", v["id"], v["state"].as_str().unwrap_or("?")))
                .collect();
            format!(
                "{name} is served its original now, so --against served has nothing to \
                 compare; name a variant with --against ID (variants: {})",
                if ids.is_empty() { "none".to_string() } else { ids.join(", ") }
            )
        })?),
        id => Some(id.parse::<i64>().map_err(|_| {
            anyhow::anyhow!("--against takes `served`, `original` or a variant id, got {id:?}")
        })?),
    };
    let dir = tempfile::Builder::new().prefix("optbin-bench").tempdir().context("a temp dir")?;
    let mut arms = vec![Arm { label: "original".into(), variant_id: None, sha256: sha.clone() }];
    let mut files = vec![write_copy(dir.path(), "original", &file_name, &original)?];
    match variant_id {
        None => {
            arms.push(Arm {
                label: "original (copy)".into(),
                variant_id: None,
                sha256: sha.clone(),
            });
            files.push(write_copy(dir.path(), "copy", &file_name, &original)?);
        }
        Some(id) => {
            let Some(v) = variants.iter().find(|v| v["id"].as_i64() == Some(id)) else {
                bail!("{name} has no variant {id}");
            };
            if view_name.is_empty() {
                bail!(
                    "{path} is not what PATH finds under its name, so the mount offers no \
                     variant files for it"
                );
            }
            let vfile = mount
                .join(".optbin/bins")
                .join(&view_name)
                .join(format!("{VARIANT_FILE_PREFIX}{id}"));
            let bytes = std::fs::read(&vfile).with_context(|| {
                format!("reading {} (the original must be readable by everyone)", vfile.display())
            })?;
            let want = v["sha256"].as_str().unwrap_or_default();
            let got = ContentId::of_bytes(&bytes).hex();
            if got != want {
                bail!("{} holds sha256 {got}, status says {want}", vfile.display());
            }
            arms.push(Arm { label: format!("variant {id}"), variant_id: Some(id), sha256: got });
            files.push(write_copy(dir.path(), &format!("variant-{id}"), &file_name, &bytes)?);
        }
    }
    if aa {
        arms.push(Arm {
            label: "original (A/A copy)".into(),
            variant_id: None,
            sha256: sha.clone(),
        });
        files.push(write_copy(dir.path(), "aa", &file_name, &original)?);
    }
    Ok(Prepared {
        name: if view_name.is_empty() { file_name.clone() } else { view_name },
        path,
        argv0: file_name,
        arms,
        files,
        _dir: dir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_binaries_and_the_served_variant() {
        let status = serde_json::json!({"binaries": [
            {"name": "lua", "path": "/usr/bin/lua", "served": "variant 4 for 50% of execs"},
            {"name": "", "path": "/usr/local/bin/lua", "served": "original"},
            {"name": "rg", "path": "/usr/bin/rg", "served": "variant 12"},
        ]});
        let lua = find_binary(&status, "lua").unwrap();
        assert_eq!(served_variant(lua), Some(4));
        assert_eq!(find_binary(&status, "/usr/local/bin/lua").unwrap()["served"], "original");
        assert_eq!(served_variant(find_binary(&status, "rg").unwrap()), Some(12));
        assert_eq!(served_variant(find_binary(&status, "/usr/local/bin/lua").unwrap()), None);
        let err = find_binary(&status, "nope").unwrap_err().to_string();
        assert!(err.contains("lua, rg"), "{err}");
    }
}
