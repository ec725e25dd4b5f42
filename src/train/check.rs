//! The output check of training commands: while a binary has a variant in canary or served,
//! each of its training commands is run once against the original, the variant and the
//! original again, and the variant's stdout and exit status are compared with the
//! original's (the check `optbin bench` makes). A difference while the original agreed with
//! itself is recorded in the catalog as an `output_mismatch` incident and the path is
//! refreshed: the policy, the one source of serving decisions, rejects the variant with the
//! check's reason (`crate::policy`), so status and `optbin report` show why.
//!
//! Why these runs and not the training runs through the mount: the mount draws the arm per
//! exec at random, and the process cannot tell which one it got, so a mount run checks the
//! variant only by chance. Run directly, each arm is checked every time, from one private
//! path (`<tmp>/<the original's file name>`, the file replaced between runs) so that argv[0]
//! and `/proc/self/exe` are the same for both, as the user of the command, with its
//! directory and environment. These runs are not measured: the policy never sees them.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use serde::Serialize;

use crate::catalog::base::{self, VariantRow, VariantState};
use crate::catalog::{Catalog, runs};
use crate::identity::{ContentId, FileKey};
use crate::measure::RunExit;
use crate::train::file::TrainCommand;
use crate::train::run::{Captured, Outcome, run_captured};

/// Re-derives what the mount serves for a path (the serving reconciler's refresh).
pub type Refresh = Arc<dyn Fn(&Path) + Send + Sync>;

/// What the check needs from the daemon: the catalog (which variants are in play, where to
/// record a mismatch) and the refresh that makes the policy act on it at once.
#[derive(Clone)]
pub struct OutputCheck {
    pub catalog: Catalog,
    pub refresh: Refresh,
}

/// One check's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// The variant gave the original's stdout and exit status.
    Same,
    /// It did not: the reason the policy rejects it with, and how the variant's run ended.
    Differs {
        detail: String,
        #[serde(skip)]
        exit: Option<RunExit>,
    },
    /// No verdict (the original's own output varies, a run timed out, ...).
    NotCompared { why: String },
}

/// One run's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub outcome: Outcome,
    pub out: Captured,
}

fn shown(a: &Answer) -> String {
    format!("{}, stdout {} bytes {:?}", a.outcome, a.out.len, a.out.preview)
}

/// The verdict on `variant` against the original's two runs around it, for the training
/// command named `command`.
pub fn compare(command: &str, original: &Answer, again: &Answer, variant: &Answer) -> Verdict {
    let finished = |a: &Answer| matches!(a.outcome, Outcome::Exited(_) | Outcome::Signaled(_));
    if let Some(a) = [original, variant, again].into_iter().find(|a| !finished(a)) {
        return Verdict::NotCompared { why: format!("a run ended {}", a.outcome) };
    }
    let same = |a: &Answer, b: &Answer| a.outcome == b.outcome && a.out.sha256 == b.out.sha256;
    if !same(original, again) {
        return Verdict::NotCompared {
            why: format!(
                "the original's own output varies between runs ({} / {}): a difference would \
                 prove nothing",
                shown(original),
                shown(again)
            ),
        };
    }
    if same(original, variant) {
        return Verdict::Same;
    }
    let exit = match variant.outcome {
        Outcome::Exited(c) => Some(RunExit::Exited(c)),
        Outcome::Signaled(s) => Some(RunExit::Signaled(s)),
        Outcome::TimedOut | Outcome::Stopped => None,
    };
    Verdict::Differs {
        exit,
        detail: format!(
            "output differs from the original's on training command {command}: original {}; \
             variant {}",
            shown(original),
            shown(variant)
        ),
    }
}

/// The variants of the content now at `original` that are canaried or served, with the
/// binary's id (None: the path is not indexed as it is now).
pub fn variants_in_play(
    catalog: &Catalog,
    original: &Path,
) -> anyhow::Result<Option<(i64, Vec<VariantRow>)>> {
    let key = FileKey::of(original).with_context(|| format!("{}", original.display()))?;
    let text = original.to_string_lossy().into_owned();
    catalog.run_blocking(move |c| {
        let Some(row) = base::path_row(c, &text)? else { return Ok(None) };
        let Some(binary_id) = row.binary_id.filter(|_| row.key == key) else { return Ok(None) };
        let variants = base::variants_of(c, binary_id)?
            .into_iter()
            .filter(|v| v.kind.is_policed())
            .filter(|v| matches!(v.state, VariantState::Canary | VariantState::Served))
            .collect();
        Ok(Some((binary_id, variants)))
    })
}

/// Runs `cmd` against the original, `variant` and the original again; see the module doc.
pub fn check_variant(
    cmd: &TrainCommand,
    mountpoint: &Path,
    original: &Path,
    variant: &VariantRow,
    stop: &AtomicBool,
) -> anyhow::Result<Verdict> {
    let original_bytes =
        std::fs::read(original).with_context(|| format!("reading {}", original.display()))?;
    let variant_bytes = std::fs::read(&variant.store_path)
        .with_context(|| format!("reading variant {} at {}", variant.id, variant.store_path))?;
    if ContentId::of_bytes(&variant_bytes).hex() != variant.sha256 {
        return Ok(Verdict::NotCompared {
            why: format!("{} does not hold variant {}'s bytes", variant.store_path, variant.id),
        });
    }
    let name = original.file_name().context("a binary path without a file name")?.to_os_string();
    // Root-owned, searchable only: the command's user can run the file, not list or change it.
    let dir = tempfile::Builder::new().prefix("optbin-train-check").tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))?;
    let program = dir.path().join(&name);
    let place = |bytes: &[u8]| -> anyhow::Result<()> {
        let next = dir.path().join(".next");
        std::fs::write(&next, bytes).with_context(|| format!("writing {}", next.display()))?;
        std::fs::set_permissions(&next, std::fs::Permissions::from_mode(0o755))?;
        std::fs::rename(&next, &program).with_context(|| format!("placing {}", program.display()))
    };
    let answer = |bytes: &[u8]| -> anyhow::Result<Answer> {
        place(bytes)?;
        let (outcome, out) = run_captured(cmd, mountpoint, &program, &name, stop)?;
        Ok(Answer { outcome, out })
    };
    let first = answer(&original_bytes)?;
    let theirs = answer(&variant_bytes)?;
    let again = answer(&original_bytes)?;
    Ok(compare(&command_name(cmd), &first, &again, &theirs))
}

/// How status and the reason name a training command: its file's name.
pub fn command_name(cmd: &TrainCommand) -> String {
    cmd.file
        .file_name()
        .map_or_else(|| cmd.file.display().to_string(), |n| n.to_string_lossy().into_owned())
}

impl OutputCheck {
    /// Records a mismatch for the policy and makes it act on it now.
    pub fn record_mismatch(
        &self,
        original: &Path,
        binary_id: i64,
        variant_id: i64,
        cmd_file: &Path,
        detail: &str,
        exit: Option<RunExit>,
    ) -> anyhow::Result<()> {
        let (command, detail) = (cmd_file.display().to_string(), detail.to_string());
        let at_ms = crate::clock::Clock::unix_ms(&crate::clock::SystemClock);
        self.catalog.run_blocking(move |c| {
            runs::insert_output_mismatch(c, at_ms, binary_id, variant_id, &command, exit, &detail)?;
            Ok(())
        })?;
        (self.refresh)(original);
        Ok(())
    }
}

/// Where a check's result is kept per command and variant.
pub type CheckKey = (PathBuf, i64);

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(outcome: Outcome, out: &str) -> Answer {
        Answer {
            outcome,
            out: Captured {
                sha256: format!("sha-{out}"),
                len: out.len() as u64,
                preview: out.into(),
            },
        }
    }

    #[test]
    fn verdicts() {
        let ok = answer(Outcome::Exited(0), "42\n");
        assert_eq!(compare("t.toml", &ok, &ok, &ok), Verdict::Same);
        let Verdict::Differs { detail, exit } =
            compare("t.toml", &ok, &ok, &answer(Outcome::Exited(0), "41\n"))
        else {
            panic!("a different stdout differs")
        };
        assert!(
            detail.starts_with("output differs from the original's on training command t.toml")
        );
        assert!(detail.contains("\"41\\n\""), "{detail}");
        assert_eq!(exit, Some(RunExit::Exited(0)));
        let code = compare("t.toml", &ok, &ok, &answer(Outcome::Exited(1), "42\n"));
        assert!(matches!(code, Verdict::Differs { .. }), "another exit status differs");
        let crash = compare("t.toml", &ok, &ok, &answer(Outcome::Signaled(11), ""));
        assert!(matches!(crash, Verdict::Differs { .. }));
        // The original disagrees with itself: no verdict, whatever the variant did.
        let varies = compare("t.toml", &ok, &answer(Outcome::Exited(0), "43\n"), &ok);
        assert!(matches!(varies, Verdict::NotCompared { ref why } if why.contains("varies")));
        let slow = compare("t.toml", &ok, &ok, &answer(Outcome::TimedOut, ""));
        assert!(matches!(slow, Verdict::NotCompared { ref why } if why.contains("timed out")));
    }
}
