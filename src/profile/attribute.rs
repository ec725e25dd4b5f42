//! Attribution: keeps a per-process table of executable mappings from the record stream
//! and turns each sample into counts for the binary whose code it hit.
//!
//! A process's "binary" is its main executable (the first file mapped after its exec, or
//! /proc/PID/exe for processes seeded from /proc). Samples in that file's mappings are
//! counted at their file offset; samples anywhere else (shared libraries, vdso, kernel,
//! JIT or anonymous code) are counted as "outside" for the same binary. Samples of a
//! served variant are only counted, as variant samples of the original.
//!
//! Every sample also yields its call stack ([`StackSample`]): each frame located in the
//! process's mappings (the main executable at a file offset, another file by name, the
//! kernel), for the flame graphs and heat maps of `crate::observe`. Stacks are kept for all
//! processes, profiled or not, so the machine-wide graph shows the whole machine.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use super::procmaps::{self, Mapping, ProcSnapshot};
use super::resolve::{PathResolver, Resolved};
use super::sampler::SampleEvent;

/// The file whose profile samples go to: the original's path and, when the mapping was
/// the original file itself, its (dev, ino) as the kernel saw it (so a file replaced after
/// the process started is not mistaken for the one it ran).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BinaryFile {
    pub path: PathBuf,
    pub mapped: Option<(u64, u64)>,
}

/// Counts gathered for one binary since the last flush.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileCounts {
    /// File offset -> samples in the binary's own text.
    pub offsets: HashMap<u64, u64>,
    /// (from offset, to offset) -> (count, mispredictions); hardware branch stacks only.
    pub branches: HashMap<(u64, u64), (u64, u64)>,
    pub outside: u64,
    pub variant: u64,
    pub new_runs: u64,
}

impl FileCounts {
    pub fn own_samples(&self) -> u64 {
        self.offsets.values().sum()
    }
}

/// Stream-wide counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamCounters {
    pub samples: u64,
    /// Records the kernel dropped (PERF_RECORD_LOST).
    pub lost_records: u64,
    /// Samples of processes whose main executable is unknown or ignored.
    pub unattributed: u64,
    /// Samples whose stack was not kept (over [`STACKS_PER_FLUSH_LIMIT`]).
    pub stacks_dropped: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Original(Arc<BinaryFile>),
    Variant(Arc<BinaryFile>, Option<i64>),
    Ignore,
}

/// One frame of a sampled call stack, located in the process's mappings.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Frame {
    /// In the main executable, at this file offset.
    Own(u64),
    /// In another mapped file (a shared library), by its file name.
    Object(Arc<str>),
    /// In the kernel (its frames are not unwound).
    Kernel,
    /// Anonymous or JIT code, the vdso, or an address no mapping covers.
    Unknown,
}

/// Whose code a stack's `Own` frames are in.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StackOwner {
    /// A profiled original binary.
    Original(Arc<BinaryFile>),
    /// A variant served in place of `original` (the catalog's variant id, when known).
    Variant { original: Arc<BinaryFile>, variant: Option<i64> },
    /// A program optbin does not profile; its main executable as mapped.
    Other(Arc<std::path::Path>),
    /// A process whose main executable is unknown.
    Unknown,
}

/// A distinct call stack of one program, as counted between two flushes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StackSample {
    /// The program's name (its executable's file name).
    pub process: Arc<str>,
    pub owner: StackOwner,
    /// Leaf first.
    pub frames: Vec<Frame>,
}

/// At most this many distinct stacks are kept between two flushes; samples beyond are
/// counted in [`StreamCounters::stacks_dropped`] (bounded memory on a machine running
/// thousands of distinct programs).
pub const STACKS_PER_FLUSH_LIMIT: usize = 50_000;

#[derive(Debug, Clone)]
struct Process {
    /// Sorted by start, non-overlapping.
    mappings: Vec<Mapping>,
    /// (dev, ino) or, for files the kernel gave no inode for, the mapped path's target.
    main: Option<(Option<(u64, u64)>, PathBuf)>,
    target: Option<Target>,
    /// Waiting for the first file mapping after exec: it is the main executable.
    expect_main: bool,
    /// This process already counted as a run of its binary.
    counted: bool,
}

impl Process {
    fn fresh() -> Self {
        Self { mappings: Vec::new(), main: None, target: None, expect_main: true, counted: false }
    }

    fn from_snapshot(snap: ProcSnapshot) -> Self {
        let main = snap.exe.and_then(|exe| {
            snap.mappings.iter().find(|m| m.file == Some(exe)).map(|m| (m.file, m.filename.clone()))
        });
        let mut p = Self::fresh();
        p.expect_main = false;
        p.main = main;
        p.mappings = snap.mappings;
        p.mappings.sort_by_key(|m| m.start);
        p
    }

    fn add_mapping(&mut self, m: Mapping) {
        if self.expect_main && is_file(&m) {
            self.main = Some((m.file, m.filename.clone()));
            self.expect_main = false;
            self.target = None;
        }
        self.mappings.retain(|old| old.end <= m.start || old.start >= m.end);
        let at = self.mappings.partition_point(|old| old.start < m.start);
        self.mappings.insert(at, m);
    }

    fn mapping_at(&self, ip: u64) -> Option<&Mapping> {
        let idx = self.mappings.partition_point(|m| m.start <= ip).checked_sub(1)?;
        let m = &self.mappings[idx];
        m.contains(ip).then_some(m)
    }

    fn is_main(&self, m: &Mapping) -> bool {
        match &self.main {
            Some((Some(id), _)) => m.file == Some(*id),
            Some((None, path)) => m.file.is_none() && &m.filename == path,
            None => false,
        }
    }
}

fn is_file(m: &Mapping) -> bool {
    let name = m.filename.as_os_str().as_encoded_bytes();
    name.starts_with(b"/") && m.file.is_some()
}

/// Reads /proc for processes the stream has not introduced; a trait so logic tests can
/// run without real processes.
pub trait ProcReader: Send {
    fn snapshot(&self, pid: u32) -> Option<ProcSnapshot>;
}

/// The real /proc.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealProc;

impl ProcReader for RealProc {
    fn snapshot(&self, pid: u32) -> Option<ProcSnapshot> {
        procmaps::snapshot(pid)
    }
}

/// The attribution state machine. Feed it records in time order; take its counts at
/// every flush.
pub struct Attributor {
    resolver: Arc<dyn PathResolver>,
    proc: Box<dyn ProcReader>,
    processes: HashMap<u32, Process>,
    /// Exited processes are forgotten one flush later: samples from other CPUs' buffers
    /// may still name them.
    exited: Vec<u32>,
    pending: HashMap<Arc<BinaryFile>, FileCounts>,
    stacks: HashMap<StackSample, u64>,
    counters: StreamCounters,
}

impl Attributor {
    pub fn new(resolver: Arc<dyn PathResolver>, proc: Box<dyn ProcReader>) -> Self {
        Self {
            resolver,
            proc,
            processes: HashMap::new(),
            exited: Vec::new(),
            pending: HashMap::new(),
            stacks: HashMap::new(),
            counters: StreamCounters::default(),
        }
    }

    pub fn counters(&self) -> StreamCounters {
        self.counters
    }

    pub fn tracked_processes(&self) -> usize {
        self.processes.len()
    }

    /// Takes the counts gathered since the last call, and forgets processes that exited
    /// before the previous call.
    pub fn take_counts(&mut self) -> HashMap<BinaryFile, FileCounts> {
        let gone = std::mem::take(&mut self.exited);
        for pid in gone {
            self.processes.remove(&pid);
        }
        std::mem::take(&mut self.pending)
            .into_iter()
            .map(|(file, counts)| (Arc::unwrap_or_clone(file), counts))
            .collect()
    }

    /// Takes the call stacks counted since the last call.
    pub fn take_stacks(&mut self) -> HashMap<StackSample, u64> {
        std::mem::take(&mut self.stacks)
    }

    pub fn handle(&mut self, event: &SampleEvent) {
        match event {
            SampleEvent::Sample { pid, ip, kernel, branches, callchain, .. } => {
                self.counters.samples += 1;
                if *pid == 0 {
                    return; // the idle task
                }
                self.sample(*pid, *ip, *kernel, branches);
                self.stack(*pid, *ip, *kernel, callchain);
            }
            SampleEvent::Mmap { pid, addr, len, pgoff, file, filename, .. } => {
                let file = file.map(|(maj, min, ino)| (libc::makedev(maj, min), ino));
                let m = Mapping {
                    start: *addr,
                    end: addr.saturating_add(*len),
                    pgoff: *pgoff,
                    file,
                    filename: filename.clone(),
                };
                if let Some(p) = self.process(*pid) {
                    p.add_mapping(m);
                }
            }
            SampleEvent::Exec { pid, .. } => {
                self.processes.insert(*pid, Process::fresh());
            }
            SampleEvent::Fork { pid, ppid, .. } => {
                let child = match self.processes.get(ppid) {
                    Some(parent) => Process { counted: false, ..parent.clone() },
                    None => match self.proc.snapshot(*pid) {
                        Some(snap) => Process::from_snapshot(snap),
                        None => return,
                    },
                };
                self.processes.insert(*pid, child);
            }
            SampleEvent::Exit { pid, .. } => self.exited.push(*pid),
            SampleEvent::Lost { count, .. } => self.counters.lost_records += count,
        }
    }

    /// The process, seeded from /proc when the stream has not introduced it.
    fn process(&mut self, pid: u32) -> Option<&mut Process> {
        if !self.processes.contains_key(&pid) {
            let p = self.proc.snapshot(pid).map(Process::from_snapshot)?;
            self.processes.insert(pid, p);
        }
        self.processes.get_mut(&pid)
    }

    fn sample(&mut self, pid: u32, ip: u64, kernel: bool, branches: &[super::sampler::Branch]) {
        if self.process(pid).is_none() {
            self.counters.unattributed += 1;
            return;
        }
        let Some(p) = self.processes.get_mut(&pid) else { return };
        let target = match &p.target {
            Some(t) => t,
            None => p.target.insert(resolve_target(self.resolver.as_ref(), p.main.as_ref())),
        };
        let file = match target {
            Target::Ignore => {
                self.counters.unattributed += 1;
                return;
            }
            Target::Original(file) | Target::Variant(file, _) => Arc::clone(file),
        };
        let is_variant = matches!(target, Target::Variant(..));
        let own = if kernel { None } else { p.mapping_at(ip).filter(|m| p.is_main(m)) };
        let Some(own) = own else {
            if !is_variant {
                self.pending.entry(file).or_default().outside += 1;
            }
            return;
        };
        let offset = own.file_offset(ip);
        let counts = self.pending.entry(file).or_default();
        if is_variant {
            counts.variant += 1;
            return;
        }
        *counts.offsets.entry(offset).or_default() += 1;
        if !p.counted {
            p.counted = true;
            counts.new_runs += 1;
        }
        for b in branches {
            let from = p.mapping_at(b.from).filter(|m| p.is_main(m));
            let to = p.mapping_at(b.to).filter(|m| p.is_main(m));
            if let (Some(from), Some(to)) = (from, to) {
                let e = counts.branches.entry((from.file_offset(b.from), to.file_offset(b.to)));
                let e = e.or_default();
                e.0 += 1;
                e.1 += b.mispredicted as u64;
            }
        }
    }
}

impl Attributor {
    /// Counts the sample's call stack for its program. Runs after [`Self::sample`], which
    /// seeded the process and resolved its target when it could.
    fn stack(&mut self, pid: u32, ip: u64, kernel: bool, callchain: &[u64]) {
        let Some(p) = self.processes.get(&pid) else {
            return self.count_stack(StackSample {
                process: Arc::from("[unknown]"),
                owner: StackOwner::Unknown,
                frames: vec![if kernel { Frame::Kernel } else { Frame::Unknown }],
            });
        };
        let mut frames = Vec::with_capacity(callchain.len() + 1);
        if kernel || callchain.is_empty() {
            frames.push(locate(p, ip, kernel));
        }
        for &addr in callchain {
            let frame = locate(p, addr, false);
            // A library's internal frames add nothing a user can act on: one box per entry.
            if matches!(&frame, Frame::Object(_)) && frames.last() == Some(&frame) {
                continue;
            }
            frames.push(frame);
        }
        let main_path = p.main.as_ref().map(|(_, path)| path.as_path());
        let process: Arc<str> = main_path
            .and_then(|m| m.file_name())
            .map_or_else(|| Arc::from("[unknown]"), |n| Arc::from(n.to_string_lossy().as_ref()));
        let owner = match (&p.target, main_path) {
            (Some(Target::Original(f)), _) => StackOwner::Original(Arc::clone(f)),
            (Some(Target::Variant(f, v)), _) => {
                StackOwner::Variant { original: Arc::clone(f), variant: *v }
            }
            (_, Some(path)) => StackOwner::Other(Arc::from(path)),
            (_, None) => StackOwner::Unknown,
        };
        self.count_stack(StackSample { process, owner, frames });
    }

    fn count_stack(&mut self, stack: StackSample) {
        if let Some(n) = self.stacks.get_mut(&stack) {
            *n += 1;
        } else if self.stacks.len() < STACKS_PER_FLUSH_LIMIT {
            self.stacks.insert(stack, 1);
        } else {
            self.counters.stacks_dropped += 1;
        }
    }
}

/// Where `addr` is in process `p`.
fn locate(p: &Process, addr: u64, kernel: bool) -> Frame {
    if kernel || addr >= KERNEL_SPACE_START {
        return Frame::Kernel;
    }
    match p.mapping_at(addr) {
        Some(m) if p.is_main(m) => Frame::Own(m.file_offset(addr)),
        Some(m) if is_file(m) => Frame::Object(Arc::from(
            m.filename.file_name().map_or_else(|| "?".into(), |n| n.to_string_lossy()).as_ref(),
        )),
        _ => Frame::Unknown,
    }
}

/// x86-64 kernel addresses start here (the canonical upper half).
const KERNEL_SPACE_START: u64 = 0xffff_8000_0000_0000;

/// What a process's main executable stands for, asked of the resolver once per process.
fn resolve_target(
    resolver: &dyn PathResolver,
    main: Option<&(Option<(u64, u64)>, PathBuf)>,
) -> Target {
    let Some((id, path)) = main else { return Target::Ignore };
    match resolver.resolve(path, *id) {
        Resolved::Original { path: orig, version } => {
            // Which version of the original ran: what the resolver knows, else the mapping's
            // (dev, ino) when the original file itself was mapped (through the mount they
            // are the mount's).
            let mapped = version.or(if &orig == path { *id } else { None });
            Target::Original(Arc::new(BinaryFile { path: orig, mapped }))
        }
        Resolved::Variant { original, variant } => {
            Target::Variant(Arc::new(BinaryFile { path: original, mapped: None }), variant)
        }
        Resolved::Ignore => Target::Ignore,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::resolve::IdentityResolver;
    use std::path::Path;

    struct NoProc;
    impl ProcReader for NoProc {
        fn snapshot(&self, _: u32) -> Option<ProcSnapshot> {
            None
        }
    }

    struct MountResolver;
    impl PathResolver for MountResolver {
        fn resolve(&self, mapped: &Path, _file: Option<(u64, u64)>) -> Resolved {
            let s = mapped.to_str().unwrap();
            if let Some(rest) = s.strip_prefix("/mnt/variant") {
                Resolved::Variant { original: rest.into(), variant: Some(9) }
            } else if let Some(rest) = s.strip_prefix("/mnt") {
                Resolved::original(rest)
            } else {
                Resolved::original(mapped)
            }
        }
    }

    fn mmap(pid: u32, addr: u64, len: u64, pgoff: u64, ino: u64, name: &str) -> SampleEvent {
        SampleEvent::Mmap {
            time: 0,
            pid,
            addr,
            len,
            pgoff,
            file: Some((8, 1, ino)),
            filename: name.into(),
        }
    }

    fn sample(pid: u32, ip: u64) -> SampleEvent {
        SampleEvent::Sample {
            time: 0,
            pid,
            tid: pid,
            ip,
            kernel: false,
            branches: vec![],
            callchain: vec![],
        }
    }

    #[test]
    fn samples_go_to_the_main_executable_at_their_file_offset() {
        let mut a = Attributor::new(Arc::new(IdentityResolver), Box::new(NoProc));
        a.handle(&SampleEvent::Exec { time: 0, pid: 10 });
        a.handle(&mmap(10, 0x5000_0000, 0x2000, 0x1000, 7, "/usr/bin/x"));
        a.handle(&mmap(10, 0x7f00_0000, 0x1000, 0, 9, "/lib/libc.so.6"));
        a.handle(&sample(10, 0x5000_0010));
        a.handle(&sample(10, 0x5000_0010));
        a.handle(&sample(10, 0x5000_1000));
        a.handle(&sample(10, 0x7f00_0000));
        a.handle(&sample(10, 0x1234)); // anonymous / JIT
        a.handle(&SampleEvent::Sample {
            time: 0,
            pid: 10,
            tid: 10,
            ip: 0xffff_ffff_8100_0000,
            kernel: true,
            branches: vec![],
            callchain: vec![],
        });
        // A forked child runs the same binary: a second run.
        a.handle(&SampleEvent::Fork { time: 0, pid: 11, ppid: 10 });
        a.handle(&sample(11, 0x5000_0010));
        let counts = a.take_counts();
        let file = BinaryFile { path: "/usr/bin/x".into(), mapped: Some((libc::makedev(8, 1), 7)) };
        let c = &counts[&file];
        assert_eq!(c.offsets[&0x1010], 3);
        assert_eq!(c.offsets[&0x2000], 1);
        assert_eq!(c.outside, 3);
        assert_eq!(c.new_runs, 2);
        assert_eq!(counts.len(), 1);
    }

    #[test]
    fn mount_paths_resolve_to_the_original_and_variants_are_kept_apart() {
        let mut a = Attributor::new(Arc::new(MountResolver), Box::new(NoProc));
        a.handle(&SampleEvent::Exec { time: 0, pid: 1 });
        a.handle(&mmap(1, 0x1000, 0x1000, 0, 5, "/mnt/usr/bin/y"));
        a.handle(&sample(1, 0x1100));
        a.handle(&SampleEvent::Exec { time: 0, pid: 2 });
        a.handle(&mmap(2, 0x1000, 0x1000, 0, 6, "/mnt/variant/usr/bin/y"));
        a.handle(&sample(2, 0x1100));
        a.handle(&sample(2, 0x1200));
        let counts = a.take_counts();
        let orig = &counts[&BinaryFile { path: "/usr/bin/y".into(), mapped: None }];
        assert_eq!(orig.own_samples(), 1);
        assert_eq!(orig.variant, 2);
    }

    #[test]
    fn exec_replaces_the_mappings_and_exit_forgets_after_a_flush() {
        let mut a = Attributor::new(Arc::new(IdentityResolver), Box::new(NoProc));
        a.handle(&SampleEvent::Exec { time: 0, pid: 3 });
        a.handle(&mmap(3, 0x1000, 0x1000, 0, 5, "/bin/a"));
        a.handle(&SampleEvent::Exec { time: 0, pid: 3 });
        a.handle(&mmap(3, 0x1000, 0x1000, 0, 6, "/bin/b"));
        a.handle(&sample(3, 0x1000));
        a.handle(&SampleEvent::Exit { time: 0, pid: 3 });
        a.handle(&sample(3, 0x1004)); // late sample from another CPU's buffer
        let counts = a.take_counts();
        assert_eq!(counts.len(), 1);
        assert_eq!(counts.keys().next().unwrap().path, PathBuf::from("/bin/b"));
        assert_eq!(counts.values().next().unwrap().own_samples(), 2);
        assert_eq!(a.tracked_processes(), 0);
        a.handle(&sample(3, 0x1000));
        assert_eq!(a.counters().unattributed, 1, "unknown pid without /proc");
        a.handle(&SampleEvent::Lost { time: 0, count: 5 });
        assert_eq!(a.counters().lost_records, 5);
    }

    #[test]
    fn branch_stacks_keep_only_branches_inside_the_binary() {
        use crate::profile::sampler::Branch;
        let mut a = Attributor::new(Arc::new(IdentityResolver), Box::new(NoProc));
        a.handle(&SampleEvent::Exec { time: 0, pid: 5 });
        a.handle(&mmap(5, 0x40_0000, 0x1000, 0x1000, 7, "/bin/x"));
        a.handle(&mmap(5, 0x7f00_0000, 0x1000, 0, 8, "/lib/l.so"));
        let b = |from, to, mispredicted| Branch { from, to, mispredicted };
        a.handle(&SampleEvent::Sample {
            time: 0,
            pid: 5,
            tid: 5,
            ip: 0x40_0010,
            kernel: false,
            branches: vec![
                b(0x40_0020, 0x40_0030, true),
                b(0x40_0020, 0x40_0030, false),
                b(0x40_0040, 0x7f00_0000, false), // into a library: not this binary's edge
            ],
            callchain: vec![],
        });
        let counts = a.take_counts();
        let c = counts.values().next().unwrap();
        assert_eq!(c.branches.len(), 1);
        assert_eq!(c.branches[&(0x1020, 0x1030)], (2, 1));
    }

    #[test]
    fn processes_unknown_to_the_stream_are_seeded_from_proc() {
        struct OneProc;
        impl ProcReader for OneProc {
            fn snapshot(&self, pid: u32) -> Option<ProcSnapshot> {
                (pid == 42).then(|| ProcSnapshot {
                    mappings: procmaps::parse_maps(
                        "1000-2000 r-xp 00001000 08:01 77 /opt/z\n3000-4000 r-xp 0 08:01 78 /lib/l\n",
                    ),
                    exe: Some((libc::makedev(8, 1), 77)),
                })
            }
        }
        let mut a = Attributor::new(Arc::new(IdentityResolver), Box::new(OneProc));
        a.handle(&sample(42, 0x1800));
        a.handle(&sample(42, 0x3800));
        let counts = a.take_counts();
        let c = counts.values().next().unwrap();
        assert_eq!(c.offsets[&0x1800], 1);
        assert_eq!(c.outside, 1);
    }
}
