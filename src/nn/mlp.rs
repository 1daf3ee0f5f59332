//! The feed-forward network: nanoGPT's GELU MLP (fc -> gelu -> proj) or SwiGLU. Used as the dense
//! feed-forward of non-MoE blocks and as each expert of an MoE layer.

use super::linear;
use super::Linear;
use crate::config::Config;
use candle_core::{Result, Tensor};
use candle_nn::{Module, VarBuilder};

#[derive(Clone, Debug)]
pub struct Mlp {
    c_fc: Linear,
    c_gate: Option<Linear>,
    c_proj: Linear,
}

impl Mlp {
    /// `hidden`: inner width (4 x n_embd for nanoGPT's MLP).
    pub fn new(cfg: &Config, hidden: usize, vb: VarBuilder) -> Result<Self> {
        let m = &cfg.model;
        let proj_std = 0.02 / (2.0 * m.n_layer as f64).sqrt();
        let swiglu = m.moe.activation == "swiglu";
        Ok(Self {
            c_fc: linear(m.n_embd, hidden, m.bias, 0.02, vb.pp("c_fc"))?,
            c_gate: if swiglu { Some(linear(m.n_embd, hidden, m.bias, 0.02, vb.pp("c_gate"))?) } else { None },
            c_proj: linear(hidden, m.n_embd, m.bias, proj_std, vb.pp("c_proj"))?,
        })
    }

    /// x: (..., C) -> (..., C)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.c_fc.forward(x)?; // (..., H)
        let h = match &self.c_gate {
            Some(g) => (candle_nn::ops::silu(&g.forward(x)?)? * h)?,
            None => h.gelu_erf()?, // exact GELU, as PyTorch nn.GELU()
        };
        self.c_proj.forward(&h)
    }
}
