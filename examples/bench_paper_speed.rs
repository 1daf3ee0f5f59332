//! The Gumbel-Softmax paper's speed claim as a benchmark. Jang et al. (2017, section 4.3) train
//! 2.0x faster with Gumbel-Softmax than by marginalising over k = 10 classes and 9.9x at k = 100.
//! Here the classes are experts: the `dense` router runs every expert for every token
//! (marginalisation) and the Gumbel router runs one (hard, straight-through top-1); the model is
//! otherwise the same (the CPU config with an MoE in every block). Full training steps: forward,
//! backward and AdamW, after warm-up, both measured in this run. Our goal: >= 3x at E = 10,
//! >= 20x at E = 100.
//!
//! `cargo run --release --example bench_paper_speed -- [CONFIG] [STEPS] [--set k=v ...]`

#[path = "common/step_timer.rs"]
mod step_timer;

use anyhow::Result;
use gumbel_moe::ops::gumbel_router::MAX_K;
use gumbel_moe::Config;
use step_timer::{time_steps, Timing};

/// (label, overrides) of the runs at E experts: the dense baseline first.
fn runs(e: usize) -> Vec<(String, Vec<String>)> {
    let common = [format!("model.moe.num_experts={e}"), "model.moe_every=1".into(), "model.moe.capacity_factor=0".into()];
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

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args.first().cloned().unwrap_or_else(|| "configs/shakespeare-char-cpu.toml".into());
    let steps: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(3);
    let sets: Vec<String> = args.iter().skip(2).filter(|a| a.contains('=')).cloned().collect();
    println!("| E | router | fwd ms | bwd ms | opt ms | step ms | tok/s | speed-up vs dense | paper | goal |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (e, paper, goal) in [(10usize, 2.0, 3.0), (100, 9.9, 20.0)] {
        let mut dense: Option<f64> = None;
        for (label, extra) in runs(e) {
            let o: Vec<String> = sets.iter().chain(&extra).cloned().collect();
            let cfg = Config::from_file(path.as_ref(), &o)?;
            let tm: Timing = time_steps(cfg, 1, steps)?;
            let n = steps as f64;
            let step = tm.total() / n;
            let base = *dense.get_or_insert(step);
            let (p, g) = if base == step { ("".into(), "".into()) } else { (format!("{paper}x"), format!(">= {goal}x")) };
            println!(
                "| {e} | {label} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2}x | {p} | {g} |",
                tm.fwd / n * 1e3,
                tm.bwd / n * 1e3,
                tm.opt / n * 1e3,
                step * 1e3,
                tm.tok_per_s(),
                base / step
            );
        }
    }
    Ok(())
}
