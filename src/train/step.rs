//! The pieces of a training step that run on the data-parallel workers: one micro-batch's forward
//! and backward, one evaluation batch's loss, and the global-norm gradient clipping after them.

use crate::config::Config;
use crate::data::Batcher;
use crate::model::{cross_entropy, router_surrogate, Gpt};
use crate::nn::Ctx;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

/// Mean cross-entropy of one evaluation batch (no noise, no dropout).
pub(super) fn eval_batch_loss(
    model: &Gpt,
    device: &Device,
    x: &[u32],
    y: &[u32],
    rows: usize,
    ctx: &Ctx,
) -> Result<f64> {
    let out = model.forward(&Tensor::from_slice(x, (rows, x.len() / rows), device)?, ctx)?;
    let targets = Tensor::from_slice(y, (rows, y.len() / rows), device)?;
    Ok(cross_entropy(&out.logits, &targets)?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// What one micro-batch gives the step: its parameter gradients (already divided by the number
/// of micro-batches), its losses, routing statistics and the REINFORCE baseline after it.
pub(super) struct MicroOut {
    pub(super) grads: Vec<Option<Tensor>>,
    pub(super) ce: f64,
    pub(super) aux: f64,
    pub(super) moe_stats: Vec<crate::moe::layer::MoeStats>,
    pub(super) baseline: Option<f64>,
}

/// Forward and backward of micro-batch `ctx.micro` of step `ctx.step`.
pub(super) fn micro_step(
    model: &Gpt,
    train: &Batcher,
    cfg: &Config,
    device: &Device,
    named: &[(String, candle_core::Var)],
    ctx: Ctx,
    baseline: Option<f64>,
) -> Result<MicroOut> {
    let (step, accum) = (ctx.step, cfg.train.grad_accum);
    let (x, y) = train.try_random_batch(step, ctx.micro)?;
    let rows = train.batch_size();
    let out = model.forward_train(&Tensor::from_slice(&x, (rows, x.len() / rows), device)?, &ctx)?;
    let targets = Tensor::from_slice(&y, (rows, y.len() / rows), device)?;
    let ce = cross_entropy(&out.logits, &targets)?;
    let mut loss = (&ce + &out.aux_loss)?;
    // REINFORCE routers: the score-function surrogate, whose value is not a loss (not logged),
    // only its gradient reaches the router.
    let decay = cfg.model.router.reinforce_baseline_decay;
    let mut b = baseline.unwrap_or(f64::NAN);
    let mut baseline_after = baseline;
    if let Some(s) = router_surrogate(&out, &targets, &mut b, decay)? {
        loss = (loss + s)?;
        baseline_after = Some(b);
    }
    let lv = ce.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let av = out.aux_loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if !lv.is_finite() || !av.is_finite() {
        bail!("non-finite loss at step {step} (cross-entropy {lv}, aux {av}): training stopped; the last checkpoint is kept");
    }
    let gs = (loss / accum as f64)?.backward()?;
    let grads = out.param_grads(&gs, named)?;
    Ok(MicroOut { grads, ce: lv, aux: av, moe_stats: out.moe_stats, baseline: baseline_after })
}

/// Scales the gradients so their global L2 norm is at most `max_norm` (0 = no clipping); returns
/// the norm before clipping.
pub fn clip_grads(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let mut sq = Vec::new();
    for g in grads.iter().flatten() {
        sq.push(g.sqr()?.sum_all()?.to_dtype(DType::F64)?);
    }
    if sq.is_empty() {
        return Ok(0.0);
    }
    let norm = Tensor::stack(&sq, 0)?.sum_all()?.to_scalar::<f64>()?.sqrt();
    if let Some(s) = super::grad_sum::clip_scale(norm, max_norm) {
        for g in grads.iter_mut().flatten() {
            *g = (&*g * s)?;
        }
    }
    Ok(norm)
}
