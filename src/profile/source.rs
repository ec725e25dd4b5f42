//! Choice of the sampling event: the best the machine offers, and why.
//!
//! Order of preference: hardware cycles with branch stacks (LBR on Intel, BRS on AMD), then
//! hardware cycles without, then the software `cpu-clock` timer. Each is probed by really
//! opening it (system-wide, on CPU 0) with the same settings the sampler will use, so the
//! answer is the kernel's, not a guess from /proc/cpuinfo.
//!
//! UNTESTED HERE: the two hardware sources. The development VM has no PMU, so only
//! `cpu-clock` has ever run; the hardware branches are kept to [`configure`] and the
//! branch-stack fields of the sampler. Known gap: AMD BRS refuses frequency mode (it needs
//! a fixed `sample_period`); on such a machine the branch probe fails and the plain-cycles
//! source is chosen.

use std::io;

use perf_event::events::{Hardware, Software};
use perf_event::{Builder, SampleBranchFlag, SampleFlag};
use serde::{Deserialize, Serialize};

/// A sampling event optbin can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    /// Hardware cycles with a branch stack per sample (untested: no PMU on the dev VM).
    CyclesWithBranches,
    /// Hardware cycles, IP only (untested: no PMU on the dev VM).
    Cycles,
    /// The kernel's software timer: works everywhere, IP only.
    CpuClock,
}

impl SourceKind {
    /// The event name as perf and BOLT's `no_lbr <event>:` header spell it.
    pub fn event_name(self) -> &'static str {
        match self {
            Self::CyclesWithBranches | Self::Cycles => "cycles",
            Self::CpuClock => "cpu-clock",
        }
    }

    pub fn has_branches(self) -> bool {
        self == Self::CyclesWithBranches
    }
}

/// What the probe chose, and why; shown on the status page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceChoice {
    pub kind: SourceKind,
    /// Whether kernel samples are collected (they count as "outside" time); false when
    /// the kernel refused them.
    pub include_kernel: bool,
    /// e.g. `cpu-clock: hardware cycles not supported (ENOENT)`.
    pub reason: String,
}

/// The deepest user call stack a sample carries. 64 frames cover the stacks of ordinary C,
/// C++ and Rust programs (the kernel's own default limit is 127); deeper recursion loses its
/// outermost frames, not the leaf, which is what a flame graph and BOLT need. Each frame is
/// 8 bytes copied by the kernel per sample, so the limit also bounds the ring-buffer traffic:
/// at 99 Hz per CPU that is at most 50 KB/s per CPU. Measured in `integration/bench_sampling.rs`.
pub const MAX_STACK_DEPTH: u16 = 64;

/// The sample fields every source records: IP, PID/TID, time (to order records across
/// CPUs), the CPU, and the user call stack (frame-pointer unwinding by the kernel).
pub fn sample_flags(kind: SourceKind) -> SampleFlag {
    let base = SampleFlag::IP
        | SampleFlag::TID
        | SampleFlag::TIME
        | SampleFlag::CPU
        | SampleFlag::CALLCHAIN;
    if kind.has_branches() { base | SampleFlag::BRANCH_STACK } else { base }
}

/// Sets up `builder` for `kind` at `frequency_hz` per CPU, with the side records that keep
/// the per-process mapping table (mmap2 with exec mappings, comm with exec, fork/exit).
pub fn configure(builder: &mut Builder<'_>, kind: SourceKind, frequency_hz: u64, kernel: bool) {
    match kind {
        SourceKind::CyclesWithBranches => {
            // UNTESTED: branch stacks need LBR/BRS hardware.
            builder.event(Hardware::CPU_CYCLES);
            builder.branch_sample_type(SampleBranchFlag::USER | SampleBranchFlag::ANY);
        }
        SourceKind::Cycles => {
            // UNTESTED: needs a PMU.
            builder.event(Hardware::CPU_CYCLES);
        }
        SourceKind::CpuClock => {
            builder.event(Software::CPU_CLOCK);
        }
    }
    builder
        .sample_frequency(frequency_hz.max(1))
        .sample(sample_flags(kind))
        .exclude_kernel(!kernel)
        .exclude_hv(true)
        // Kernel frames are not unwound: a kernel sample shows as one `[kernel]` frame on
        // top of the user stack that entered it, which is what a user of optbin can act on.
        .exclude_callchain_kernel(true)
        .sample_max_stack(MAX_STACK_DEPTH)
        .mmap(true)
        .mmap2(true)
        .comm(true)
        .comm_exec(true)
        .task(true)
        .sample_id_all(true)
        .wakeup_watermark(4096);
}

/// Builds the counter for `kind` on `cpu`, any process.
pub fn open(
    kind: SourceKind,
    cpu: usize,
    frequency_hz: u64,
    kernel: bool,
) -> io::Result<perf_event::Counter> {
    let mut builder = Builder::new(Software::DUMMY);
    configure(&mut builder, kind, frequency_hz, kernel);
    builder.any_pid().one_cpu(cpu).build()
}

/// Probes the sources, best first, and returns the first that opens.
pub fn probe(frequency_hz: u64) -> io::Result<SourceChoice> {
    let mut refused = Vec::new();
    for kind in [SourceKind::CyclesWithBranches, SourceKind::Cycles, SourceKind::CpuClock] {
        for kernel in [true, false] {
            match open(kind, 0, frequency_hz, kernel) {
                Ok(_) => {
                    let reason = explain(kind, kernel, &refused);
                    return Ok(SourceChoice { kind, include_kernel: kernel, reason });
                }
                Err(e) => refused.push((kind, kernel, e)),
            }
        }
    }
    let last = refused.pop().map(|(_, _, e)| e);
    Err(last.unwrap_or_else(|| io::Error::other("no perf event source could be opened")))
}

fn explain(kind: SourceKind, kernel: bool, refused: &[(SourceKind, bool, io::Error)]) -> String {
    let mut parts = Vec::new();
    let first_refusal = |k: SourceKind| refused.iter().find(|(rk, _, _)| *rk == k);
    if kind != SourceKind::CyclesWithBranches
        && let Some((_, _, e)) = first_refusal(SourceKind::CyclesWithBranches)
    {
        parts.push(format!("hardware branch stacks not supported ({})", errno_name(e)));
    }
    if kind == SourceKind::CpuClock
        && let Some((_, _, e)) = first_refusal(SourceKind::Cycles)
    {
        parts.push(format!("hardware cycles not supported ({})", errno_name(e)));
    }
    if !kernel {
        parts.push("kernel samples refused; user space only".to_string());
    }
    if parts.is_empty() {
        parts.push("best source available".to_string());
    }
    format!("{}: {}", kind.event_name(), parts.join("; "))
}

/// `ENOENT`, `EOPNOTSUPP`, ... for the usual perf_event_open refusals.
pub fn errno_name(e: &io::Error) -> String {
    let name = match e.raw_os_error() {
        Some(libc::ENOENT) => "ENOENT",
        Some(libc::EOPNOTSUPP) => "EOPNOTSUPP",
        Some(libc::EACCES) => "EACCES",
        Some(libc::EPERM) => "EPERM",
        Some(libc::EINVAL) => "EINVAL",
        Some(libc::ENODEV) => "ENODEV",
        Some(libc::ENOSPC) => "ENOSPC",
        Some(libc::EBUSY) => "EBUSY",
        Some(libc::EMFILE) => "EMFILE",
        Some(libc::E2BIG) => "E2BIG",
        _ => return e.to_string(),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explanation_names_what_was_refused() {
        let refused = vec![
            (SourceKind::CyclesWithBranches, true, io::Error::from_raw_os_error(libc::ENOENT)),
            (SourceKind::CyclesWithBranches, false, io::Error::from_raw_os_error(libc::ENOENT)),
            (SourceKind::Cycles, true, io::Error::from_raw_os_error(libc::ENOENT)),
            (SourceKind::Cycles, false, io::Error::from_raw_os_error(libc::ENOENT)),
        ];
        assert_eq!(
            explain(SourceKind::CpuClock, true, &refused),
            "cpu-clock: hardware branch stacks not supported (ENOENT); \
             hardware cycles not supported (ENOENT)"
        );
        assert_eq!(
            explain(SourceKind::CyclesWithBranches, true, &[]),
            "cycles: best source available"
        );
    }
}
