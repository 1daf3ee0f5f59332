//! Writing your own router: a cosine router (X-MoE, Chi et al. 2022) in ~50 lines, trained end to
//! end with the stock trainer. Run: `cargo run --release --example custom_router -- [STEPS]`
//! (reads the repo's data/tinyshakespeare.txt; each run replaces the last one in runs/custom-router).

use anyhow::Result;
use candle_core::{Tensor, D};
use candle_nn::{Init, VarBuilder};
use gumbel_moe::moe::routers::top_k_indices;
use gumbel_moe::moe::{RouteCtx, Router, Routing};
use gumbel_moe::nn::ops::softmax;
use gumbel_moe::train::IfRunExists;
use gumbel_moe::{train::Trainer, Config};

/// Scores are cosine similarities between the token and a learned embedding per expert, divided
/// by a temperature; the top-1 expert is used with its softmax probability as weight (Switch-style).
struct CosineRouter {
    expert_emb: Tensor, // (E, d)
    e: usize,
    temperature: f64,
}

impl CosineRouter {
    fn new(cfg: &Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let e = cfg.model.moe.num_experts;
        let init = Init::Randn { mean: 0.0, stdev: 0.02 };
        Ok(Self { expert_emb: vb.get_with_hints((e, cfg.model.n_embd), "expert_emb", init)?, e, temperature: 0.07 })
    }
}

fn l2_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_div(&(x.sqr()?.sum_keepdim(D::Minus1)? + 1e-6)?.sqrt()?)
}

impl Router for CosineRouter {
    fn route(&self, x: &Tensor, _rc: &RouteCtx) -> candle_core::Result<Routing> {
        let cos = l2_normalize(x)?.matmul(&l2_normalize(&self.expert_emb)?.t()?)?; // (T, E)
        let logits = (cos / self.temperature)?; // (T, E)
        let probs = softmax(&logits)?; // (T, E)
        let indices = top_k_indices(&logits, 1)?; // (T, 1) u32, on the device: no host copy
        let weights = probs.gather(&indices, 1)?; // (T, 1)
        Routing::new(indices, weights, logits, probs) // the MoE layer stops on NaN logits, naming them
    }

    fn num_experts(&self) -> usize {
        self.e
    }
}

fn main() -> Result<()> {
    let steps = std::env::args().nth(1).unwrap_or_else(|| "200".into());
    let overrides = [format!("train.max_iters={steps}"), format!("train.lr_decay_iters={steps}")];
    let cfg = Config::default_recipe(&overrides)?;
    let factory = |cfg: &Config, _layer: usize, vb: VarBuilder| -> candle_core::Result<Box<dyn Router>> {
        Ok(Box::new(CosineRouter::new(cfg, vb)?))
    };
    let mut trainer = Trainer::new_with(cfg, "runs/custom-router".as_ref(), &factory, IfRunExists::Overwrite)?;
    let summary = trainer.fit()?;
    println!("cosine router: {} steps, val loss {:.4}, {:.0} tok/s", summary.step, summary.val_loss, summary.tok_per_s);
    Ok(())
}
