//! Several seeds per run (`compare --seeds N`): the folder and overrides of each seed's training,
//! and one run's per-seed rows folded into its table row (means over the seeds, the spread of the
//! final validation loss, every seed's row kept).
//!
//! Seed k (0-based) of a run trains with the run's own `seed` (the base config's, after `--set` and
//! the run's overrides) plus k: it changes the initial weights, the order of the training windows
//! and the router noise. Seed 0 is the run of a one-seed comparison, in `OUT/NAME`, so going from
//! `--seeds 1` to `--seeds 3` reuses it; seed k > 0 is in `OUT/NAME.seedS` (S the seed itself).

use super::plan::RunPlan;
use super::stats::Spread;
use super::summary::RunSummary;
use anyhow::{bail, Result};

/// One seed's training of a planned run.
#[derive(Clone, Debug, PartialEq)]
pub struct SeedRun {
    /// Index of the run in the plan.
    pub run: usize,
    /// 0..N: the seeds of different runs with the same index are paired.
    pub index: usize,
    pub seed: u64,
    /// The folder name and the overrides (the run's, then `seed=S` for k > 0).
    pub plan: RunPlan,
}

/// The folder of seed `index` of run `name`: `name` itself for seed 0, `name.seedS` after.
pub fn seed_folder(name: &str, index: usize, seed: u64) -> String {
    if index == 0 {
        name.to_string()
    } else {
        format!("{name}.seed{seed}")
    }
}

/// Every seed of every run, run by run: `base_seeds[i]` is run i's resolved `seed`. Fails when two
/// folders would coincide (a run named like another's seed folder).
pub fn expand(plans: &[RunPlan], base_seeds: &[u64], n: usize) -> Result<Vec<SeedRun>> {
    if n == 0 {
        bail!("--seeds must be at least 1");
    }
    let mut out: Vec<SeedRun> = Vec::new();
    for (i, (p, &base)) in plans.iter().zip(base_seeds).enumerate() {
        for k in 0..n {
            let seed = base.wrapping_add(k as u64);
            let mut overrides = p.overrides.clone();
            if k > 0 {
                overrides.push(format!("seed={seed}"));
            }
            let name = seed_folder(&p.name, k, seed);
            if let Some(other) = out.iter().find(|s| s.plan.name == name) {
                bail!(
                    "run folder `{name}` would hold seed {seed} of `{}` and a seed of `{}`: rename one",
                    p.name,
                    plans[other.run].name
                );
            }
            out.push(SeedRun { run: i, index: k, seed, plan: RunPlan { name, overrides } });
        }
    }
    Ok(out)
}

/// The row of run `name` from its seeds' rows (in seed order): "ok" when every seed finished
/// ("failed" with the first failed seed's log otherwise); figures are means over the finished
/// seeds (dead experts rounded), with the spread of the final validation loss.
pub fn aggregate(name: &str, per_seed: Vec<RunSummary>) -> RunSummary {
    let ok: Vec<&RunSummary> = per_seed.iter().filter(|r| r.status == "ok").collect();
    let mean = |f: fn(&RunSummary) -> Option<f64>| -> Option<f64> {
        let xs: Vec<f64> = ok.iter().filter_map(|r| f(r)).collect();
        (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
    };
    let failed = per_seed.iter().find(|r| r.status != "ok");
    let vals: Vec<f64> = ok.iter().filter_map(|r| r.val_loss).collect();
    RunSummary {
        name: name.into(),
        router: per_seed.iter().map(|r| r.router.clone()).find(|r| r != "?").unwrap_or_else(|| "?".into()),
        status: if failed.is_none() && !per_seed.is_empty() { "ok" } else { "failed" }.into(),
        log: failed.and_then(|r| r.log.clone()),
        seed: None,
        val_loss: mean(|r| r.val_loss),
        best_val_loss: mean(|r| r.best_val_loss),
        val_loss_kind: ok.first().and_then(|r| r.val_loss_kind.clone()),
        steps: ok.first().and_then(|r| r.steps),
        tok_per_s: mean(|r| r.tok_per_s),
        load_cv: mean(|r| r.load_cv),
        router_entropy: mean(|r| r.router_entropy),
        top1_prob: mean(|r| r.top1_prob),
        dropped_pct: mean(|r| r.dropped_pct),
        dead_experts: mean(|r| r.dead_experts.map(|d| d as f64)).map(|d| d.round() as u64),
        wall_s: mean(|r| r.wall_s),
        delta_vs_dense_ffn: None,
        delta_vs_baseline: None,
        val_loss_spread: Spread::of(&vals),
        delta_paired: None,
        per_seed,
    }
}
