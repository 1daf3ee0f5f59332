//! The Gumbel-Softmax paper's speed claim as a benchmark. Jang et al. (2017, section 4.3) train
//! 2.0x faster with Gumbel-Softmax than by marginalising over k = 10 classes and 9.9x at k = 100.
//! Here the classes are experts: the `dense` router runs every expert for every token
//! (marginalisation) and the Gumbel router runs one (hard, straight-through top-1); the model is
//! otherwise the same (the CPU config with an MoE in every block). Full training steps: forward,
//! backward and AdamW, after a warm-up step, taken round-robin (one step of each model per round)
//! so machine load hits all alike; medians over the rounds. Targets (the `goal` column): >= 3x at
//! E = 10, >= 20x at E = 100.
//!
//! `cargo run --release --example bench_paper_speed -- [CONFIG] [ROUNDS] [k=v ...]`

#[path = "common/step_timer.rs"]
mod step_timer;

use anyhow::Result;
use gumbel_moe::ops::gumbel_router::MAX_K;
use gumbel_moe::Config;
use step_timer::{StepTimer, Timing};

/// (label, overrides) of the runs at E experts: the dense baseline first.
fn runs(e: usize) -> Vec<(String, Vec<String>)> {
    let common = [
        format!("model.moe.num_experts={e}"),
        "model.moe.expert_hidden=512".into(),
        "model.moe_every=1".into(),
        "model.moe.capacity_factor=0".into(),
        "model.router.input=hidden".into(),
    ];
    let with = |extra: &[String]| common.iter().chain(extra).cloned().collect::<Vec<_>>();
    let mut v = vec![("dense (all E experts)".to_string(), with(&["model.router.kind=dense".into()]))];
    let gumbel = |k: usize, imp: &str| {
        with(&[
            "model.router.kind=gumbel".into(),
            "model.router.hard=true".into(),
            "model.router.top_m=1".into(),
            format!("model.router.prefilter={k}"),
            format!("model.router.impl={imp}"),
        ])
    };
    if e <= MAX_K {
        v.push((format!("gumbel ST top-1, K = E = {e}"), gumbel(e, "fused")));
    } else {
        // The fused kernels take K <= 32; the plain-tensor router takes any K.
        v.push((format!("gumbel ST top-1, K = {MAX_K} (fused)"), gumbel(MAX_K, "fused")));
        v.push((format!("gumbel ST top-1, K = E = {e} (reference impl)"), gumbel(e, "reference")));
    }
    v
}

/// The median of each timing component over `v`.
fn median(v: &[Timing]) -> Timing {
    let med = |f: fn(&Timing) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(f64::total_cmp);
        x[x.len() / 2]
    };
    Timing { fwd: med(|t| t.fwd), bwd: med(|t| t.bwd), opt: med(|t| t.opt), tokens: v[0].tokens }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args.first().cloned().unwrap_or_else(|| "configs/shakespeare-char-cpu.toml".into());
    let rounds: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let sets: Vec<String> = args.iter().skip(2).filter(|a| a.contains('=')).cloned().collect();
    println!("| E | router | fwd ms | bwd ms | opt ms | step ms | tok/s | speed-up vs dense | paper | goal |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (e, paper, goal) in [(10usize, 2.0, 3.0), (100, 9.9, 20.0)] {
        let runs = runs(e);
        let mut timers = Vec::new();
        for (_, extra) in &runs {
            let o: Vec<String> = sets.iter().chain(extra).cloned().collect();
            let mut t = StepTimer::new(Config::from_file(path.as_ref(), &o)?)?;
            t.step()?; // warm-up
            timers.push(t);
        }
        // Round-robin, one step of each model per round, so a change in machine load hits all of
        // them alike; medians over the rounds.
        let mut times: Vec<Vec<Timing>> = vec![Vec::new(); runs.len()];
        for _ in 0..rounds {
            for (t, v) in timers.iter_mut().zip(&mut times) {
                v.push(t.step()?);
            }
        }
        let meds: Vec<Timing> = times.iter().map(|v| median(v)).collect();
        let base = meds[0].total();
        for (i, ((label, _), tm)) in runs.iter().zip(&meds).enumerate() {
            let (p, g) = if i == 0 { ("".into(), "".into()) } else { (format!("{paper}x"), format!(">= {goal}x")) };
            println!(
                "| {e} | {label} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2}x | {p} | {g} |",
                tm.fwd * 1e3,
                tm.bwd * 1e3,
                tm.opt * 1e3,
                tm.total() * 1e3,
                tm.tok_per_s(),
                base / tm.total()
            );
        }
    }
    Ok(())
}
