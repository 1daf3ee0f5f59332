//! Causal multi-head self-attention (nanoGPT's CausalSelfAttention), with learned or rotary positions
//! and optionally grouped-query attention (`model.n_kv_head` < `n_head`: each kv head serves
//! n_head / n_kv_head consecutive query heads, as Llama/Mixtral).

use super::Linear;
use super::{linear, ops, rotary::Rotary, Ctx};
use crate::config::{Config, Positions};
use candle_core::{Result, Tensor};
use candle_nn::{Module, VarBuilder};

#[derive(Clone, Debug)]
pub struct CausalSelfAttention {
    c_attn: Linear,
    c_proj: Linear,
    n_head: usize,
    n_kv_head: usize,
    rotary: Option<Rotary>,
    dropout: f64,
    layer: u32,
    fused: bool,
}

impl CausalSelfAttention {
    pub fn new(cfg: &Config, layer: usize, vb: VarBuilder) -> Result<Self> {
        let m = &cfg.model;
        let c = m.n_embd;
        let kv = cfg.n_kv_head() * (c / m.n_head); // width of k (and of v)
                                                   // GPT-2: residual projections scaled by 1/sqrt(2 * n_layer).
        let proj_std = 0.02 / (2.0 * m.n_layer as f64).sqrt();
        let rotary = if m.positions == Positions::Rotary {
            Some(Rotary::new(c / m.n_head, m.block_size, m.rope_theta, vb.dtype(), vb.device())?)
        } else {
            None
        };
        Ok(Self {
            c_attn: linear(c, c + 2 * kv, m.bias, 0.02, vb.pp("c_attn"))?.fused(m.fused_layers),
            c_proj: linear(c, c, m.bias, proj_std, vb.pp("c_proj"))?.fused(m.fused_layers),
            n_head: m.n_head,
            n_kv_head: cfg.n_kv_head(),
            rotary,
            dropout: m.dropout,
            layer: layer as u32,
            fused: m.fused_layers,
        })
    }

    /// Grouped-query attention as multi-head attention: (B, T, C + 2 nkv hs) -> (B, T, 3C), each kv head
    /// repeated for its n_head / n_kv_head query heads in a row (HF's `repeat_kv`).
    fn expand_kv(&self, qkv: &Tensor) -> Result<Tensor> {
        if self.n_kv_head == self.n_head {
            return Ok(qkv.clone());
        }
        let (b, t, w) = qkv.dims3()?;
        let hs = w / (self.n_head + 2 * self.n_kv_head);
        let (c, kv, rep) = (self.n_head * hs, self.n_kv_head * hs, self.n_head / self.n_kv_head);
        let repeat = |start: usize| -> Result<Tensor> {
            let x = qkv.narrow(2, start, kv)?.reshape((b, t, self.n_kv_head, 1, hs))?; // (B, T, nkv, 1, hs)
            x.broadcast_as((b, t, self.n_kv_head, rep, hs))?.reshape((b, t, c)) // (B, T, C)
        };
        Tensor::cat(&[&qkv.narrow(2, 0, c)?, &repeat(c)?, &repeat(c + kv)?], 2) // (B, T, 3C)
    }

    /// x: (B, T, C), mask: (T, T) additive -> (B, T, C)
    pub fn forward(&self, x: &Tensor, mask: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let hs = c / self.n_head;
        let qkv = self.expand_kv(&self.c_attn.forward(x)?)?; // (B, T, 3C)
        let site = self.layer * 4;
        // On other devices the op would run its twin, which uploads its tables and mask per call:
        // the path below keeps them on the device.
        if self.fused && x.device().is_cpu() && (self.dropout == 0.0 || !ctx.train) {
            // One op: rotary, causal mask, softmax and PV, straight from the projection's layout.
            let y = crate::ops::causal_attention(&qkv, self.n_head, self.rotary.as_ref().map(|r| r.tables()))?;
            let y = self.c_proj.forward(&y)?; // (B, T, C)
            return ops::dropout(&y, self.dropout, ctx.train, ctx.seed, ctx.step, ctx.micro, site + 1);
        }
        let split = |i: usize| -> Result<Tensor> {
            qkv.narrow(2, i * c, c)?.reshape((b, t, self.n_head, hs))?.transpose(1, 2)?.contiguous()
        }; // (B, nh, T, hs)
        let (mut q, mut k, v) = (split(0)?, split(1)?, split(2)?);
        if let Some(r) = &self.rotary {
            q = r.apply(&q)?;
            k = r.apply(&k)?;
        }
        let scale = 1.0 / (hs as f64).sqrt();
        let att = if self.fused {
            // Scale, causal mask and softmax in one op each way (GPU kernels too), no mask tensor.
            crate::ops::causal_softmax(&q.matmul(&k.t()?)?, scale)? // (B, nh, T, T)
        } else {
            ops::softmax(&(q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?)?
        };
        let att = ops::dropout(&att, self.dropout, ctx.train, ctx.seed, ctx.step, ctx.micro, site)?;
        let y = att.matmul(&v)?; // (B, nh, T, hs)
        let y = y.transpose(1, 2)?.reshape((b, t, c))?; // (B, T, C)
        let y = self.c_proj.forward(&y)?;
        ops::dropout(&y, self.dropout, ctx.train, ctx.seed, ctx.step, ctx.micro, site + 1)
    }
}
