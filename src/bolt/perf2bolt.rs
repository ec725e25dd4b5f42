//! Profiles through the `perf` command line and `perf2bolt`, for tests and benchmarks (the
//! daemon's own profiles come from its sampler). Inputs are trusted here: the programs are
//! the caller's own builds, so these run as the caller.
//!
//! `perf2bolt` is always the one next to the chosen `llvm-bolt` (never the
//! `/usr/bin/perf2bolt-19` symlink, see [`super::discover`]), with the no-LBR flag of its
//! version (`-nl` in 19, `-ba` in 22).

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::Context;

use super::discover::BoltTool;

/// Runs `program args` under `perf record -e cpu-clock` (the only kind of sampling a VM
/// without a PMU has), writing `perf_data`. Returns the program's stdout.
pub fn record_cpu_clock(
    program: &Path,
    args: &[&str],
    perf_data: &Path,
) -> anyhow::Result<Vec<u8>> {
    let out = Command::new("perf")
        .args(["record", "-q", "-e", "cpu-clock", "-F", "20000", "-o"])
        .arg(perf_data)
        .arg("--")
        .arg(program)
        .args(args)
        .stderr(Stdio::piped())
        .output()
        .context("running perf record")?;
    anyhow::ensure!(
        out.status.success(),
        "perf record {} failed: {}",
        program.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

/// Converts `perf_data` (samples without branch stacks) into a no_lbr fdata file.
pub fn perf_to_fdata(
    tool: &BoltTool,
    binary: &Path,
    perf_data: &Path,
    fdata: &Path,
) -> anyhow::Result<()> {
    let perf2bolt = tool
        .perf2bolt
        .as_ref()
        .with_context(|| format!("no perf2bolt next to {}", tool.llvm_bolt.display()))?;
    let out = Command::new(perf2bolt)
        .arg("-p")
        .arg(perf_data)
        .arg(tool.version.perf2bolt_no_lbr_flag())
        .arg("-o")
        .arg(fdata)
        .arg(binary)
        .output()
        .context("running perf2bolt")?;
    anyhow::ensure!(
        out.status.success(),
        "perf2bolt failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The number of samples in a no_lbr fdata file (the sum of its counts).
pub fn fdata_samples(fdata: &str) -> u64 {
    fdata
        .lines()
        .filter(|l| !l.starts_with("no_lbr"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_no_lbr_samples() {
        let text = "no_lbr cpu-clock:\n1 main 10 40\n1 hot 2a 1000\n";
        assert_eq!(fdata_samples(text), 1040);
    }
}
