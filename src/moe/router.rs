//! The router interface. A router maps hidden states (T, d) to a [`Routing`]: which m experts each
//! token uses, with what weights (carrying the router's gradient), and the full softmax over all E
//! experts for the balance loss. Experts, dispatch and losses live outside the router, so a new
//! router is one small file (see `examples/custom_router.rs`).

use super::routers::{
    dense::DenseRouter, gumbel::GumbelRouter, hash::HashRouter, noisy_topk::NoisyTopkRouter,
    reinforce::ReinforceRouter, sigmoid_bias::SigmoidBiasRouter, softmax_topk::SoftmaxTopkRouter,
};
use crate::config::{Config, RouterKind};
use crate::nn::Ctx;
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

/// Where a routing call happens: the forward context, the layer index (keys the noise) and,
/// when the caller has them, the token ids of the T rows (the hash router needs them).
#[derive(Clone, Debug)]
pub struct RouteCtx {
    pub ctx: Ctx,
    pub layer: u32,
    /// (T,) u32 input token ids, row-aligned with the hidden states; `Gpt::forward` passes them.
    pub token_ids: Option<Tensor>,
}

impl RouteCtx {
    /// A context without token ids.
    pub fn new(ctx: Ctx, layer: u32) -> Self {
        Self { ctx, layer, token_ids: None }
    }
}

/// The routing decision for T tokens.
#[derive(Clone, Debug)]
pub struct Routing {
    /// (T, m) expert indices, row-major, on the host (dispatch groups tokens by expert on the host).
    pub indices: Vec<u32>,
    /// Experts per token (m; E for dense; K for the soft Gumbel router with top_m = K).
    pub m: usize,
    /// (T, m) combine weights; the router's gradient flows through them.
    pub weights: Tensor,
    /// (T, E) raw router logits (router z-loss).
    pub logits: Tensor,
    /// (T, E) softmax of the logits over all experts, no noise (load-balance loss, entropy).
    pub probs: Tensor,
    /// Scalar router-specific loss, already multiplied by its coefficient (e.g. the importance and
    /// load losses of noisy top-k); the MoE layer adds it to its aux loss.
    pub aux_loss: Option<Tensor>,
    /// (T,) log-probability of each token's chosen expert, for a score-function (REINFORCE)
    /// surrogate built once the per-token loss is known (`model::router_surrogate`).
    pub log_prob: Option<Tensor>,
}

impl Routing {
    /// A routing with no router-specific loss and no score log-probabilities.
    pub fn new(indices: Vec<u32>, m: usize, weights: Tensor, logits: Tensor, probs: Tensor) -> Self {
        Self { indices, m, weights, logits, probs, aux_loss: None, log_prob: None }
    }
}

pub trait Router: Send + Sync {
    /// x: (T, d) -> routing of the T tokens.
    fn route(&self, x: &Tensor, rc: &RouteCtx) -> Result<Routing>;
    fn num_experts(&self) -> usize;
}

/// Builds the router of MoE layer `layer`; the default is [`build_router`]. Pass your own to
/// `Gpt::new_with_router` to train a custom router.
pub type RouterFactory = dyn Fn(&Config, usize, VarBuilder) -> Result<Box<dyn Router>> + Send + Sync;

/// The router named by `model.router.kind`.
pub fn build_router(cfg: &Config, _layer: usize, vb: VarBuilder) -> Result<Box<dyn Router>> {
    Ok(match cfg.model.router.kind {
        RouterKind::Gumbel => Box::new(GumbelRouter::new(cfg, vb)?),
        RouterKind::SoftmaxTopk => Box::new(SoftmaxTopkRouter::new(cfg, vb)?),
        RouterKind::Dense => Box::new(DenseRouter::new(cfg, vb)?),
        RouterKind::NoisyTopk => Box::new(NoisyTopkRouter::new(cfg, vb)?),
        RouterKind::SigmoidBias => Box::new(SigmoidBiasRouter::new(cfg, vb)?),
        RouterKind::Hash => Box::new(HashRouter::new(cfg)?),
        RouterKind::Reinforce => Box::new(ReinforceRouter::new(cfg, vb)?),
    })
}
