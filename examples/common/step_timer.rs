//! Shared by the `bench_*` examples: times full training steps (forward, backward, optimizer) of a
//! config on its device, after warm-up, with the trainer's own model, data and AdamW.

use anyhow::Result;
use candle_core::Tensor;
use gumbel_moe::model::cross_entropy;
use gumbel_moe::nn::Ctx;
use gumbel_moe::{train::Trainer, Config};
use std::time::Instant;

/// Seconds summed over the timed steps, and the tokens they processed.
pub struct Timing {
    pub fwd: f64,
    pub bwd: f64,
    pub opt: f64,
    pub tokens: usize,
}

impl Timing {
    pub fn total(&self) -> f64 {
        self.fwd + self.bwd + self.opt
    }

    pub fn tok_per_s(&self) -> f64 {
        self.tokens as f64 / self.total()
    }
}

/// Trains `steps` steps of `cfg` after `warmup` untimed ones (training mode: noise, tau 1).
pub fn time_steps(cfg: Config, warmup: usize, steps: usize) -> Result<Timing> {
    let dir = std::env::temp_dir().join(format!("gumbel-moe-bench-{}", std::process::id()));
    let mut t = Trainer::new(cfg, &dir)?;
    let named = t.params.named();
    let (b, bs) = (t.cfg.train.batch_size, t.cfg.model.block_size);
    let mut tm = Timing { fwd: 0.0, bwd: 0.0, opt: 0.0, tokens: 0 };
    for step in 0..steps + warmup {
        let (x, y) = t.train.as_ref().expect("a training run has training data").random_batch(step as u64, 0);
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
