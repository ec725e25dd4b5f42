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

/// Who may search every directory from `/` down to `dir`, from one reading of each
/// directory (its attributes and its ACL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SearchRights {
    /// Everyone: the others' `x` bit on every directory and no ACL that could name a user
    /// or group to stop. Then no caller needs checking, and the answer may be cached.
    pub by_all: bool,
    /// The caller asked about.
    pub by_caller: bool,
}

/// One directory on the way, as read once.
struct Step {
    md: std::fs::Metadata,
    /// Its access ACL; Err when it could not be read.
    acl: Result<Option<Vec<u8>>, ()>,
}

impl Step {
    fn searchable_by_all(&self) -> bool {
        self.md.mode() & 0o001 != 0 && matches!(self.acl, Ok(None))
    }
}

pub fn search_rights(caller: &Caller, dir: &Path) -> SearchRights {
    let mut steps = Vec::new();
    for d in dir.ancestors() {
        let Ok(md) = std::fs::metadata(d) else {
            return SearchRights { by_all: false, by_caller: false };
        };
        steps.push(Step { md, acl: acl::read(d, acl::ACCESS).map_err(|_| ()) });
    }
    let by_all = steps.iter().all(Step::searchable_by_all);
    // The caller is only asked about when not everyone may pass (their groups are read
    // from /proc then, and only if a directory's group needs them).
    let by_caller = by_all || caller_may_pass(caller, &steps);
    SearchRights { by_all, by_caller }
}

fn caller_may_pass(caller: &Caller, steps: &[Step]) -> bool {
    if caller.uid == 0 {
        return true;
    }
    let mut groups: Option<Vec<u32>> = None;
    steps.iter().all(|Step { md, acl }| {
        match acl {
            Ok(Some(value)) => {
                let groups = groups.get_or_insert_with(|| caller.groups());
                let asker = acl::Asker { uid: caller.uid, gid: caller.gid, groups };
                let owner = acl::Owner { uid: md.uid(), gid: md.gid() };
                if let Some(allowed) = acl::allows(value, owner, &asker, 0o1) {
                    return allowed;
                }
            }
            Ok(None) => {}
            // Unreadable ACL: refuse rather than guess more rights than the kernel gives.
            Err(()) => return false,
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
        let above = search_rights(&Caller::ROOT, &root).by_all;
        assert_eq!(search_rights(&Caller::ROOT, &open).by_all, above);
        assert!(!search_rights(&Caller::ROOT, &deep).by_all, "a 0700 dir two levels up");
        assert!(!search_rights(&nobody, &deep).by_caller);
        assert_eq!(search_rights(&nobody, &open).by_caller, above);
        assert!(search_rights(&Caller::ROOT, &deep).by_caller);
        if owner.uid != 0 {
            assert!(search_rights(&owner, &deep).by_caller);
        }
        set(&root.join("locked"), 0o701).unwrap();
        assert_eq!(search_rights(&nobody, &deep).by_caller, above, "the others' x bit is enough");
    }
}
