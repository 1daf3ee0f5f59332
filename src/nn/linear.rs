//! A Linear layer with nanoGPT's init (weight ~ N(0, std), bias = 0): the `ops::linear` op (one
//! node each way: matmul over the flattened leading dimensions, bias, and dx, dW, db from one
//! backward op) or its plain-tensor twin.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,       // (out, in)
    bias: Option<Tensor>, // (out)
    fused: bool,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias, fused: true }
    }

    /// Through `ops::linear` (true, the default) or its plain-tensor twin.
    pub fn fused(mut self, fused: bool) -> Self {
        self.fused = fused;
        self
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl Module for Linear {
    /// x: (..., in) -> (..., out)
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.fused {
            crate::ops::linear(x, &self.weight, self.bias.as_ref())
        } else {
            crate::ops::linear_reference(x, &self.weight, self.bias.as_ref())
        }
    }
}

/// `y = x W^T + b` with W: (out, in) ~ N(0, std).
pub fn linear(in_dim: usize, out_dim: usize, bias: bool, std: f64, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get_with_hints((out_dim, in_dim), "weight", Init::Randn { mean: 0.0, stdev: std })?;
    let b = if bias { Some(vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?) } else { None };
    Ok(Linear::new(w, b))
}
