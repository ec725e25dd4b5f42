//! Keeping background work out of the users' way: idle CPU and I/O priority for the
//! threads that hash files and parse ELF.

/// Puts the calling thread at nice 19 and the idle I/O class. Best effort: failures are
/// ignored (the work still gets done, only less politely).
pub fn lower_current_thread() {
    let tid = rustix::thread::gettid();
    let _ = rustix::process::setpriority_process(Some(tid), 19);
    const IOPRIO_CLASS_IDLE: libc::c_long = 3;
    const IOPRIO_CLASS_SHIFT: libc::c_long = 13;
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    // libc: rustix has no ioprio_set.
    // SAFETY: ioprio_set takes three integers and touches no memory of ours.
    unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            tid.as_raw_nonzero().get() as libc::c_long,
            IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT,
        );
    }
}
