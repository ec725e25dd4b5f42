//! The open-files limit: every measured process holds a perf fd in the daemon until it
//! ends, so measurement raises the limit first.

use anyhow::Context;

/// Raises the soft limit on open files to the hard one (and the hard one to 65536 when it
/// is lower and we may): every measured process holds a perf fd in the daemon until it ends.
pub fn raise_open_files_limit() -> anyhow::Result<u64> {
    const WANTED: libc::rlim_t = 65_536;
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: lim is a valid rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    let raised =
        libc::rlimit { rlim_cur: lim.rlim_max.max(WANTED), rlim_max: lim.rlim_max.max(WANTED) };
    // SAFETY: raised is a valid rlimit. Raising the hard limit needs CAP_SYS_RESOURCE.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        return Ok(raised.rlim_cur);
    }
    let soft = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
    // SAFETY: as above; the soft limit may always go up to the hard one.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
    }
    Ok(soft.rlim_cur)
}
