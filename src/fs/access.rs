//! Who asks, and which real directories they may pass through.
//!
//! The kernel checks permissions itself on the mount (`default_permissions`) against the
//! attributes the overlay presents, and the mirrors present each real directory's own mode
//! and owner: a `0700` overlay dir, or a `0700` directory on the way to one, stops the same
//! users through the mount as on the real path. The PATH view (`<mount>/bin/NAME`) is the
//! one place where the answer depends on who asks: like PATH lookup, a user who may not
//! search the first directory holding NAME gets the next one they may search (or ENOENT).
//! Such answers are never cached by the kernel (entry TTL 0).
//!
//! The check reads each directory's POSIX ACL where it has one (the kernel's rules, in
//! [`super::acl`]), else its mode bits (owner, group including supplementary groups,
//! others). The kernel's own check on the mirrors reads the same ACLs (`FUSE_POSIX_ACL`).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::acl;

/// The credentials a FUSE request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// Where the supplementary groups are read from (`/proc/PID/status`) when needed.
    pub pid: u32,
}

impl Caller {
    /// Root: may search everything (CAP_DAC_OVERRIDE), sees what the daemon sees.
    pub const ROOT: Caller = Caller { uid: 0, gid: 0, pid: 0 };

    /// The caller's supplementary groups (empty when the process is gone).
    fn groups(&self) -> Vec<u32> {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", self.pid)) else {
            return Vec::new();
        };
        status
            .lines()
            .find_map(|l| l.strip_prefix("Groups:"))
            .map(|g| g.split_whitespace().filter_map(|n| n.parse().ok()).collect())
            .unwrap_or_default()
    }
}

/// Whether every directory from `/` down to `dir` may be searched by everyone (the others'
/// `x` bit, and no ACL that could name a user or group to stop): then no caller needs
/// checking.
pub fn searchable_by_all(dir: &Path) -> bool {
    dir.ancestors().all(|d| {
        std::fs::metadata(d).is_ok_and(|m| m.mode() & 0o001 != 0)
            && matches!(acl::read(d, acl::ACCESS), Ok(None))
    })
}

/// Whether `caller` may search every directory from `/` down to `dir`.
pub fn may_search(caller: &Caller, dir: &Path) -> bool {
    if caller.uid == 0 {
        return true;
    }
    let mut groups: Option<Vec<u32>> = None;
    dir.ancestors().all(|d| {
        let Ok(md) = std::fs::metadata(d) else { return false };
        match acl::read(d, acl::ACCESS) {
            Ok(Some(value)) => {
                let groups = groups.get_or_insert_with(|| caller.groups());
                let asker = acl::Asker { uid: caller.uid, gid: caller.gid, groups };
                let owner = acl::Owner { uid: md.uid(), gid: md.gid() };
                if let Some(allowed) = acl::allows(&value, owner, &asker, 0o1) {
                    return allowed;
                }
            }
            Ok(None) => {}
            // Unreadable ACL: refuse rather than guess more rights than the kernel gives.
            Err(_) => return false,
        }
        let bit = if md.uid() == caller.uid {
            0o100
        } else if md.gid() == caller.gid
            || groups.get_or_insert_with(|| caller.groups()).contains(&md.gid())
        {
            0o010
        } else {
            0o001
        };
        md.mode() & bit != 0
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn search_rights_follow_the_mode_bits_of_every_directory_on_the_way() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let deep = root.join("locked/deep/bin");
        std::fs::create_dir_all(&deep).unwrap();
        let open = root.join("open/bin");
        std::fs::create_dir_all(&open).unwrap();
        let set = |p: &Path, m| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m));
        set(&root.join("locked"), 0o700).unwrap();
        let nobody = Caller { uid: 65534, gid: 65534, pid: u32::MAX };
        let me = std::fs::metadata(&root).unwrap();
        let owner = Caller { uid: me.uid(), gid: 12345, pid: u32::MAX };
        // The ancestors of the temp dir may be searchable by all or not, depending on where
        // it is: compare with what they are.
        let above = searchable_by_all(&root);
        assert_eq!(searchable_by_all(&open), above);
        assert!(!searchable_by_all(&deep), "a 0700 dir two levels up");
        assert!(!may_search(&nobody, &deep));
        assert_eq!(may_search(&nobody, &open), above);
        assert!(may_search(&Caller::ROOT, &deep));
        if owner.uid != 0 {
            assert!(may_search(&owner, &deep));
        }
        set(&root.join("locked"), 0o701).unwrap();
        assert_eq!(may_search(&nobody, &deep), above, "the others' x bit is enough");
    }
}
