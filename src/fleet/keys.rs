//! The Redis key layout. Every key of one binary identity carries the identity's sha256 as
//! a hash tag (`{...}`), so all of them live in one Redis Cluster slot and one pipeline can
//! read or write them. Only the index spans identities.
//!
//! | key | type | written by |
//! |---|---|---|
//! | `optbin:v1:index` | sorted set: identity sha256 -> last push (unix secs) | every writer |
//! | `optbin:v1:{SHA}:machines` | set of machine ids that wrote for SHA | every writer |
//! | `optbin:v1:{SHA}:profile:MACHINE` | string: MACHINE's profile contribution (TTL) | MACHINE only |
//! | `optbin:v1:{SHA}:verdicts:MACHINE` | string: MACHINE's verdicts on SHA's variants (TTL) | MACHINE only |
//!
//! "MACHINE only" is enforced by Redis ACL key patterns (docs/fleet.md), not by optbin.

use crate::identity::ContentId;

pub const INDEX: &str = "optbin:v1:index";

pub fn machines(content: &ContentId) -> String {
    format!("optbin:v1:{{{}}}:machines", content.hex())
}

pub fn profile(content: &ContentId, machine: &str) -> String {
    format!("optbin:v1:{{{}}}:profile:{machine}", content.hex())
}

pub fn verdicts(content: &ContentId, machine: &str) -> String {
    format!("optbin:v1:{{{}}}:verdicts:{machine}", content.hex())
}

/// Machine ids become parts of keys and ACL patterns: a small safe alphabet.
pub fn check_machine_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 64 {
        return Err("must be 1 to 64 characters".into());
    }
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
        return Err("may hold only letters, digits, '.', '_' and '-'".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_one_identity_share_a_hash_tag() {
        let c = ContentId::of_bytes(b"x");
        let tag = format!("{{{}}}", c.hex());
        for k in [machines(&c), profile(&c, "m1"), verdicts(&c, "m1")] {
            assert!(k.contains(&tag), "{k}");
            assert_eq!(k.matches('{').count(), 1, "{k}");
        }
        assert_eq!(profile(&c, "a-1"), format!("optbin:v1:{tag}:profile:a-1"));
    }

    #[test]
    fn machine_ids_are_key_safe() {
        assert!(check_machine_id("web-01.prod_a").is_ok());
        assert!(check_machine_id("").is_err());
        assert!(check_machine_id("a:b").is_err());
        assert!(check_machine_id("a*").is_err());
        assert!(check_machine_id(&"x".repeat(65)).is_err());
    }
}
