//! Differentiable building blocks of the decoder (Candle's fused norms and softmax have no
//! backward, so everything here is written from ops that do).
pub mod attention;
pub mod linear;
pub mod mlp;
pub mod norm;
pub mod ops;
pub mod params;
pub mod rotary;

pub use attention::CausalSelfAttention;
pub use linear::{linear, Linear};
pub use mlp::Mlp;
pub use norm::Norm;
pub use params::Params;

/// What a forward pass needs besides its input: whether it trains, the optimizer step (keys the
/// Gumbel noise and dropout), the router temperature and the run seed.
#[derive(Clone, Copy, Debug)]
pub struct Ctx {
    pub train: bool,
    pub step: u64,
    pub tau: f64,
    pub seed: u64,
    /// Micro-batch index within the step (gradient accumulation), so each gets its own noise.
    pub micro: u32,
}

impl Ctx {
    /// An evaluation context: no noise, no dropout.
    pub fn eval(seed: u64, tau: f64) -> Self {
        Ctx { train: false, step: 0, tau, seed, micro: 0 }
    }
}
