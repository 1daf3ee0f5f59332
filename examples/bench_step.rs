//! Training-step throughput of a config on this machine: forward, backward and optimizer time per
//! step and tokens per second, after warm-up. Baseline in the same run: the dense twin
//! (`model.moe_every=0`), so the MoE overhead shows as a ratio.
//!
//! `cargo run --release --example bench_step -- [CONFIG] [STEPS] [--set k=v ...]`

use anyhow::Result;
use candle_core::Tensor;
use gumbel_moe::model::cross_entropy;
use gumbel_moe::nn::Ctx;
use gumbel_moe::{train::Trainer, Config};
use std::time::Instant;

struct Timing {
    fwd: f64,
    bwd: f64,
    opt: f64,
    tokens: usize,
}

fn bench(cfg: Config, steps: usize) -> Result<Timing> {
    let dir = std::env::temp_dir().join(format!("gumbel-moe-bench-{}", std::process::id()));
    let mut t = Trainer::new(cfg, &dir)?;
    let named = t.params.named();
    let (b, bs) = (t.cfg.train.batch_size, t.cfg.model.block_size);
    let mut tm = Timing { fwd: 0.0, bwd: 0.0, opt: 0.0, tokens: 0 };
    let warmup = 3;
    for step in 0..steps + warmup {
        let (x, y) = t.train.as_ref().unwrap().random_batch(step as u64, 0);
        let x = Tensor::from_slice(&x, (b, bs), &t.device)?;
        let y = Tensor::from_slice(&y, (b, bs), &t.device)?;
        let ctx = Ctx { train: true, step: step as u64, tau: 1.0, seed: t.cfg.seed, micro: 0 };
        let t0 = Instant::now();
        let out = t.model.forward(&x, &ctx)?;
        let loss = (cross_entropy(&out.logits, &y)? + out.aux_loss)?;
        let _ = loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let g = loss.backward()?;
        let t2 = Instant::now();
        let grads: Vec<Option<Tensor>> = named.iter().map(|(_, v)| g.get(v.as_tensor()).cloned()).collect();
        t.opt.step(&grads, 1e-4)?;
        let _ = named[0].1.as_tensor().flatten_all()?.get(0)?.to_scalar::<f32>()?;
        let t3 = Instant::now();
        if step >= warmup {
            tm.fwd += (t1 - t0).as_secs_f64();
            tm.bwd += (t2 - t1).as_secs_f64();
            tm.opt += (t3 - t2).as_secs_f64();
            tm.tokens += b * bs;
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(tm)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args.first().cloned().unwrap_or_else(|| "configs/shakespeare-char-cpu.toml".into());
    let steps: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(20);
    let sets: Vec<String> = args.iter().skip(2).filter(|a| a.contains('=')).cloned().collect();
    println!("| model | fwd ms | bwd ms | opt ms | step ms | tok/s |");
    println!("|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for (name, extra) in [("moe (config)", None), ("dense twin", Some("model.moe_every=0"))] {
        let mut o = sets.clone();
        o.extend(extra.map(String::from));
        let cfg = Config::from_file(path.as_ref(), &o)?;
        let tm = bench(cfg, steps)?;
        let n = steps as f64;
        let step_s = (tm.fwd + tm.bwd + tm.opt) / n;
        let tok_s = tm.tokens as f64 / (tm.fwd + tm.bwd + tm.opt);
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} |",
            tm.fwd / n * 1e3,
            tm.bwd / n * 1e3,
            tm.opt / n * 1e3,
            step_s * 1e3,
            tok_s
        );
        rows.push(tok_s);
    }
    println!("\nMoE / dense-twin throughput ratio: {:.2}", rows[0] / rows[1]);
    Ok(())
}
