//! The router interface. A router maps hidden states (T, d) to a [`Routing`]: which m experts each
//! token uses, with what weights (carrying the router's gradient), and the full softmax over all E
//! experts for the balance loss. Experts, dispatch and losses live outside the router, so a new
//! router is one small file (see `examples/custom_router.rs`).

use super::routers::{dense::DenseRouter, gumbel::GumbelRouter, softmax_topk::SoftmaxTopkRouter};
use crate::config::Config;
use crate::nn::Ctx;
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

/// The router kinds `model.router.kind` accepts.
pub const ROUTER_KINDS: [&str; 3] = ["gumbel", "softmax_topk", "dense"];

/// Where a routing call happens: the forward context plus the layer index (keys the noise).
#[derive(Clone, Copy, Debug)]
pub struct RouteCtx {
    pub ctx: Ctx,
    pub layer: u32,
}

/// The routing decision for T tokens.
#[derive(Clone, Debug)]
pub struct Routing {
    /// (T, m) expert indices, row-major, on the host (dispatch groups tokens by expert on the host).
    pub indices: Vec<u32>,
    /// Experts per token (m; K for the soft Gumbel router, E for dense).
    pub m: usize,
    /// (T, m) combine weights; the router's gradient flows through them.
    pub weights: Tensor,
    /// (T, E) raw router logits (router z-loss).
    pub logits: Tensor,
    /// (T, E) softmax of the logits over all experts, no noise (load-balance loss, entropy).
    pub probs: Tensor,
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
    Ok(match cfg.model.router.kind.as_str() {
        "gumbel" => Box::new(GumbelRouter::new(cfg, vb)?),
        "softmax_topk" => Box::new(SoftmaxTopkRouter::new(cfg, vb)?),
        "dense" => Box::new(DenseRouter::new(cfg, vb)?),
        other => candle_core::bail!("model.router.kind: unknown router `{other}` (known: {ROUTER_KINDS:?})"),
    })
}
