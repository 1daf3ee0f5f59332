//! Training-step throughput of a config on this machine: whole optimizer steps (every
//! micro-batch's forward and backward on the data-parallel workers, clipping, AdamW) through
//! `Trainer::train_step`, after warm-up. Baseline in the same run: the dense twin
//! (`model.moe_every=0`), so the MoE overhead shows as a ratio.
//!
//! `cargo run --release --example bench_step -- [CONFIG] [STEPS] [--set k=v ...] [--only moe|dense]`
//!
//! Besides the table it prints one `RESULT model=.. workers=.. tok_per_s=..` line per model for
//! scripts (`scripts/bench_vs_pytorch.sh`). Workers: `train.threads` (0 = one per core, at most
//! `train.grad_accum`).

use anyhow::Result;
use gumbel_moe::{train::Trainer, Config};
use std::time::Instant;

fn main() -> Result<()> {
    gumbel_moe::train::alloc::tune_allocator();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args.first().cloned().unwrap_or_else(|| "configs/shakespeare-char-cpu.toml".into());
    let steps: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(20);
    let sets: Vec<String> = args.iter().skip(2).filter(|a| a.contains('=')).cloned().collect();
    let only = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).cloned();
    println!("| model | workers | step ms | tok/s |");
    println!("|---|---|---|---|");
    let mut rows = Vec::new();
    for (name, key, extra) in [("moe (config)", "moe", None), ("dense twin", "dense", Some("model.moe_every=0"))] {
        if only.as_deref().is_some_and(|o| o != key) {
            continue;
        }
        let mut o = sets.clone();
        o.extend(extra.map(String::from));
        let cfg = Config::from_file(path.as_ref(), &o)?;
        let dir = std::env::temp_dir().join(format!("gumbel-moe-bench-step-{}-{key}", std::process::id()));
        let mut t = Trainer::new(cfg, &dir)?;
        let tokens = t.cfg.train.batch_size * t.cfg.train.grad_accum * t.cfg.model.block_size;
        for _ in 0..3 {
            t.train_step()?;
        }
        let t0 = Instant::now();
        for _ in 0..steps {
            t.train_step()?;
        }
        let step_s = t0.elapsed().as_secs_f64() / steps as f64;
        let tok_s = tokens as f64 / step_s;
        let workers = t.workers.len();
        println!("| {name} | {workers} | {:.1} | {tok_s:.0} |", step_s * 1e3);
        rows.push((key, workers, tok_s));
        let _ = std::fs::remove_dir_all(&dir);
    }
    if rows.len() == 2 {
        println!("\nMoE / dense-twin throughput ratio: {:.2}", rows[0].2 / rows[1].2);
    }
    for (key, workers, tok_s) in rows {
        println!("RESULT model={key} workers={workers} tok_per_s={tok_s:.1}");
    }
    Ok(())
}
