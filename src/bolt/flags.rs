//! The exact `llvm-bolt` command line for a plan (pure).
//!
//! The optimization flags are the ones measured to work on this machine (BRIEF):
//! `-reorder-blocks=ext-tsp -reorder-functions=cdsort -split-functions -split-all-cold
//! -split-eh -dyno-stats -use-gnu-stack`. Non-relocation mode drops `-reorder-functions`
//! (BOLT rejects it there). Checked against `llvm-bolt --help-hidden` of bolt-19 (19.1.7)
//! and bolt-22 (22.1.8): every flag used here exists with the same meaning in both
//! (`cdsort` and `ext-tsp` are values in both; 22 only adds options), so the command line
//! does not depend on the version. The one difference that matters is perf2bolt's no-LBR
//! flag (`-nl` vs `-ba`), see [`super::discover::BoltVersion::perf2bolt_no_lbr_flag`].
//!
//! Argument order is fixed and relied on by tests' fake BOLTs: `<input> -o <output>`, then
//! the rest.
//!
//! Instrumentation (`-instrument -instrumentation-file=PATH`): the instrumented binary
//! writes its profile when it exits, as whatever user ran it. So the profile directory
//! must be writable by every user who may run it, and nobody must be able to plant or read
//! others' files there: optbin uses a root-owned directory with mode 1733 (sticky, write
//! and search for all, no listing), and `-instrumentation-file-append-pid` so that
//! concurrent runs do not clobber one file. The daemon reads only names it expects,
//! without following symlinks, and treats their content as untrusted text: a user can at
//! worst skew the profile of a binary they run, which changes performance, never
//! correctness (outputs are still verified and measured).
//! [`super::runner::prepare_instrumentation_dir`] creates such a directory.

use std::path::Path;

use super::applicability::BoltMode;
use super::job::{BoltPlan, ProfileInput};
use super::stale::yaml_beside;

/// Arguments for `llvm-bolt`, given where the input, output and profile are.
/// `placed_profile` is the profile's path as the runner placed it (ignored for
/// instrumentation).
/// A build from fdata also writes its profile as YAML beside the output (`-w`), for the
/// next version of the binary; a build from such a YAML of a previous version adds
/// `-infer-stale-profile` (see [`super::stale`]).
pub fn bolt_args(
    plan: &BoltPlan,
    input: &Path,
    output: &Path,
    placed_profile: Option<&Path>,
) -> Vec<String> {
    let mut args = vec![input.display().to_string(), "-o".into(), output.display().to_string()];
    match &plan.profile {
        ProfileInput::Instrument { profile_file, append_pid, binpath } => {
            args.push("-instrument".into());
            args.push(format!("-instrumentation-file={}", profile_file.display()));
            if *append_pid {
                args.push("-instrumentation-file-append-pid".into());
            }
            if let Some(bin) = binpath {
                args.push(format!("-instrumentation-binpath={}", bin.display()));
            }
        }
        ProfileInput::Fdata(original) | ProfileInput::StaleYaml(original) => {
            let data = placed_profile.unwrap_or(original);
            args.push(format!("-data={}", data.display()));
            if let ProfileInput::StaleYaml(_) = plan.profile {
                args.push("-infer-stale-profile".into());
            } else {
                // Kept for the binary's next version (see `super::stale`).
                args.push(format!("-w={}", yaml_beside(output).display()));
            }
            args.push("-reorder-blocks=ext-tsp".into());
            if plan.mode == BoltMode::Relocations {
                args.push("-reorder-functions=cdsort".into());
            }
            if plan.split_functions {
                args.extend(["-split-functions", "-split-all-cold", "-split-eh"].map(String::from));
            }
            args.push("-dyno-stats".into());
            args.push("-use-gnu-stack".into());
        }
    }
    if plan.mode == BoltMode::NonRelocation {
        // Autodetection would pick relocation mode whenever relocations exist; a ladder
        // step down must really leave it.
        args.push("-relocs=0".into());
    }
    if !plan.skip_funcs.is_empty() {
        args.push(format!("-skip-funcs={}", plan.skip_funcs.join(",")));
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn plan(mode: BoltMode, split: bool) -> BoltPlan {
        BoltPlan {
            mode,
            split_functions: split,
            skip_funcs: vec![],
            profile: ProfileInput::Fdata(PathBuf::from("/p.fdata")),
        }
    }

    #[test]
    fn relocation_mode_uses_the_measured_flags() {
        let args = bolt_args(
            &plan(BoltMode::Relocations, true),
            Path::new("in"),
            Path::new("out"),
            Some(Path::new("s/profile.fdata")),
        );
        assert_eq!(
            args.join(" "),
            "in -o out -data=s/profile.fdata -w=out.yaml -reorder-blocks=ext-tsp \
             -reorder-functions=cdsort -split-functions -split-all-cold -split-eh -dyno-stats \
             -use-gnu-stack"
        );
    }

    #[test]
    fn a_stale_profile_is_inferred_and_not_written_again() {
        let mut p = plan(BoltMode::Relocations, true);
        p.profile = ProfileInput::StaleYaml(PathBuf::from("/kept.yaml"));
        let args = bolt_args(&p, Path::new("in"), Path::new("out"), Some(Path::new("s/p.yaml")));
        assert_eq!(&args[3..5], ["-data=s/p.yaml", "-infer-stale-profile"]);
        assert!(!args.iter().any(|a| a.starts_with("-w")), "{args:?}");
        assert!(args.contains(&"-reorder-functions=cdsort".to_string()));
    }

    #[test]
    fn non_relocation_mode_never_reorders_functions() {
        let mut p = plan(BoltMode::NonRelocation, false);
        p.skip_funcs = vec!["luaV_execute/1".into(), "foo".into()];
        let args = bolt_args(&p, Path::new("in"), Path::new("out"), None);
        assert!(!args.iter().any(|a| a.starts_with("-reorder-functions")));
        assert!(!args.iter().any(|a| a.starts_with("-split")));
        assert!(args.contains(&"-relocs=0".to_string()));
        assert!(args.contains(&"-data=/p.fdata".to_string()));
        assert_eq!(args.last().unwrap(), "-skip-funcs=luaV_execute/1,foo");
    }

    #[test]
    fn instrumentation_has_no_optimization_flags() {
        let p = BoltPlan {
            mode: BoltMode::Relocations,
            split_functions: true,
            skip_funcs: vec![],
            profile: ProfileInput::Instrument {
                profile_file: PathBuf::from("/var/lib/optbin/instr/x.fdata"),
                append_pid: true,
                binpath: Some(PathBuf::from("/var/lib/optbin/instr/x.bin")),
            },
        };
        let args = bolt_args(&p, Path::new("in"), Path::new("out"), None);
        assert_eq!(
            args.join(" "),
            "in -o out -instrument -instrumentation-file=/var/lib/optbin/instr/x.fdata \
             -instrumentation-file-append-pid -instrumentation-binpath=/var/lib/optbin/instr/x.bin"
        );
    }
}
