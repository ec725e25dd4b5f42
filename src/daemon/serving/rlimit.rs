//! The open-files limit: every measured process holds a perf fd in the daemon until it
//! ends, so measurement raises the limit first.

use anyhow::Context;

/// Raises the soft limit on open files to the hard one (and the hard one to 65536 when it
/// is lower and we may): every measured process holds a perf fd in the daemon until it ends.
pub fn raise_open_files_limit() -> anyhow::Result<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    const WANTED: u64 = 65_536;
    // None is RLIM_INFINITY: no limit is above every number.
    let hard = getrlimit(Resource::Nofile).maximum;
    let raised = hard.map(|h| h.max(WANTED));
    // Raising the hard limit needs CAP_SYS_RESOURCE.
    if setrlimit(Resource::Nofile, Rlimit { current: raised, maximum: raised }).is_ok() {
        return Ok(raised.unwrap_or(u64::MAX));
    }
    // The soft limit may always go up to the hard one.
    setrlimit(Resource::Nofile, Rlimit { current: hard, maximum: hard })
        .context("setrlimit(RLIMIT_NOFILE)")?;
    Ok(hard.unwrap_or(u64::MAX))
}
