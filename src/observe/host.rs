//! A USE summary of the host (Brendan Gregg's method: for every resource, its
//! utilization, saturation and errors) from `/proc` and `/sys`, with pressure stall
//! information (PSI) where the kernel has it.
//!
//! A [`HostSnapshot`] is read in one go; two of them, some seconds apart, give a
//! [`UseSummary`] ([`summarize`]): rates need an interval. Parsing is pure (text in,
//! numbers out) so it is tested on fixed text; [`HostSnapshot::read`] only reads files.
//!
//! | resource | utilization | saturation | errors |
//! |---|---|---|---|
//! | cpu | busy share of all CPUs (`/proc/stat`) | PSI `cpu some avg10` (share of time a runnable task waited), else runnable tasks beyond the CPU count | - |
//! | memory | 1 - MemAvailable/MemTotal | PSI `memory some avg10`; swap-ins and -outs per second in the detail | OOM kills in the interval |
//! | disk NAME | busy time share (`io_ticks`) | average queue length (`weighted io time`) | - (the block layer keeps no counter) |
//! | net NAME | max(rx, tx) bits/s over the link speed, when the driver reports one | drops per second | rx + tx errors in the interval |
//! | tasks | threads over `kernel.threads-max` | - | - |
//! | files | open files over `fs.file-max` | - | - |

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

/// CPU time counters summed over all CPUs, in clock ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTimes {
    pub busy: u64,
    pub total: u64,
}

/// PSI `avg10` figures, percent.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Pressure {
    pub some: f64,
    pub full: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskCounters {
    pub name: String,
    pub io_ticks_ms: u64,
    pub weighted_ms: u64,
    pub ios: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetCounters {
    pub name: String,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub errors: u64,
    pub drops: u64,
    /// Link speed, Mbit/s, when the driver reports it.
    pub speed_mbps: Option<u64>,
}

/// Everything read from `/proc` and `/sys` at one moment.
#[derive(Debug, Clone)]
pub struct HostSnapshot {
    pub at: Instant,
    pub cpus: usize,
    pub cpu: CpuTimes,
    pub runnable: u64,
    pub threads: u64,
    pub threads_max: Option<u64>,
    pub cpu_pressure: Option<Pressure>,
    pub memory_pressure: Option<Pressure>,
    pub io_pressure: Option<Pressure>,
    pub mem_total_kb: u64,
    pub mem_available_kb: u64,
    pub swap_in_pages: u64,
    pub swap_out_pages: u64,
    pub oom_kills: u64,
    pub disks: Vec<DiskCounters>,
    pub nets: Vec<NetCounters>,
    pub files_open: u64,
    pub files_max: Option<u64>,
}

impl HostSnapshot {
    /// Reads the host's counters under `root` (`/` normally; tests may point elsewhere).
    /// Files a kernel lacks (PSI, a link speed) leave their figure out.
    pub fn read(root: &Path) -> anyhow::Result<Self> {
        let read = |p: &str| std::fs::read_to_string(root.join(p));
        let stat = read("proc/stat")?;
        let (cpu, cpus) = parse_stat(&stat);
        let (runnable, threads) = parse_loadavg(&read("proc/loadavg")?).unwrap_or((0, 0));
        let meminfo = parse_keyed(&read("proc/meminfo")?);
        let vmstat = parse_keyed(&read("proc/vmstat").unwrap_or_default());
        let pressure = |name: &str| {
            read(&format!("proc/pressure/{name}")).ok().and_then(|t| parse_pressure(&t))
        };
        let mut nets = parse_net_dev(&read("proc/net/dev").unwrap_or_default());
        for n in &mut nets {
            n.speed_mbps = read(&format!("sys/class/net/{}/speed", n.name))
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .filter(|&s| s > 0)
                .map(|s| s as u64);
        }
        let (files_open, files_max) =
            parse_file_nr(&read("proc/sys/fs/file-nr").unwrap_or_default()).unwrap_or((0, 0));
        Ok(Self {
            at: Instant::now(),
            cpus: cpus.max(1),
            cpu,
            runnable,
            threads,
            threads_max: read("proc/sys/kernel/threads-max")
                .ok()
                .and_then(|s| s.trim().parse().ok()),
            cpu_pressure: pressure("cpu"),
            memory_pressure: pressure("memory"),
            io_pressure: pressure("io"),
            mem_total_kb: meminfo.get("MemTotal").copied().unwrap_or(0),
            mem_available_kb: meminfo.get("MemAvailable").copied().unwrap_or(0),
            swap_in_pages: vmstat.get("pswpin").copied().unwrap_or(0),
            swap_out_pages: vmstat.get("pswpout").copied().unwrap_or(0),
            oom_kills: vmstat.get("oom_kill").copied().unwrap_or(0),
            disks: parse_diskstats(&read("proc/diskstats").unwrap_or_default())
                .into_iter()
                .filter(|d| root.join("sys/block").join(&d.name).exists())
                .collect(),
            nets,
            files_open,
            files_max: Some(files_max).filter(|&m| m > 0),
        })
    }
}

/// (all-CPU times, number of CPUs) from `/proc/stat`.
pub fn parse_stat(text: &str) -> (CpuTimes, usize) {
    let mut total = CpuTimes::default();
    let mut cpus = 0;
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        match fields.next() {
            Some("cpu") => {
                let v: Vec<u64> = fields.filter_map(|f| f.parse().ok()).collect();
                // user nice system idle iowait irq softirq steal (guest is inside user).
                let sum: u64 = v.iter().take(8).sum();
                let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
                total = CpuTimes { busy: sum.saturating_sub(idle), total: sum };
            }
            Some(name) if name.starts_with("cpu") => cpus += 1,
            _ => {}
        }
    }
    (total, cpus)
}

/// (runnable tasks, total threads) from `/proc/loadavg` (`0.5 0.4 0.3 3/247 1234`).
pub fn parse_loadavg(text: &str) -> Option<(u64, u64)> {
    let field = text.split_whitespace().nth(3)?;
    let (run, total) = field.split_once('/')?;
    Some((run.parse().ok()?, total.parse().ok()?))
}

/// `avg10` of a `/proc/pressure/*` file.
pub fn parse_pressure(text: &str) -> Option<Pressure> {
    let avg10 = |kind: &str| {
        let line = text.lines().find(|l| l.starts_with(kind))?;
        line.split_whitespace().find_map(|f| f.strip_prefix("avg10="))?.parse::<f64>().ok()
    };
    Some(Pressure { some: avg10("some")?, full: avg10("full") })
}

/// `Key: value` (meminfo, kB) or `key value` (vmstat) lines.
pub fn parse_keyed(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let key = f.next()?.trim_end_matches(':');
            Some((key.to_string(), f.next()?.parse().ok()?))
        })
        .collect()
}

/// Block devices from `/proc/diskstats`, without loop, ram and optical devices (partitions
/// are left out by [`HostSnapshot::read`], which keeps the names `/sys/block` lists).
pub fn parse_diskstats(text: &str) -> Vec<DiskCounters> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let name = *f.get(2)?;
            if ["loop", "ram", "zram", "fd", "sr"].iter().any(|p| name.starts_with(p)) {
                return None;
            }
            let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            Some(DiskCounters {
                name: name.to_string(),
                ios: n(3) + n(7),
                io_ticks_ms: n(12),
                weighted_ms: n(13),
            })
        })
        .collect()
}

/// Interfaces from `/proc/net/dev`, without `lo`.
pub fn parse_net_dev(text: &str) -> Vec<NetCounters> {
    text.lines()
        .skip(2)
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let name = name.trim();
            if name == "lo" {
                return None;
            }
            let v: Vec<u64> = rest.split_whitespace().filter_map(|x| x.parse().ok()).collect();
            let n = |i: usize| v.get(i).copied().unwrap_or(0);
            Some(NetCounters {
                name: name.to_string(),
                rx_bytes: n(0),
                tx_bytes: n(8),
                errors: n(2) + n(10),
                drops: n(3) + n(11),
                speed_mbps: None,
            })
        })
        .collect()
}

/// (allocated, max) from `/proc/sys/fs/file-nr`.
pub fn parse_file_nr(text: &str) -> Option<(u64, u64)> {
    let f: Vec<u64> = text.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    Some((*f.first()?, *f.get(2)?))
}

/// One resource's line of the summary.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UseRow {
    /// `cpu`, `memory`, `disk vda`, `net eth0`, `tasks`, `files`.
    pub resource: String,
    /// 0..=1, when the resource has a capacity to compare with.
    pub utilization: Option<f64>,
    /// How saturation is measured here, e.g. `psi some avg10` (a share of time, 0..=1),
    /// `queue length`, `drops/s`.
    pub saturation_kind: String,
    pub saturation: Option<f64>,
    /// Errors in the interval, when the kernel counts them for this resource.
    pub errors: Option<u64>,
    /// Figures behind the numbers, for people.
    pub detail: String,
    /// Where to look next, when a threshold was crossed.
    pub hint: Option<String>,
}

/// The host's USE summary over one interval.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UseSummary {
    /// Unix seconds at the end of the interval.
    pub at: i64,
    pub interval_secs: f64,
    pub resources: Vec<UseRow>,
}

impl UseSummary {
    pub fn row(&self, resource: &str) -> Option<&UseRow> {
        self.resources.iter().find(|r| r.resource == resource)
    }
}

/// Thresholds above which a resource gets a hint.
pub mod thresholds {
    /// PSI `some avg10` share (CPU and memory): tasks waited this share of the time.
    pub const PRESSURE: f64 = 0.10;
    pub const CPU_UTILIZATION: f64 = 0.90;
    pub const MEMORY_UTILIZATION: f64 = 0.90;
    pub const DISK_UTILIZATION: f64 = 0.70;
    pub const DISK_QUEUE: f64 = 2.0;
    pub const TABLE_UTILIZATION: f64 = 0.80;
}

/// Programs using the most resident memory, for the memory hint: (name, pid, RSS kB).
pub type TopResident = Vec<(String, u32, u64)>;

/// The USE summary between two snapshots of the same host. `top_resident` is asked for only
/// when memory is saturated (it walks /proc).
pub fn summarize(
    before: &HostSnapshot,
    after: &HostSnapshot,
    now_unix: i64,
    top_resident: &dyn Fn() -> TopResident,
) -> UseSummary {
    use thresholds::*;
    let secs = after.at.duration_since(before.at).as_secs_f64().max(1e-3);
    let mut rows = Vec::new();

    // CPU.
    let busy = after.cpu.busy.saturating_sub(before.cpu.busy) as f64;
    let total = after.cpu.total.saturating_sub(before.cpu.total) as f64;
    let util = if total > 0.0 { (busy / total).clamp(0.0, 1.0) } else { 0.0 };
    // The reader itself is one of the runnable tasks.
    let queued = after.runnable.saturating_sub(1);
    let (sat_kind, sat) = match after.cpu_pressure {
        Some(p) => ("psi some avg10", p.some / 100.0),
        None => (
            "runnable beyond CPUs",
            (queued as f64 - after.cpus as f64).max(0.0) / after.cpus as f64,
        ),
    };
    let cpu_saturated = sat > PRESSURE || queued > after.cpus as u64;
    rows.push(UseRow {
        resource: "cpu".into(),
        utilization: Some(util),
        saturation_kind: sat_kind.into(),
        saturation: Some(sat),
        errors: None,
        detail: format!("{} CPUs, {queued} other runnable tasks", after.cpus),
        hint: (cpu_saturated || util > CPU_UTILIZATION).then(|| {
            format!(
                "CPU {}: see where the time goes in .optbin/flame.svg (the machine's flame graph)",
                if cpu_saturated { "saturated" } else { "busy" }
            )
        }),
    });

    // Memory.
    let mem_util = if after.mem_total_kb > 0 {
        1.0 - after.mem_available_kb as f64 / after.mem_total_kb as f64
    } else {
        0.0
    };
    let swapped = (after.swap_in_pages + after.swap_out_pages)
        .saturating_sub(before.swap_in_pages + before.swap_out_pages) as f64
        / secs;
    let mem_sat = after.memory_pressure.map(|p| p.some / 100.0);
    let ooms = after.oom_kills.saturating_sub(before.oom_kills);
    let mem_saturated = mem_sat.is_some_and(|s| s > PRESSURE) || swapped > 100.0 || ooms > 0;
    rows.push(UseRow {
        resource: "memory".into(),
        utilization: Some(mem_util.clamp(0.0, 1.0)),
        saturation_kind: if mem_sat.is_some() { "psi some avg10" } else { "unavailable" }.into(),
        saturation: mem_sat,
        errors: Some(ooms),
        detail: format!(
            "{} of {} in use, {swapped:.0} pages swapped/s",
            ByteSize::kib(after.mem_total_kb - after.mem_available_kb.min(after.mem_total_kb))
                .display()
                .iec(),
            ByteSize::kib(after.mem_total_kb).display().iec()
        ),
        hint: (mem_saturated || mem_util > MEMORY_UTILIZATION).then(|| {
            let top: Vec<String> = top_resident()
                .iter()
                .map(|(name, pid, kb)| {
                    format!("{name} ({pid}) {}", ByteSize::kib(*kb).display().iec())
                })
                .collect();
            format!(
                "memory {}: the top resident processes are {}",
                if mem_saturated { "saturated" } else { "nearly full" },
                if top.is_empty() { "unknown".to_string() } else { top.join(", ") }
            )
        }),
    });

    // Disks.
    for d in &after.disks {
        let Some(b) = before.disks.iter().find(|b| b.name == d.name) else { continue };
        let ms = secs * 1000.0;
        let util = (d.io_ticks_ms.saturating_sub(b.io_ticks_ms) as f64 / ms).clamp(0.0, 1.0);
        let queue = d.weighted_ms.saturating_sub(b.weighted_ms) as f64 / ms;
        let iops = d.ios.saturating_sub(b.ios) as f64 / secs;
        let io_psi = after.io_pressure.map(|p| p.some).unwrap_or(0.0);
        rows.push(UseRow {
            resource: format!("disk {}", d.name),
            utilization: Some(util),
            saturation_kind: "queue length".into(),
            saturation: Some(queue),
            errors: None,
            detail: format!("{iops:.0} IO/s, io pressure {io_psi:.1}%"),
            hint: (util > DISK_UTILIZATION || queue > DISK_QUEUE).then(|| {
                format!(
                    "disk {} busy: see which processes do I/O in /proc/PID/io (or `pidstat -d`)",
                    d.name
                )
            }),
        });
    }

    // Network interfaces.
    for n in &after.nets {
        let Some(b) = before.nets.iter().find(|b| b.name == n.name) else { continue };
        let rx = n.rx_bytes.saturating_sub(b.rx_bytes) as f64 / secs;
        let tx = n.tx_bytes.saturating_sub(b.tx_bytes) as f64 / secs;
        let util = n.speed_mbps.map(|s| (rx.max(tx) * 8.0 / (s as f64 * 1e6)).clamp(0.0, 1.0));
        let drops = n.drops.saturating_sub(b.drops) as f64 / secs;
        let errors = n.errors.saturating_sub(b.errors);
        rows.push(UseRow {
            resource: format!("net {}", n.name),
            utilization: util,
            saturation_kind: "drops/s".into(),
            saturation: Some(drops),
            errors: Some(errors),
            detail: format!(
                "rx {}/s, tx {}/s{}",
                ByteSize(rx as u64).display().iec(),
                ByteSize(tx as u64).display().iec(),
                n.speed_mbps
                    .map_or(", link speed unknown".into(), |s| format!(", link {s} Mbit/s"))
            ),
            hint: (errors > 0 || drops > 1.0 || util.is_some_and(|u| u > 0.8)).then(|| {
                format!("net {}: errors or drops; see `ip -s link show {}`", n.name, n.name)
            }),
        });
    }

    // Task and file tables.
    let tasks = after.threads_max.map(|m| after.threads as f64 / m.max(1) as f64);
    rows.push(UseRow {
        resource: "tasks".into(),
        utilization: tasks,
        saturation_kind: "-".into(),
        saturation: None,
        errors: None,
        detail: format!(
            "{} threads of {}",
            after.threads,
            after.threads_max.map_or("?".into(), |m| m.to_string())
        ),
        hint: tasks.filter(|&u| u > TABLE_UTILIZATION).map(|_| {
            "task table nearly full: see which programs fork most (`ps -eLf | wc -l` per parent)"
                .into()
        }),
    });
    let files = after.files_max.map(|m| after.files_open as f64 / m.max(1) as f64);
    rows.push(UseRow {
        resource: "files".into(),
        utilization: files,
        saturation_kind: "-".into(),
        saturation: None,
        errors: None,
        detail: format!(
            "{} open files of {}",
            after.files_open,
            after.files_max.map_or("?".into(), |m| m.to_string())
        ),
        hint: files.filter(|&u| u > TABLE_UTILIZATION).map(|_| {
            "file table nearly full: count /proc/PID/fd per process to find the holder".into()
        }),
    });
    UseSummary { at: now_unix, interval_secs: secs, resources: rows }
}

/// The processes with the largest resident sets, from /proc/PID/status.
pub fn top_resident(limit: usize) -> TopResident {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut all: TopResident = dir
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let status = std::fs::read_to_string(e.path().join("status")).ok()?;
            let name = status.lines().find_map(|l| l.strip_prefix("Name:"))?.trim().to_string();
            let rss = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            Some((name, pid, rss))
        })
        .collect();
    all.sort_by_key(|p| std::cmp::Reverse(p.2));
    all.truncate(limit);
    all
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{:.1}%", v * 100.0))
}

/// The saturation figure as people read it: a share as percent, others as numbers.
pub fn saturation_text(row: &UseRow) -> String {
    match row.saturation {
        None => "-".into(),
        Some(s) if row.saturation_kind.starts_with("psi") => format!("{:.1}%", s * 100.0),
        Some(s) if row.saturation_kind == "runnable beyond CPUs" => format!("{s:.2}x"),
        Some(s) => format!("{s:.2}"),
    }
}

/// The table for people (`.optbin/host/use`, `optbin use`).
pub fn render_text(summary: &UseSummary) -> String {
    let mut out = String::new();
    let at = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(summary.at.max(0) as u64),
    );
    let _ = writeln!(out, "host USE summary at {at} (over {:.0} s)", summary.interval_secs);
    let rows: Vec<[String; 6]> = summary
        .resources
        .iter()
        .map(|r| {
            [
                r.resource.clone(),
                pct(r.utilization),
                saturation_text(r),
                r.saturation_kind.clone(),
                r.errors.map_or("-".into(), |e| e.to_string()),
                r.detail.clone(),
            ]
        })
        .collect();
    let header = ["RESOURCE", "UTIL", "SATURATION", "(AS)", "ERRORS", "DETAIL"];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    for row in std::iter::once(header.map(String::from)).chain(rows) {
        let mut line = String::new();
        for (i, (c, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(c);
            } else {
                let _ = write!(line, "{c:<w$}  ");
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    let hints: Vec<&str> = summary.resources.iter().filter_map(|r| r.hint.as_deref()).collect();
    if hints.is_empty() {
        let _ = writeln!(out, "\nno resource crossed a threshold");
    } else {
        let _ = writeln!(out);
        for h in hints {
            let _ = writeln!(out, "hint: {h}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn snap(at: Instant, busy: u64, total: u64, runnable: u64) -> HostSnapshot {
        HostSnapshot {
            at,
            cpus: 2,
            cpu: CpuTimes { busy, total },
            runnable,
            threads: 300,
            threads_max: Some(60_000),
            cpu_pressure: None,
            memory_pressure: Some(Pressure { some: 0.0, full: Some(0.0) }),
            io_pressure: None,
            mem_total_kb: 8 << 20,
            mem_available_kb: 6 << 20,
            swap_in_pages: 0,
            swap_out_pages: 0,
            oom_kills: 0,
            disks: vec![DiskCounters {
                name: "vda".into(),
                io_ticks_ms: 0,
                weighted_ms: 0,
                ios: 0,
            }],
            nets: vec![NetCounters {
                name: "eth0".into(),
                speed_mbps: Some(1000),
                ..Default::default()
            }],
            files_open: 1000,
            files_max: Some(100_000),
        }
    }

    #[test]
    fn proc_files_parse() {
        let (cpu, n) =
            parse_stat("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\ncpu1 1 2 3 4\nintr 5\n");
        assert_eq!((cpu.busy, cpu.total, n), (150, 1000, 2));
        assert_eq!(parse_loadavg("13.67 6.41 2.74 18/247 18220\n"), Some((18, 247)));
        let p = parse_pressure("some avg10=99.15 avg60=93.48 avg300=48.04 total=1\nfull avg10=1.50 avg60=0 avg300=0 total=0\n").unwrap();
        assert_eq!((p.some, p.full), (99.15, Some(1.5)));
        let disks = parse_diskstats(
            "   7 0 loop0 0 0 0 0 0 0 0 0 0 0 0 0\n 254 0 vda 10 0 0 0 5 0 0 0 0 700 900\n 254 1 vda1 1 0 0 0 1 0 0 0 0 7 9\n 259 0 nvme0n1 1 0 0 0 1 0 0 0 0 7 9\n 259 1 nvme0n1p1 1 0 0 0 1 0 0 0 0 7 9\n",
        );
        let names: Vec<&str> = disks.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["vda", "vda1", "nvme0n1", "nvme0n1p1"]);
        assert_eq!((disks[0].ios, disks[0].io_ticks_ms, disks[0].weighted_ms), (15, 700, 900));
        let nets = parse_net_dev(
            "h1\nh2\n    lo: 1 2 0 0 0 0 0 0 1 2 0 0 0 0 0 0\n  eth0: 100 2 3 4 0 0 0 0 200 2 5 6 0 0 0 0\n",
        );
        assert_eq!(nets.len(), 1);
        assert_eq!(
            (nets[0].rx_bytes, nets[0].tx_bytes, nets[0].errors, nets[0].drops),
            (100, 200, 8, 10)
        );
        assert_eq!(parse_file_nr("2202\t0\t2466116\n"), Some((2202, 2466116)));
    }

    #[test]
    fn a_busy_cpu_without_psi_is_saturated_by_its_run_queue_and_gets_a_hint() {
        let t0 = Instant::now();
        let before = snap(t0, 0, 0, 1);
        let after = snap(t0 + Duration::from_secs(10), 1900, 2000, 7);
        let s = summarize(&before, &after, 1_000, &|| vec![]);
        let cpu = s.row("cpu").unwrap();
        assert_eq!(cpu.utilization, Some(0.95));
        assert_eq!(cpu.saturation, Some(2.0), "6 queued on 2 CPUs: 2x beyond");
        assert!(cpu.hint.as_deref().unwrap().contains("flame.svg"));
        let mem = s.row("memory").unwrap();
        assert_eq!(mem.utilization, Some(0.25));
        assert!(mem.hint.is_none());
        assert!(s.row("disk vda").is_some() && s.row("net eth0").is_some());
        let text = render_text(&s);
        assert!(text.contains("hint: CPU saturated"), "{text}");
    }

    #[test]
    fn an_idle_host_has_no_hints() {
        let t0 = Instant::now();
        let s = summarize(
            &snap(t0, 0, 0, 1),
            &snap(t0 + Duration::from_secs(10), 10, 2000, 1),
            0,
            &|| vec![],
        );
        assert!(s.resources.iter().all(|r| r.hint.is_none()), "{s:?}");
        for r in &s.resources {
            if let Some(u) = r.utilization {
                assert!((0.0..=1.0).contains(&u), "{r:?}");
            }
        }
    }

    #[test]
    fn this_host_reads() {
        let a = HostSnapshot::read(Path::new("/")).unwrap();
        assert!(a.cpus >= 1 && a.mem_total_kb > 0);
    }
}
