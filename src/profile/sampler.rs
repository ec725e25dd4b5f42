//! The sample stream: decoded records behind [`SampleSource`], and its real implementation
//! on perf_event_open ([`PerfSource`]: one sampling event per CPU, any process).
//!
//! Records from different CPUs' ring buffers arrive in no particular order; each batch is
//! sorted by the kernel's timestamp so a process's mmap is seen before the samples that
//! hit it.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use perf_event::Sampler;
use perf_event_data::parse::Parser;
use perf_event_data::{Comm, Exit, Lost, Mmap2, RecordMetadata, Sample, Visitor};
use perf_event_open_sys::bindings::perf_event_header;

use super::source::{self, SourceChoice};

/// One taken branch from a hardware branch stack (UNTESTED: no PMU on the dev VM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Branch {
    pub from: u64,
    pub to: u64,
    pub mispredicted: bool,
}

/// A record, decoded and owned: what attribution needs and nothing more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SampleEvent {
    /// A sample: where the CPU was, and the user-space call stack the kernel unwound
    /// (`callchain`, leaf first, starting at the interrupted user IP; context markers
    /// removed; empty when the kernel gave none).
    Sample {
        time: u64,
        pid: u32,
        tid: u32,
        ip: u64,
        kernel: bool,
        branches: Vec<Branch>,
        callchain: Vec<u64>,
    },
    /// An executable mapping appeared in `pid`.
    Mmap {
        time: u64,
        pid: u32,
        addr: u64,
        len: u64,
        pgoff: u64,
        /// (major, minor, inode) of the backing file, when the kernel gave them.
        file: Option<(u32, u32, u64)>,
        filename: PathBuf,
    },
    /// `pid` called exec: its old mappings are gone.
    Exec { time: u64, pid: u32 },
    /// A new process `pid` forked from `ppid` (threads are not reported).
    Fork { time: u64, pid: u32, ppid: u32 },
    /// Process `pid` exited (its last thread, the leader, ended).
    Exit { time: u64, pid: u32 },
    /// The kernel dropped `count` records: the ring buffer was full.
    Lost { time: u64, count: u64 },
}

impl SampleEvent {
    pub fn time(&self) -> u64 {
        match self {
            Self::Sample { time, .. }
            | Self::Mmap { time, .. }
            | Self::Exec { time, .. }
            | Self::Fork { time, .. }
            | Self::Exit { time, .. }
            | Self::Lost { time, .. } => *time,
        }
    }
}

/// A stream of decoded records. Implementations block at most `timeout` waiting.
pub trait SampleSource: Send {
    /// Appends the records available now (waiting up to `timeout` for the first) to `out`,
    /// in time order.
    fn read_batch(&mut self, out: &mut Vec<SampleEvent>, timeout: Duration) -> anyhow::Result<()>;
}

/// System-wide sampling through perf_event_open: one event per online CPU.
pub struct PerfSource {
    samplers: Vec<Sampler>,
}

impl PerfSource {
    /// Opens the chosen source on every CPU with a ring buffer of `buffer_bytes` (rounded
    /// to a power of two pages) each, and enables them.
    pub fn open(
        choice: &SourceChoice,
        frequency_hz: u64,
        buffer_bytes: usize,
    ) -> anyhow::Result<Self> {
        let cpus = online_cpus().context("reading the online CPUs")?;
        let mut samplers = Vec::with_capacity(cpus.len());
        for cpu in cpus {
            let counter = source::open(choice.kind, cpu, frequency_hz, choice.include_kernel)
                .with_context(|| format!("opening {} on CPU {cpu}", choice.kind.event_name()))?;
            let mut sampler = counter
                .sampled(buffer_bytes)
                .with_context(|| format!("mapping the ring buffer of CPU {cpu}"))?;
            sampler.enable().with_context(|| format!("enabling sampling on CPU {cpu}"))?;
            samplers.push(sampler);
        }
        Ok(Self { samplers })
    }

    fn wait(&self, timeout: Duration) -> anyhow::Result<()> {
        let mut fds: Vec<libc::pollfd> = self
            .samplers
            .iter()
            .map(|s| libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLIN, revents: 0 })
            .collect();
        let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
        // libc: perf-event2's Sampler has no AsFd, so rustix's poll would need an unsafe
        // BorrowedFd::borrow_raw of the same descriptors.
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs for the whole call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e).context("polling the perf ring buffers");
            }
        }
        Ok(())
    }
}

impl SampleSource for PerfSource {
    fn read_batch(&mut self, out: &mut Vec<SampleEvent>, timeout: Duration) -> anyhow::Result<()> {
        let start = out.len();
        self.wait(timeout)?;
        for sampler in &mut self.samplers {
            let config = sampler.config().clone();
            while let Some(record) = sampler.next_record() {
                let bytes = record.to_contiguous();
                // The parser wants the header as the kernel wrote it; the size includes it.
                let size = (bytes.len() + std::mem::size_of::<perf_event_header>()) as u16;
                let header = perf_event_header { type_: record.ty(), misc: record.misc(), size };
                let mut parser = Parser::new(&bytes[..], config.clone());
                // A record that does not parse is skipped, never fatal.
                if let Ok(Some(event)) = parser.parse_record_with_header(Decode, header) {
                    out.push(event);
                }
            }
        }
        out[start..].sort_by_key(SampleEvent::time);
        Ok(())
    }
}

/// Decodes the record types attribution uses; everything else is `None`.
struct Decode;

const PERF_RECORD_MISC_CPUMODE_MASK: u16 = 7;
const PERF_RECORD_MISC_KERNEL: u16 = 1;
const PERF_RECORD_MISC_COMM_EXEC: u16 = 1 << 13;
/// Callchain entries at or above this are context markers (`PERF_CONTEXT_USER`, ...), not
/// addresses.
const PERF_CONTEXT_MAX: u64 = -4095i64 as u64;

impl<'a> Visitor<'a> for Decode {
    type Output = Option<SampleEvent>;

    fn visit_unimplemented(self, _: RecordMetadata) -> Self::Output {
        None
    }

    fn visit_sample(self, s: Sample<'a>, meta: RecordMetadata) -> Self::Output {
        let branches = s
            .lbr()
            .map(|entries| {
                entries
                    .iter()
                    .map(|b| Branch { from: b.from(), to: b.to(), mispredicted: b.mispred() })
                    .collect()
            })
            .unwrap_or_default();
        let callchain = s
            .callchain()
            .map(|chain| chain.iter().copied().filter(|&ip| ip < PERF_CONTEXT_MAX).collect())
            .unwrap_or_default();
        Some(SampleEvent::Sample {
            time: s.time().unwrap_or(0),
            pid: s.pid()?,
            tid: s.tid()?,
            ip: s.ip()?,
            kernel: meta.misc() & PERF_RECORD_MISC_CPUMODE_MASK == PERF_RECORD_MISC_KERNEL,
            branches,
            callchain,
        })
    }

    fn visit_mmap2(self, m: Mmap2<'a>, meta: RecordMetadata) -> Self::Output {
        use std::os::unix::ffi::OsStrExt;
        let file = match (m.maj(), m.min(), m.ino()) {
            (Some(maj), Some(min), Some(ino)) => Some((maj, min, ino)),
            _ => None,
        };
        Some(SampleEvent::Mmap {
            time: meta.sample_id().time().unwrap_or(0),
            pid: m.pid,
            addr: m.addr,
            len: m.len,
            pgoff: m.pgoff,
            file,
            filename: PathBuf::from(std::ffi::OsStr::from_bytes(&m.filename)),
        })
    }

    fn visit_comm(self, c: Comm<'a>, meta: RecordMetadata) -> Self::Output {
        (meta.misc() & PERF_RECORD_MISC_COMM_EXEC != 0)
            .then(|| SampleEvent::Exec { time: meta.sample_id().time().unwrap_or(0), pid: c.pid })
    }

    fn visit_fork(self, f: Exit, _: RecordMetadata) -> Self::Output {
        (f.pid != f.ppid).then_some(SampleEvent::Fork { time: f.time, pid: f.pid, ppid: f.ppid })
    }

    fn visit_exit(self, e: Exit, _: RecordMetadata) -> Self::Output {
        (e.pid == e.tid).then_some(SampleEvent::Exit { time: e.time, pid: e.pid })
    }

    fn visit_lost(self, l: Lost, meta: RecordMetadata) -> Self::Output {
        Some(SampleEvent::Lost { time: meta.sample_id().time().unwrap_or(0), count: l.lost })
    }
}

/// The online CPUs, from /sys/devices/system/cpu/online (`0-3,5`).
pub fn online_cpus() -> anyhow::Result<Vec<usize>> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/online")
        .context("reading /sys/devices/system/cpu/online")?;
    parse_cpu_list(text.trim())
}

fn parse_cpu_list(text: &str) -> anyhow::Result<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse()?, b.parse()?);
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse()?),
        }
    }
    anyhow::ensure!(!cpus.is_empty(), "no online CPUs in {text:?}");
    Ok(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(parse_cpu_list("0-3,5").unwrap(), vec![0, 1, 2, 3, 5]);
        assert_eq!(parse_cpu_list("0").unwrap(), vec![0]);
        assert!(parse_cpu_list("x").is_err());
    }
}
