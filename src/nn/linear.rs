//! A Linear layer with nanoGPT's init (weight ~ N(0, std), bias = 0) whose forward flattens the
//! leading dimensions into one, so every matmul is 2-D.
//!
//! `candle_nn::Linear` on (B, T, C) input broadcasts the weight to (B, C, out) and runs a batched
//! matmul: its backward then builds B copies of the weight gradient and sums them, which measured
//! as a large share of a CPU training step. One (B*T, C) x (C, out) matmul avoids that.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,       // (out, in)
    bias: Option<Tensor>, // (out)
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for Linear {
    /// x: (..., in) -> (..., out)
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let inp = *dims.last().unwrap_or(&0);
        let n = x.elem_count() / inp.max(1);
        let y = x.reshape((n, inp))?.matmul(&self.weight.t()?)?; // (N, out)
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = dims;
        *out.last_mut().expect("rank >= 1") = self.weight.dim(0)?;
        y.reshape(out)
    }
}

/// `y = x W^T + b` with W: (out, in) ~ N(0, std).
pub fn linear(in_dim: usize, out_dim: usize, bias: bool, std: f64, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get_with_hints((out_dim, in_dim), "weight", Init::Randn { mean: 0.0, stdev: std })?;
    let b = if bias { Some(vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?) } else { None };
    Ok(Linear::new(w, b))
}
