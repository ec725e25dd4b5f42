//! Simulated canaries and steady states through the real policy: synthetic run times with the noise measured
//! on this project's VMs (per-run noise, outliers, and a slowly wandering load shared by
//! both arms), fed exec by exec through [`evaluate`] and
//! [`ServeDecision::choose`]. Used by the property tests and the policy benchmark.
//!
//! Between two looks the policy's answer cannot change (each look uses exactly the first
//! `m * 2^k` time-adjacent pairs, the final across-commands look exactly the runs up to the
//! variant's budget-th, and a simulated run never crashes), so the simulation evaluates only
//! when the pair count reaches a look or the variant its run budget; that keeps thousands
//! of trials cheap.

use std::collections::HashMap;

use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

use super::stats::median;
use super::{
    BinaryInput, PolicyConfig, RunInput, ServeDecision, VariantInput, VariantState, evaluate,
};
use crate::measure::RunExit;

/// The synthetic workload.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimSpec {
    /// True CPU-time ratio variant/original (0.95 = 5% faster).
    pub true_ratio: f64,
    /// Per-run log-normal noise (0.15: one pair of runs swings about +-20%).
    pub noise_sigma: f64,
    /// Time-correlated load shared by both arms: the stationary standard deviation of an
    /// AR(1) log load factor that multiplies every run's time (0.2: the machine's speed
    /// wanders over about +-20%, as measured on the 2-core VM when other builds run).
    pub load_sigma: f64,
    /// The load's AR(1) coefficient per exec (0.98: a burst lasts tens of execs).
    pub load_phi: f64,
    /// Share of runs hit by an outlier (x1.3 to x2: a busy neighbour on the VM).
    pub outlier_share: f64,
    /// Distinct commands (each with its own base time), drawn uniformly per exec.
    pub commands: usize,
    /// 0: command `c` costs `c + 1` units. Above 0: each command's cost is log-normal with
    /// this sigma around one unit (many commands that each cost differently, as the files a
    /// compiler is run on; with a huge `commands` almost every run is a new command).
    pub command_sigma: f64,
    /// Give up (undecided) after this many execs.
    pub max_execs: usize,
}

impl Default for SimSpec {
    fn default() -> Self {
        Self {
            true_ratio: 1.0,
            noise_sigma: 0.15,
            load_sigma: 0.2,
            load_phi: 0.98,
            outlier_share: 0.05,
            commands: 3,
            command_sigma: 0.0,
            max_execs: 5000,
        }
    }
}

/// How a simulated canary ended.
#[derive(Debug, Clone, PartialEq)]
pub enum SimOutcome {
    Promoted { execs: usize, variant_runs: usize },
    Rejected { execs: usize, reason: String },
    Undecided { execs: usize },
}

fn normal(rng: &mut Xoshiro256PlusPlus) -> f64 {
    // Box-Muller.
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// The synthetic machine: draws the arm of each exec from a [`ServeDecision`] the way the
/// serving table does (antithetic pairs of draws, see `crate::fs::serving`), times the
/// run, appends it to the input, and counts the time-adjacent pairs the way
/// [`super::pair_in_exec_order`] forms them (to know when a look or a block is due).
struct Machine {
    spec: SimSpec,
    rng: Xoshiro256PlusPlus,
    /// The antithetic draw owed to the next exec.
    owed: Option<f64>,
    load: f64,
    /// The waiting run's arm per command (true: variant).
    waiting: HashMap<usize, bool>,
    pairs: usize,
}

impl Machine {
    fn new(spec: &SimSpec, seed: u64) -> Self {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let load = spec.load_sigma * normal(&mut rng);
        Self { spec: *spec, rng, owed: None, load, waiting: HashMap::new(), pairs: 0 }
    }

    /// Runs one exec; returns whether it completed a pair.
    fn exec(&mut self, serve: &ServeDecision, input: &mut BinaryInput) -> bool {
        let spec = &self.spec;
        let rng = &mut self.rng;
        let u = match self.owed.take() {
            Some(u) => u,
            None => {
                let u = rng.random::<f64>();
                self.owed = Some(1.0 - u);
                u
            }
        };
        let variant = serve.choose(u);
        let cmd = rng.random_range(0..spec.commands.max(1));
        let base = if spec.command_sigma > 0.0 {
            // A fixed cost per command, from a hash of it: no table for huge command counts.
            let mut h = Xoshiro256PlusPlus::seed_from_u64(cmd as u64 ^ 0x9E37_79B9_7F4A_7C15);
            50e6 * (spec.command_sigma * normal(&mut h)).exp()
        } else {
            50e6 * (1.0 + cmd as f64)
        };
        let phi = spec.load_phi.clamp(0.0, 1.0);
        self.load = phi * self.load + (1.0 - phi * phi).sqrt() * spec.load_sigma * normal(rng);
        let mut t = base * (self.load + spec.noise_sigma * normal(rng)).exp();
        if rng.random::<f64>() < spec.outlier_share {
            t *= rng.random_range(1.3..2.0);
        }
        if variant.is_some() {
            t *= spec.true_ratio;
        }
        input.runs.push(RunInput {
            id: input.next_run_id,
            variant_id: variant,
            cmd_hash: format!("cmd{cmd}"),
            cpu_ns: t as u64,
            exit: RunExit::Exited(0),
        });
        input.next_run_id += 1;
        let is_variant = variant.is_some();
        let paired = self.waiting.get(&cmd) == Some(&!is_variant);
        if paired {
            self.waiting.remove(&cmd);
        } else {
            self.waiting.insert(cmd, is_variant);
        }
        self.pairs += usize::from(paired);
        paired
    }
}

fn one_variant(state: VariantState, from_run: Option<i64>) -> BinaryInput {
    BinaryInput {
        binary_id: 1,
        variants: vec![VariantInput {
            id: 1,
            state,
            canary_from_run: from_run,
            served_from_run: from_run,
            note: None,
            challenger: false,
            output_mismatch: None,
        }],
        runs: Vec::new(),
        next_run_id: 1,
        ..Default::default()
    }
}

/// One seeded canary from "variant ready" to promotion, rejection or `max_execs`.
pub fn simulate_canary(spec: &SimSpec, cfg: &PolicyConfig, seed: u64) -> SimOutcome {
    let mut machine = Machine::new(spec, seed);
    let mut input = one_variant(VariantState::Ready, None);
    let checkpoints = cfg.checkpoints();
    let budget = super::canary_run_budget(cfg);
    let mut nv = 0usize;
    let mut serve = ServeDecision::Original;
    let mut must_evaluate = true;
    for exec in 0..spec.max_execs {
        if must_evaluate {
            let eval = evaluate(&input, cfg);
            for t in &eval.transitions {
                let v = &mut input.variants[0];
                v.state = t.to;
                match t.to {
                    VariantState::Canary => v.canary_from_run = t.first_run_id,
                    VariantState::Served => {
                        return SimOutcome::Promoted { execs: exec, variant_runs: nv };
                    }
                    _ => return SimOutcome::Rejected { execs: exec, reason: t.detail.clone() },
                }
            }
            if eval.serve != serve {
                // The serving table forgets its draws when an entry changes.
                machine.owed = None;
            }
            serve = eval.serve;
        }
        let paired = machine.exec(&serve, &mut input);
        let to_variant = input.runs.last().is_some_and(|r| r.variant_id.is_some());
        nv += usize::from(to_variant);
        must_evaluate =
            (paired && checkpoints.contains(&machine.pairs)) || (to_variant && nv == budget);
    }
    SimOutcome::Undecided { execs: spec.max_execs }
}

/// One seeded steady state: a variant served from the first exec (the original gets the
/// exploration share), run for `spec.max_execs` execs; returns the exec at which the
/// drift check sent it back to canary, if it did. The policy is evaluated whenever a drift
/// block (`2 * min_runs_per_arm` pairs) completes: in between its answer cannot change.
pub fn simulate_served(spec: &SimSpec, cfg: &PolicyConfig, seed: u64) -> Option<usize> {
    let mut machine = Machine::new(spec, seed);
    let mut input = one_variant(VariantState::Served, Some(1));
    let block = 2 * cfg.min_runs_per_arm.max(1);
    let serve = evaluate(&input, cfg).serve;
    for exec in 0..spec.max_execs {
        if machine.exec(&serve, &mut input) && machine.pairs.is_multiple_of(block) {
            let eval = evaluate(&input, cfg);
            if eval.transitions.iter().any(|t| t.to == VariantState::Canary) {
                return Some(exec + 1);
            }
        }
    }
    None
}

/// Aggregate of many seeded trials.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct TrialSummary {
    pub trials: usize,
    pub promoted: usize,
    pub rejected: usize,
    pub undecided: usize,
    /// Median execs until a decision (promotion or rejection); 0 when none was decided.
    pub median_execs_to_decision: f64,
    /// Median execs until promotion (over promoted trials).
    pub median_execs_to_promotion: Option<f64>,
}

impl TrialSummary {
    pub fn promotion_rate(&self) -> f64 {
        self.promoted as f64 / self.trials.max(1) as f64
    }

    pub fn rejection_rate(&self) -> f64 {
        self.rejected as f64 / self.trials.max(1) as f64
    }
}

/// Runs `trials` canaries with seeds `seed0..seed0+trials`.
pub fn run_trials(spec: &SimSpec, cfg: &PolicyConfig, trials: usize, seed0: u64) -> TrialSummary {
    let mut s = TrialSummary { trials, ..Default::default() };
    let mut decided = Vec::new();
    let mut promoted = Vec::new();
    for i in 0..trials {
        match simulate_canary(spec, cfg, seed0 + i as u64) {
            SimOutcome::Promoted { execs, .. } => {
                s.promoted += 1;
                decided.push(execs as f64);
                promoted.push(execs as f64);
            }
            SimOutcome::Rejected { execs, .. } => {
                s.rejected += 1;
                decided.push(execs as f64);
            }
            SimOutcome::Undecided { .. } => s.undecided += 1,
        }
    }
    s.median_execs_to_decision = median(&mut decided).unwrap_or(0.0);
    s.median_execs_to_promotion = median(&mut promoted);
    s
}
