//! The digest (sha256) of the profile each BOLT variant was built from.
//!
//! Kept beside the variant row so that a verdict shared with the fleet names its inputs
//! exactly: the original's content, BOLT's version, the flags, and these profile bytes.
//! Variants built before this column existed, and instrumented builds (which have no
//! profile yet), have none.

use std::collections::HashMap;

use rusqlite::{Connection, params};

use crate::identity::ContentId;

pub const SCHEMA: &str = r#"
ALTER TABLE variants ADD COLUMN profile_digest TEXT;
"#;

pub fn set(conn: &Connection, variant_id: i64, digest: &ContentId) -> anyhow::Result<()> {
    conn.execute(
        "UPDATE variants SET profile_digest = ?2 WHERE id = ?1",
        params![variant_id, digest.hex()],
    )?;
    Ok(())
}

/// Variant id -> profile digest, for the variants of one binary that have one.
pub fn of_binary(conn: &Connection, binary_id: i64) -> anyhow::Result<HashMap<i64, ContentId>> {
    let mut stmt = conn.prepare(
        "SELECT id, profile_digest FROM variants
         WHERE binary_id = ?1 AND profile_digest IS NOT NULL",
    )?;
    let rows =
        stmt.query_map([binary_id], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
    let mut out = HashMap::new();
    for row in rows {
        let (id, text) = row?;
        // The column is only written from a ContentId; anything else is not a digest.
        if let Some(digest) = ContentId::parse(&text) {
            out.insert(id, digest);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::base::{self, NewVariant};

    #[test]
    fn a_variants_profile_digest_is_kept_and_read_back() {
        let cat = crate::catalog::Catalog::in_memory().unwrap();
        cat.run_blocking(|c| {
            let bid = base::upsert_binary(
                c,
                &ContentId::of_bytes(b"orig"),
                1,
                &crate::elf::ElfFacts::default(),
                1,
            )?;
            let variant = |sha: &[u8]| NewVariant {
                binary_id: bid,
                kind: base::VariantKind::Bolt,
                sha256: ContentId::of_bytes(sha).hex(),
                state: base::VariantState::Ready,
                ..Default::default()
            };
            let with = base::insert_variant(c, &variant(b"v1"), 1)?;
            let without = base::insert_variant(c, &variant(b"v2"), 1)?;
            let digest = ContentId::of_bytes(b"profile bytes");
            set(c, with, &digest)?;
            let read = of_binary(c, bid)?;
            assert_eq!(read.get(&with), Some(&digest));
            assert!(!read.contains_key(&without));
            Ok(())
        })
        .unwrap();
    }
}
