//! The exact `llvm-bolt` command line for a plan (pure), and the candidate flag sets the
//! flag search tries ([`FLAG_SETS`], filtered by what the installed BOLT accepts with
//! [`BoltOptions`]).
//!
//! The default optimization flags are the ones measured to work on this machine (BRIEF):
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

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde::Serialize;

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
            args.extend(plan.flag_set.optimization_args(plan.mode, plan.split_functions));
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

/// One candidate set of optimization flags: how blocks and functions are laid out, whether
/// functions are split, and extra passes. Every set also gets `-dyno-stats -use-gnu-stack`.
#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct FlagSet {
    /// The name status, the catalog and the config use.
    pub name: &'static str,
    /// Why the set is worth a try (shown in docs and status).
    pub why: &'static str,
    /// `-reorder-blocks=` value.
    pub blocks: &'static str,
    /// `-reorder-functions=` value (relocation mode only: BOLT rejects it otherwise).
    pub functions: &'static str,
    /// Split hot and cold code (`-split-functions -split-all-cold -split-eh`).
    pub split: bool,
    /// Further flags, each `-name` or `-name=value`.
    pub extra: &'static [&'static str],
}

/// The set every first build uses: the flags measured to work on this machine (BRIEF).
pub static DEFAULT_SET: FlagSet = FlagSet {
    name: "default",
    why: "the flags measured to work here: ext-tsp blocks, cdsort functions, splitting",
    blocks: "ext-tsp",
    functions: "cdsort",
    split: true,
    extra: &[],
};

/// The candidate sets in the order the flag search tries them (the default first: it is
/// what the served variant is built with). Each challenger changes one thing against the
/// default, so an outcome says which choice mattered; the order puts first what the
/// measurements here point at (BRIEF: splitting with a thin profile moves code that ran
/// into the cold part; cleanup passes cost nothing when they find nothing).
pub static FLAG_SETS: [&FlagSet; 6] = [
    &DEFAULT_SET,
    &FlagSet {
        name: "cleanup-passes",
        why: "the default plus identical code folding, all peepholes, hot PLT calls and \
              frame optimization of hot functions",
        blocks: "ext-tsp",
        functions: "cdsort",
        split: true,
        extra: &["-icf", "-peepholes=all", "-plt=hot", "-frame-opt=hot"],
    },
    &FlagSet {
        name: "no-split",
        why: "no function splitting: a profile that missed warm code cannot push it away",
        blocks: "ext-tsp",
        functions: "cdsort",
        split: false,
        extra: &[],
    },
    &FlagSet {
        name: "cdsplit",
        why: "three-way splitting (hot, warm, cold) instead of two",
        blocks: "ext-tsp",
        functions: "cdsort",
        split: true,
        extra: &["-split-strategy=cdsplit"],
    },
    &FlagSet {
        name: "hfsort",
        why: "hfsort function ordering instead of cdsort",
        blocks: "ext-tsp",
        functions: "hfsort",
        split: true,
        extra: &[],
    },
    &FlagSet {
        name: "cache-blocks",
        why: "the cache+ block layout instead of ext-tsp",
        blocks: "cache+",
        functions: "cdsort",
        split: true,
        extra: &[],
    },
];

impl FlagSet {
    /// The set with this name, if it is a candidate.
    pub fn named(name: &str) -> Option<&'static FlagSet> {
        FLAG_SETS.iter().copied().find(|s| s.name == name)
    }

    /// The optimization flags of this set in `mode`; `split` is the plan's (the retry
    /// ladder may turn splitting off even for a set that splits).
    pub fn optimization_args(&self, mode: BoltMode, split: bool) -> Vec<String> {
        let mut args = vec![format!("-reorder-blocks={}", self.blocks)];
        if mode == BoltMode::Relocations {
            args.push(format!("-reorder-functions={}", self.functions));
        }
        if split && self.split {
            args.extend(["-split-functions", "-split-all-cold", "-split-eh"].map(String::from));
        }
        args.extend(self.extra.iter().map(|s| s.to_string()));
        args.push("-dyno-stats".into());
        args.push("-use-gnu-stack".into());
        args
    }

    /// Whether the set differs from the default in `mode` (in non-relocation mode a set
    /// that only changes the function order is the default again).
    pub fn differs_from_default(&self, mode: BoltMode) -> bool {
        self.optimization_args(mode, true) != DEFAULT_SET.optimization_args(mode, true)
    }
}

/// The options (and their listed values) an installed `llvm-bolt` accepts, read from
/// `llvm-bolt --help-hidden`: lines `  --name=<value> - text` or `  --name - text`, each
/// followed by its values as `    =value - text`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BoltOptions {
    options: HashMap<String, HashSet<String>>,
}

impl BoltOptions {
    pub fn parse(help: &str) -> Self {
        let mut options: HashMap<String, HashSet<String>> = HashMap::new();
        let mut current: Option<String> = None;
        for line in help.lines() {
            let trimmed = line.trim_start();
            let indent = line.len() - trimmed.len();
            let word = trimmed.split_whitespace().next().unwrap_or("");
            if let Some(opt) = word.strip_prefix("--").or_else(|| word.strip_prefix('-')) {
                let name = opt.split('=').next().unwrap_or(opt).to_string();
                options.entry(name.clone()).or_default();
                current = Some(name);
            } else if let Some(value) = word.strip_prefix('=')
                && indent > 2
                && let Some(name) = &current
            {
                options.entry(name.clone()).or_default().insert(value.to_string());
            }
        }
        Self { options }
    }

    /// Whether `flag` (`-name` or `-name=value`) is accepted: the option exists and, when
    /// it lists values, `value` is one of them.
    pub fn accepts(&self, flag: &str) -> bool {
        let flag = flag.trim_start_matches('-');
        let (name, value) = match flag.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (flag, None),
        };
        match (self.options.get(name), value) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(values), Some(v)) => values.is_empty() || values.contains(v),
        }
    }

    /// The candidate sets this BOLT accepts every flag of, in `mode`.
    pub fn usable_sets(&self, mode: BoltMode) -> Vec<&'static FlagSet> {
        FLAG_SETS
            .iter()
            .copied()
            .filter(|s| s.optimization_args(mode, true).iter().all(|f| self.accepts(f)))
            .collect()
    }

    /// Reads the options of the `llvm-bolt` at `path`.
    pub fn probe(path: &Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        let out = std::process::Command::new(path)
            .arg("--help-hidden")
            .output()
            .with_context(|| format!("running {} --help-hidden", path.display()))?;
        let parsed = Self::parse(&String::from_utf8_lossy(&out.stdout));
        anyhow::ensure!(
            parsed.accepts("-reorder-blocks=ext-tsp"),
            "{} --help-hidden lists no -reorder-blocks=ext-tsp",
            path.display()
        );
        Ok(parsed)
    }
}

/// The flag sets a challenger may use for a binary whose variants are built in `mode`:
/// the usable sets that differ from the default there, in the search order.
pub fn challenger_sets(usable: &[&'static FlagSet], mode: BoltMode) -> Vec<&'static FlagSet> {
    usable.iter().copied().filter(|s| s.differs_from_default(mode)).collect()
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
            flag_set: &DEFAULT_SET,
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
            flag_set: &DEFAULT_SET,
        };
        let args = bolt_args(&p, Path::new("in"), Path::new("out"), None);
        assert_eq!(
            args.join(" "),
            "in -o out -instrument -instrumentation-file=/var/lib/optbin/instr/x.fdata \
             -instrumentation-file-append-pid -instrumentation-binpath=/var/lib/optbin/instr/x.bin"
        );
    }

    const HELP: &str = "  --icf                      - fold functions with identical code
  --peepholes=<value>        - enable peephole optimizations
    =none                    -   disable peepholes
    =all                     -   enable all peephole optimizations
  --reorder-blocks=<value>   - change layout of basic blocks in a function
    =ext-tsp                 -   perform layout optimizing I-cache behavior
    =cache+                  -   perform layout optimizing I-cache behavior
  --reorder-functions=<value> - reorder and cluster functions (works only with relocations)
    =cdsort                  -   use cache-directed sort
  --split-functions          - split functions into fragments
  --split-all-cold           - outline as many cold basic blocks as possible
  --split-eh                 - split C++ exception handling code
  --dyno-stats               - print execution info based on profile
  --use-gnu-stack            - use GNU_STACK program header for new segment
";

    #[test]
    fn options_are_read_from_the_help_with_their_values() {
        let o = BoltOptions::parse(HELP);
        assert!(o.accepts("-icf"));
        assert!(o.accepts("-peepholes=all"));
        assert!(!o.accepts("-peepholes=some"));
        assert!(o.accepts("-reorder-blocks=cache+"));
        assert!(!o.accepts("-reorder-functions=hfsort"));
        assert!(!o.accepts("-plt=hot"), "not listed");
        let names: Vec<&str> =
            o.usable_sets(BoltMode::Relocations).iter().map(|s| s.name).collect();
        assert_eq!(names, ["default", "no-split", "cache-blocks"]);
    }

    #[test]
    fn challengers_differ_from_the_default_in_their_mode() {
        let all: Vec<&FlagSet> = FLAG_SETS.to_vec();
        let reloc: Vec<&str> =
            challenger_sets(&all, BoltMode::Relocations).iter().map(|s| s.name).collect();
        assert_eq!(reloc, ["cleanup-passes", "no-split", "cdsplit", "hfsort", "cache-blocks"]);
        // Without relocations the function order is not BOLT's to change.
        let nonreloc: Vec<&str> =
            challenger_sets(&all, BoltMode::NonRelocation).iter().map(|s| s.name).collect();
        assert!(!nonreloc.contains(&"hfsort") && nonreloc.contains(&"no-split"), "{nonreloc:?}");
        let mut names: Vec<&str> = FLAG_SETS.iter().map(|s| s.name).collect();
        names.dedup();
        assert_eq!(names.len(), FLAG_SETS.len());
        assert_eq!(FlagSet::named("no-split").map(|s| s.split), Some(false));
    }

    #[test]
    fn a_challengers_flags_replace_the_defaults() {
        let mut p = plan(BoltMode::Relocations, true);
        p.flag_set = FlagSet::named("cleanup-passes").unwrap();
        let args = bolt_args(&p, Path::new("in"), Path::new("out"), None);
        let tail = args[5..].join(" ");
        assert_eq!(
            tail,
            "-reorder-blocks=ext-tsp -reorder-functions=cdsort -split-functions -split-all-cold \
             -split-eh -icf -peepholes=all -plt=hot -frame-opt=hot -dyno-stats -use-gnu-stack"
        );
        p.flag_set = FlagSet::named("no-split").unwrap();
        let args = bolt_args(&p, Path::new("in"), Path::new("out"), None);
        assert!(!args.iter().any(|a| a.starts_with("-split")), "{args:?}");
    }

    /// The real BOLTs of this machine, when installed: every candidate set is accepted by
    /// both 19 and 22 (the filter is for other versions).
    #[test]
    fn the_installed_bolts_accept_the_candidate_sets() {
        for v in [19, 22] {
            let path = PathBuf::from(format!("/usr/lib/llvm-{v}/bin/llvm-bolt"));
            if !path.exists() {
                continue;
            }
            let o = BoltOptions::probe(&path).unwrap();
            let names: Vec<&str> =
                o.usable_sets(BoltMode::Relocations).iter().map(|s| s.name).collect();
            assert_eq!(names.len(), FLAG_SETS.len(), "bolt-{v}: {names:?}");
        }
    }
}
