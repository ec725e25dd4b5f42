//! `.optbin/bins/NAME/variant-ID`: the bytes of each stored variant of NAME's current
//! content, so `optbin bench` (run by any user) can copy and run exactly that variant.
//!
//! The store itself is root-only (see `store`); this file is the documented way out. It is
//! offered only when the original is readable by everyone (mode `o+r`): a user who may not
//! read the original learns nothing about it from its variant either.

use std::os::unix::fs::PermissionsExt;

use rusqlite::Connection;

use crate::catalog::base;
use crate::control::BinFiles;

/// The file name prefix; the variant id follows.
pub const VARIANT_FILE_PREFIX: &str = "variant-";

/// Serves `variant-ID` files from the variant store.
pub struct VariantFiles;

fn world_readable_original(conn: &Connection, binary_id: i64) -> anyhow::Result<bool> {
    for path in crate::catalog::runs::paths_of_binary(conn, binary_id)? {
        if std::fs::metadata(&path).is_ok_and(|m| m.permissions().mode() & 0o004 != 0) {
            return Ok(true);
        }
    }
    Ok(false)
}

fn stored_variants(conn: &Connection, binary_id: i64) -> anyhow::Result<Vec<base::VariantRow>> {
    if !world_readable_original(conn, binary_id)? {
        return Ok(Vec::new());
    }
    Ok(base::variants_of(conn, binary_id)?
        .into_iter()
        .filter(|v| std::path::Path::new(&v.store_path).is_file())
        .collect())
}

impl BinFiles for VariantFiles {
    fn names(&self, conn: &Connection, binary_id: i64) -> Vec<String> {
        match stored_variants(conn, binary_id) {
            Ok(vs) => vs.iter().map(|v| format!("{VARIANT_FILE_PREFIX}{}", v.id)).collect(),
            Err(e) => {
                tracing::warn!(binary_id, error = %format!("{e:#}"), "listing variant files");
                Vec::new()
            }
        }
    }

    fn contents(
        &self,
        conn: &Connection,
        binary_id: i64,
        file: &str,
    ) -> anyhow::Result<Option<Vec<u8>>> {
        let Some(id) = file.strip_prefix(VARIANT_FILE_PREFIX).and_then(|s| s.parse::<i64>().ok())
        else {
            return Ok(None);
        };
        let Some(v) = stored_variants(conn, binary_id)?.into_iter().find(|v| v.id == id) else {
            return Ok(None);
        };
        let bytes = std::fs::read(&v.store_path)
            .map_err(|e| anyhow::anyhow!("reading variant {id} from {}: {e}", v.store_path))?;
        Ok(Some(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;
    use crate::catalog::base::{VariantKind, VariantState};
    use crate::elf::ElfFacts;
    use crate::identity::{ContentId, FileKey};

    #[test]
    fn variant_bytes_only_for_world_readable_originals() {
        let dir = tempfile::tempdir().unwrap();
        let original = dir.path().join("tool");
        std::fs::write(&original, b"original").unwrap();
        let stored = dir.path().join("stored");
        std::fs::write(&stored, b"variant bytes").unwrap();
        let cat = Catalog::in_memory().unwrap();
        let (o, s) = (original.clone(), stored.clone());
        let id = cat
            .run_blocking(move |c| {
                let content = ContentId::of_bytes(b"original");
                let b = base::upsert_binary(c, &content, 8, &ElfFacts::default(), 1)?;
                base::upsert_path(c, &o.to_string_lossy(), Some(b), &FileKey::of(&o)?, 1)?;
                let v = base::NewVariant {
                    binary_id: b,
                    kind: VariantKind::Bolt,
                    sha256: "x".into(),
                    store_path: s.to_string_lossy().into_owned(),
                    size: 13,
                    state: VariantState::Ready,
                    ..Default::default()
                };
                let vid = base::insert_variant(c, &v, 1)?;
                Ok((b, vid))
            })
            .unwrap();
        let (b, vid) = id;
        let name = format!("variant-{vid}");
        let n2 = name.clone();
        let (names, bytes, other) = cat
            .run_blocking(move |c| {
                Ok((
                    VariantFiles.names(c, b),
                    VariantFiles.contents(c, b, &n2)?,
                    VariantFiles.contents(c, b, "variant-999")?,
                ))
            })
            .unwrap();
        assert_eq!(names, vec![name.clone()]);
        assert_eq!(bytes.as_deref(), Some(&b"variant bytes"[..]));
        assert_eq!(other, None);

        std::fs::set_permissions(&original, std::fs::Permissions::from_mode(0o700)).unwrap();
        let (names, bytes) = cat
            .run_blocking(move |c| {
                Ok((VariantFiles.names(c, b), VariantFiles.contents(c, b, &name)?))
            })
            .unwrap();
        assert!(names.is_empty());
        assert_eq!(bytes, None);
    }
}
