//! Sigmoid routing with auxiliary-loss-free load balancing (DeepSeek-V3, Liu et al. 2024, sec.
//! 2.1.2; Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for MoE").
//!
//! Affinities s = sigmoid(x W) (T, E). A per-expert bias b is added for the choice only:
//! the experts are the top m of s + b, and the weights are the s of the chosen, normalised to sum
//! to 1 (gradient through s, none through b). After each optimizer step the bias moves by a fixed
//! step toward balance, b_i += rate * sign(mean load - load_i), with load_i the token-slots expert
//! i got in the step's training calls (all micro-batches, counted on the device) and mean load =
//! their token-slots / E: overloaded experts get less attractive, idle ones more. Within a step
//! the bias is fixed, so routing is a function of the input and the parameters.
//!
//! The bias is the non-trainable parameter `expert_bias` (E,), f32 whatever the model dtype (a
//! 1e-3 step would vanish in bf16). It lives in the model's parameter set, so checkpoints save and
//! restore it and a resume is exact; it never enters the autograd graph (detached for the choice,
//! updated with `Var::set` in [`Router::after_step`]), so it has no gradient and the optimizer,
//! which skips parameters without one, never touches it. `logits` = x W (z-loss) and `probs` =
//! their softmax (Switch balance loss and entropy statistics); set `model.moe.balance_coef = 0`
//! for the loss-free recipe.

use super::{select_dtype, top_k_indices, Gate};
use crate::config::Config;
use crate::moe::losses::expert_counts;
use crate::moe::{RouteCtx, Router, Routing};
use crate::nn::ops::softmax;
use candle_core::{DType, Result, Tensor, Var, D};
use candle_nn::{Init, VarBuilder};
use std::sync::Mutex;

pub struct SigmoidBiasRouter {
    gate: Gate,
    /// (E,) f32 selection bias.
    bias: Var,
    e: usize,
    m: usize,
    rate: f64,
    /// The load of this step's training calls so far: (E,) u32 counts on the device, and the
    /// token-slots they routed. Integer sums, so their order (parallel micro-batches) is moot.
    load: Mutex<(Option<Tensor>, usize)>,
}

impl SigmoidBiasRouter {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (e, r) = (cfg.model.moe.num_experts, &cfg.model.router);
        if r.top_m == 0 || r.top_m > e {
            candle_core::bail!("sigmoid_bias router needs 1 <= top_m ({}) <= num_experts ({e})", r.top_m);
        }
        let gate = Gate::new(cfg, vb.clone())?;
        let b = vb.get_with_hints_dtype(e, "expert_bias", Init::Const(0.0), DType::F32)?;
        // A VarBuilder over `Params` hands out the variable itself, so `set` updates the saved one.
        let bias = Var::from_tensor(&b)?;
        Ok(Self { gate, bias, e, m: r.top_m, rate: r.bias_update_rate, load: Mutex::new((None, 0)) })
    }

    /// The current selection bias (E,) on the host.
    pub fn bias(&self) -> Result<Vec<f32>> {
        self.bias.as_tensor().to_vec1::<f32>()
    }

    fn pending(&self) -> Result<std::sync::MutexGuard<'_, (Option<Tensor>, usize)>> {
        self.load.lock().map_err(|_| candle_core::Error::Msg("sigmoid_bias router: load counter poisoned".into()))
    }
}

/// One balancing step: b_i + rate * sign(mean - load_i), with `load` the token-slots each of the
/// E experts got out of `slots` and mean = slots / E.
pub fn bias_step(bias: &[f32], load: &[u32], slots: usize, rate: f64) -> Vec<f32> {
    let mean = slots as f64 / load.len().max(1) as f64;
    bias.iter()
        .zip(load)
        .map(|(&b, &l)| {
            let d = mean - l as f64;
            let sign = if d > 0.0 {
                1.0
            } else if d < 0.0 {
                -1.0
            } else {
                0.0
            };
            (b as f64 + rate * sign) as f32
        })
        .collect()
}

impl Router for SigmoidBiasRouter {
    fn route(&self, x: &Tensor, rc: &RouteCtx) -> Result<Routing> {
        let (e, m) = (self.e, self.m);
        let logits = self.gate.logits(x, rc)?; // (T, E)
        let s = (logits.neg()?.exp()? + 1.0)?.recip()?; // (T, E) sigmoid, with backward

        // Choose by s + b (in f64 where the device has it: only the order matters).
        let dt = select_dtype(&logits);
        let l = logits.detach().to_dtype(dt)?; // (T, E)
        let b = self.bias.as_tensor().detach().to_dtype(dt)?; // (E,)
        let biased = (l.neg()?.exp()? + 1.0)?.recip()?.broadcast_add(&b)?; // (T, E)
        let indices = top_k_indices(&biased, m)?; // (T, m) u32
        let sel = s.gather(&indices, 1)?; // (T, m)
        let weights = sel.broadcast_div(&sel.sum_keepdim(D::Minus1)?)?; // (T, m), sums to 1
        if rc.ctx.train && self.rate > 0.0 {
            let counts = expert_counts(&indices, e)?; // (E,) u32
            let mut p = self.pending()?;
            p.0 = Some(match p.0.take() {
                Some(acc) => (acc + counts)?,
                None => counts,
            });
            p.1 += indices.elem_count();
        }
        let probs = softmax(&logits)?; // (T, E)
        Routing::new(indices, weights, logits, probs)
    }

    fn num_experts(&self) -> usize {
        self.e
    }

    /// The balancing step from the load of the step's training calls (one copy of E counts).
    fn after_step(&self) -> Result<()> {
        let (load, slots) = std::mem::take(&mut *self.pending()?);
        let Some(load) = load else { return Ok(()) };
        let nb = bias_step(&self.bias()?, &load.to_vec1::<u32>()?, slots, self.rate);
        self.bias.set(&Tensor::from_vec(nb, self.e, self.bias.device())?)
    }
}
