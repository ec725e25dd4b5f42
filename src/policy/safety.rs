//! Safety checks, first on every evaluation: crashes and exit codes the original never
//! gave.

use super::*;
use crate::measure::cmdline::UNREAD_CMD;

/// Signals that mean "the program crashed" (as opposed to being stopped by its user).
pub const CRASH_SIGNALS: [i32; 5] =
    [libc::SIGSEGV, libc::SIGILL, libc::SIGBUS, libc::SIGFPE, libc::SIGABRT];

/// Crash and exit-code checks of every variant not yet quarantined.
pub(super) fn safety_incidents(input: &BinaryInput, cfg: &PolicyConfig) -> Vec<Incident> {
    #[derive(Default)]
    struct Seen {
        signals: HashSet<i32>,
        codes: HashSet<i32>,
    }
    let every_run = input.every_run();
    // Per command, and over every command: what a run whose command was not read
    // (`UNREAD_CMD`, a bound run outside the sample) is compared with.
    let mut original: HashMap<&str, Seen> = HashMap::new();
    let mut any_command = Seen::default();
    for r in every_run.iter().filter(|r| r.variant_id.is_none()) {
        let e = original.entry(&r.cmd_hash).or_default();
        match r.exit {
            RunExit::Exited(c) => (e.codes.insert(c), any_command.codes.insert(c)),
            RunExit::Signaled(s) => (e.signals.insert(s), any_command.signals.insert(s)),
        };
    }
    let mut out = Vec::new();
    for v in input.variants.iter().filter(|v| v.state != VariantState::Quarantined) {
        let mut strikes: Vec<&RunInput> = Vec::new();
        for r in every_run.iter().filter(|r| r.variant_id == Some(v.id)) {
            let orig = if r.cmd_hash == UNREAD_CMD {
                (!original.is_empty()).then_some(&any_command)
            } else {
                original.get(r.cmd_hash.as_str())
            };
            match r.exit {
                RunExit::Signaled(s)
                    if CRASH_SIGNALS.contains(&s)
                        && !orig.is_some_and(|o| o.signals.contains(&s)) =>
                {
                    out.push(Incident {
                        variant_id: v.id,
                        run_id: r.id,
                        cmd_hash: r.cmd_hash.clone(),
                        exit: r.exit,
                        kind: IncidentKind::Crash,
                        detail: format!(
                            "killed by {} on {}, which the original never was",
                            signal_name(s),
                            command_of(&r.cmd_hash)
                        ),
                    });
                    break;
                }
                RunExit::Exited(c)
                    if orig.is_some_and(|o| !o.codes.is_empty() && !o.codes.contains(&c)) =>
                {
                    strikes.push(r);
                    if strikes.len() >= cfg.suspicious_exit_strikes.max(1) {
                        out.push(Incident {
                            variant_id: v.id,
                            run_id: r.id,
                            cmd_hash: r.cmd_hash.clone(),
                            exit: r.exit,
                            kind: IncidentKind::SuspiciousExit,
                            detail: format!(
                                "{} runs exited with codes the original never gave \
                                 (last: {c} on {})",
                                strikes.len(),
                                command_of(&r.cmd_hash)
                            ),
                        });
                        break;
                    }
                }
                _ => {}
            }
        }
    }
    out
}

/// How an incident names its run's command: the command's hash, or that it was not read
/// (then the original's runs of every command were the reference, see [`UNREAD_CMD`]).
fn command_of(cmd_hash: &str) -> String {
    if cmd_hash == UNREAD_CMD {
        "a command not read (compared with the original's runs of every command)".into()
    } else {
        format!("command {cmd_hash}")
    }
}

/// "SIGSEGV (11)".
pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGILL => "SIGILL",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGABRT => "SIGABRT",
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGPIPE => "SIGPIPE",
        _ => "signal",
    };
    format!("{name} ({sig})")
}
