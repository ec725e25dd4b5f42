//! Memory pressure from PSI (`/proc/pressure/memory`, kernels >= 4.20 built with PSI).
//! Warming reads pages in: when the kernel is already stalling tasks to find memory, that
//! would fight reclaim, so warming backs off.

use std::path::Path;

/// The `some` line of a PSI file: the share of time at least one task stalled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pressure {
    pub some_avg10: f64,
    pub some_avg60: f64,
}

/// Parses a PSI file's text (`some avg10=1.00 avg60=0.27 avg300=0.06 total=221180`).
pub fn parse(text: &str) -> Option<Pressure> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    let field = |name: &str| -> Option<f64> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))?
            .parse()
            .ok()
    };
    Some(Pressure { some_avg10: field("avg10")?, some_avg60: field("avg60")? })
}

/// Reads the machine's memory pressure; `None` where the kernel has no PSI.
pub fn read(path: &Path) -> Option<Pressure> {
    parse(&std::fs::read_to_string(path).ok()?)
}

/// The default PSI file.
pub const MEMORY_PSI: &str = "/proc/pressure/memory";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernel_format() {
        let p = parse(
            "some avg10=14.03 avg60=3.73 avg300=0.84 total=3058146\n\
             full avg10=0.00 avg60=0.00 avg300=0.00 total=19188\n",
        )
        .unwrap();
        assert_eq!(p, Pressure { some_avg10: 14.03, some_avg60: 3.73 });
    }

    #[test]
    fn garbage_is_none() {
        assert_eq!(parse(""), None);
        assert_eq!(parse("some avg10=x avg60=1"), None);
        assert_eq!(parse("full avg10=1 avg60=1"), None);
    }

    #[test]
    fn this_machine_has_psi_or_says_none() {
        // Either a value in range or None; never a panic.
        if let Some(p) = read(Path::new(MEMORY_PSI)) {
            assert!((0.0..=100.0).contains(&p.some_avg10));
        }
    }
}
