//! POSIX ACLs of the real files and directories, so that the mount lets each user reach
//! exactly what the real path lets them reach.
//!
//! Two places need them:
//! - The kernel checks permissions on the mount itself (`default_permissions`). With
//!   `FUSE_POSIX_ACL` negotiated at INIT it also reads each node's ACL with a GETXATTR of
//!   `system.posix_acl_access` (cached in the inode until the node is invalidated), and the
//!   overlay answers it from the real file or directory the node mirrors ([`read`]). A
//!   `u:nobody:---` entry on a `0755` directory then stops nobody on the mount as on the
//!   real path, and a `u:alice:r-x` entry on a `0700` one lets alice through.
//! - The PATH view (`<mount>/bin/NAME`) decides per caller which real directory serves a
//!   name; [`allows`] evaluates an ACL for that decision the way the kernel does
//!   (POSIX.1e: owner, named users, then the owning and named groups under the mask, then
//!   others).
//!
//! The value is the kernel's own binary form (`posix_acl_xattr`: a little-endian version
//! 2 header, then 8-byte entries of tag, permission and id), passed through untouched.

use std::io;
use std::path::Path;

/// The access ACL: the one permission checks use.
pub const ACCESS: &str = "system.posix_acl_access";
/// The default ACL of a directory (what new entries inherit): shown, never used here.
pub const DEFAULT: &str = "system.posix_acl_default";

const VERSION: u32 = 2;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;

/// Whether `name` is one of the ACL attributes the overlay mirrors.
pub fn is_acl(name: &std::ffi::OsStr) -> bool {
    name == ACCESS || name == DEFAULT
}

/// The ACL attribute `name` of `path` (following symlinks), or None when it has none (its
/// mode bits say everything) or the filesystem has no ACLs.
pub fn read(path: &Path, name: &str) -> io::Result<Option<Vec<u8>>> {
    // An ACL is at most a few hundred bytes; grow if the kernel says it is larger.
    let mut buf = vec![0u8; 512];
    loop {
        // A path with a NUL byte fails with EINVAL, as before the call.
        match rustix::fs::getxattr(path, name, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(Some(buf));
            }
            Err(e) if e == rustix::io::Errno::NODATA || e == rustix::io::Errno::NOTSUP => {
                return Ok(None);
            }
            Err(e) if e == rustix::io::Errno::RANGE && buf.len() < 1 << 20 => {
                buf.resize(buf.len() * 4, 0)
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Who asks, for [`allows`].
#[derive(Debug, Clone, Copy)]
pub struct Asker<'a> {
    pub uid: u32,
    pub gid: u32,
    pub groups: &'a [u32],
}

/// The file an ACL belongs to: its owner and group (the ACL's owner and owning-group
/// entries carry no id; they mean these).
#[derive(Debug, Clone, Copy)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// Whether the ACL `acl` of a file owned by `owner` grants `asker` every bit of `want`
/// (`0o4` read, `0o2` write, `0o1` execute/search), as the kernel decides
/// (`posix_acl_permission`). None when `acl` is not a well-formed ACL: the caller then
/// decides by the mode bits.
pub fn allows(acl: &[u8], owner: Owner, asker: &Asker, want: u16) -> Option<bool> {
    let entries = parse(acl)?;
    let mask = entries.iter().find(|e| e.0 == MASK).map(|e| e.1);
    let masked = |perm: u16| mask.map_or(perm, |m| perm & m);
    let grants = |perm: u16| perm & want == want;
    if asker.uid == owner.uid {
        return entries.iter().find(|e| e.0 == USER_OBJ).map(|e| grants(e.1));
    }
    if let Some(e) = entries.iter().find(|e| e.0 == USER && e.2 == asker.uid) {
        return Some(grants(masked(e.1)));
    }
    let in_group = |gid: u32| asker.gid == gid || asker.groups.contains(&gid);
    let mut group_matched = false;
    for e in &entries {
        let matches = match e.0 {
            GROUP_OBJ => in_group(owner.gid),
            GROUP => in_group(e.2),
            _ => false,
        };
        if matches {
            group_matched = true;
            if grants(masked(e.1)) {
                return Some(true);
            }
        }
    }
    if group_matched {
        return Some(false);
    }
    entries.iter().find(|e| e.0 == OTHER).map(|e| grants(e.1))
}

/// (tag, perm, id) entries.
fn parse(acl: &[u8]) -> Option<Vec<(u16, u16, u32)>> {
    let (head, body) = acl.split_at_checked(4)?;
    if u32::from_le_bytes(head.try_into().ok()?) != VERSION || body.len() % 8 != 0 {
        return None;
    }
    Some(
        body.chunks_exact(8)
            .map(|e| {
                let tag = u16::from_le_bytes([e[0], e[1]]);
                let perm = u16::from_le_bytes([e[2], e[3]]);
                let id = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
                (tag, perm, id)
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut v = VERSION.to_le_bytes().to_vec();
        for (tag, perm, id) in entries {
            v.extend_from_slice(&tag.to_le_bytes());
            v.extend_from_slice(&perm.to_le_bytes());
            v.extend_from_slice(&id.to_le_bytes());
        }
        v
    }

    const X: u16 = 0o1;

    #[test]
    fn named_users_groups_mask_and_others_decide_as_the_kernel_does() {
        // Like `setfacl -m u:1000:---,g:50:r-x,m::r-x` on a dir of root:root 0755.
        let a = acl(&[
            (USER_OBJ, 7, u32::MAX),
            (USER, 0, 1000),
            (GROUP_OBJ, 5, u32::MAX),
            (GROUP, 5, 50),
            (MASK, 5, u32::MAX),
            (OTHER, 5, u32::MAX),
        ]);
        let root = Owner { uid: 0, gid: 0 };
        let ask = |uid, gid, groups: &[u32]| allows(&a, root, &Asker { uid, gid, groups }, X);
        assert_eq!(ask(0, 0, &[]), Some(true), "the owner");
        assert_eq!(ask(1000, 1000, &[]), Some(false), "a named user with no rights");
        assert_eq!(ask(1000, 50, &[]), Some(false), "a named user entry wins over groups");
        assert_eq!(ask(2000, 2000, &[50]), Some(true), "a named group, supplementary");
        assert_eq!(ask(3000, 3000, &[]), Some(true), "others");
    }

    #[test]
    fn the_mask_limits_named_entries_and_a_matched_group_without_rights_denies() {
        // A 0700 dir where u:1000:r-x is granted but the mask allows only r.
        let a = acl(&[
            (USER_OBJ, 7, u32::MAX),
            (USER, 5, 1000),
            (GROUP_OBJ, 0, u32::MAX),
            (MASK, 4, u32::MAX),
            (OTHER, 1, u32::MAX),
        ]);
        let owner = Owner { uid: 0, gid: 100 };
        let ask = |uid, gid| allows(&a, owner, &Asker { uid, gid, groups: &[] }, X);
        assert_eq!(ask(1000, 1000), Some(false), "masked to r--");
        assert_eq!(ask(2000, 100), Some(false), "the owning group matched and has no x");
        assert_eq!(ask(2000, 2000), Some(true), "others have x");
        let unmasked = acl(&[(USER_OBJ, 7, 0), (USER, 5, 1000), (GROUP_OBJ, 0, 0), (OTHER, 0, 0)]);
        let asker = Asker { uid: 1000, gid: 1, groups: &[] };
        assert_eq!(allows(&unmasked, Owner { uid: 0, gid: 0 }, &asker, X), Some(true));
    }

    #[test]
    fn malformed_values_are_not_guessed() {
        let (ask, o) = (Asker { uid: 1, gid: 1, groups: &[] }, Owner { uid: 0, gid: 0 });
        assert_eq!(allows(b"", o, &ask, X), None);
        assert_eq!(allows(&[1, 0, 0, 0], o, &ask, X), None, "version 1");
        assert_eq!(allows(&[2, 0, 0, 0, 1, 0], o, &ask, X), None, "a torn entry");
    }

    #[test]
    fn a_file_without_an_acl_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path(), ACCESS).unwrap(), None);
        let missing = read(&dir.path().join("missing"), ACCESS).unwrap_err();
        assert_eq!(missing.raw_os_error(), Some(libc::ENOENT));
    }
}
