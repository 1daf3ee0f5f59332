//! The feed-forward network: nanoGPT's GELU MLP (fc -> gelu -> proj) or SwiGLU. Used as the dense
//! feed-forward of non-MoE blocks and as each expert of an MoE layer.

use super::linear;
use super::Linear;
use crate::config::{Activation, Config};
use candle_core::{Result, Tensor};
use candle_nn::{Module, VarBuilder};

#[derive(Clone, Debug)]
pub struct Mlp {
    c_fc: Linear,
    c_gate: Option<Linear>,
    c_proj: Linear,
    fused: bool,
}

impl Mlp {
    /// `hidden`: inner width (4 x n_embd for nanoGPT's MLP).
    pub fn new(cfg: &Config, hidden: usize, vb: VarBuilder) -> Result<Self> {
        let m = &cfg.model;
        let proj_std = 0.02 / (2.0 * m.n_layer as f64).sqrt();
        let swiglu = m.moe.activation == Activation::Swiglu;
        let fused = m.fused_layers;
        let lin = |i, o, std, name| linear(i, o, m.bias, std, vb.pp(name)).map(|l| l.fused(fused));
        Ok(Self {
            c_fc: lin(m.n_embd, hidden, 0.02, "c_fc")?,
            c_gate: if swiglu { Some(lin(m.n_embd, hidden, 0.02, "c_gate")?) } else { None },
            c_proj: lin(hidden, m.n_embd, proj_std, "c_proj")?,
            fused,
        })
    }

    /// The weights for `ops::expert_mlp` (None when the layers are not fused).
    pub fn expert_params(&self) -> Option<crate::ops::ExpertParams<'_>> {
        if !self.fused {
            return None;
        }
        Some(crate::ops::ExpertParams {
            w1: self.c_fc.weight(),
            b1: self.c_fc.bias(),
            w2: self.c_proj.weight(),
            b2: self.c_proj.bias(),
            wg: self.c_gate.as_ref().map(|g| g.weight()),
            bg: self.c_gate.as_ref().and_then(|g| g.bias()),
        })
    }

    /// A dense block's feed-forward, x: (B, T, C) -> (B, T, C). On the CPU with fused layers it is
    /// one `ops::expert_mlp` op (a single expert over all rows) instead of three ops, which saves
    /// the graph the two (B, T, H) gradients Candle zero-fills and adds; with `train` the op's
    /// training form reads the weights in place and hands their gradients out of band (the
    /// [`ExpertGrads`](crate::ops::ExpertGrads), gathered with the experts').
    pub fn forward_block(&self, x: &Tensor, train: bool) -> Result<(Tensor, Option<crate::ops::ExpertGrads>)> {
        let Some(p) = self.expert_params().filter(|_| x.device().is_cpu()) else {
            return Ok((self.forward(x)?, None));
        };
        let (b, t, c) = x.dims3()?;
        let rows = x.reshape((b * t, c))?;
        let offsets = [0, (b * t) as u32];
        let (y, grads) = if train {
            crate::ops::expert_mlp_train(&rows, &[p], &offsets)?
        } else {
            (crate::ops::expert_mlp(&rows, &[p], &offsets)?, None)
        };
        Ok((y.reshape((b, t, c))?, grads))
    }

    /// x: (..., C) -> (..., C)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.c_fc.forward(x)?; // (..., H)
        let h = match &self.c_gate {
            Some(g) if self.fused => crate::ops::swiglu(&g.forward(x)?, &h)?,
            Some(g) => crate::ops::swiglu_reference(&g.forward(x)?, &h)?,
            // Exact GELU, as PyTorch nn.GELU().
            None if self.fused => crate::ops::gelu(&h)?,
            None => crate::ops::gelu_reference(&h)?,
        };
        self.c_proj.forward(&h)
    }
}
