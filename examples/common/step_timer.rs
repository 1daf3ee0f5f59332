//! Shared by the `bench_*` examples: times full training steps (forward, backward, optimizer) of a
//! config on its device, with the trainer's own model, data and AdamW.
// Each example compiles its own copy and uses part of it.
#![allow(dead_code)]

use anyhow::Result;
use candle_core::Tensor;
use gumbel_moe::model::cross_entropy;
use gumbel_moe::nn::Ctx;
use gumbel_moe::{train::Trainer, Config};
use std::time::Instant;

/// Seconds summed over the timed steps, and the tokens they processed.
#[derive(Clone, Copy, Default)]
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

/// A model ready to take timed training steps (training mode: noise, tau 1).
pub struct StepTimer {
    t: Trainer,
    dir: std::path::PathBuf,
    step: u64,
}

impl StepTimer {
    pub fn new(cfg: Config) -> Result<Self> {
        static RUN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("gumbel-moe-bench-{}-{n}", std::process::id()));
        Ok(Self { t: Trainer::new(cfg, &dir)?, dir, step: 0 })
    }

    /// One training step, timed.
    pub fn step(&mut self) -> Result<Timing> {
        let t = &mut self.t;
        let named = t.params.named();
        let (b, bs) = (t.cfg.train.batch_size, t.cfg.model.block_size);
        let (x, y) = t.train.as_ref().expect("a training run has training data").random_batch(self.step, 0);
        let x = Tensor::from_slice(&x, (b, bs), &t.device)?;
        let y = Tensor::from_slice(&y, (b, bs), &t.device)?;
        let ctx = Ctx { train: true, step: self.step, tau: 1.0, seed: t.cfg.seed, micro: 0 };
        self.step += 1;
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
        Ok(Timing {
            fwd: (t1 - t0).as_secs_f64(),
            bwd: (t2 - t1).as_secs_f64(),
            opt: (t3 - t2).as_secs_f64(),
            tokens: b * bs,
        })
    }
}

impl Drop for StepTimer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Trains `steps` steps of `cfg` after `warmup` untimed ones; the sums of the timed steps.
pub fn time_steps(cfg: Config, warmup: usize, steps: usize) -> Result<Timing> {
    let mut s = StepTimer::new(cfg)?;
    let mut tm = Timing::default();
    for i in 0..warmup + steps {
        let one = s.step()?;
        if i >= warmup {
            tm = Timing {
                fwd: tm.fwd + one.fwd,
                bwd: tm.bwd + one.bwd,
                opt: tm.opt + one.opt,
                tokens: tm.tokens + one.tokens,
            };
        }
    }
    Ok(tm)
}
