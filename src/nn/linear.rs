//! A Linear layer with nanoGPT's init: weight ~ N(0, std), bias = 0.

use candle_core::Result;
use candle_nn::{Init, Linear, VarBuilder};

/// `y = x W^T + b` with W: (out, in) ~ N(0, std).
pub fn linear(in_dim: usize, out_dim: usize, bias: bool, std: f64, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get_with_hints((out_dim, in_dim), "weight", Init::Randn { mean: 0.0, stdev: std })?;
    let b = if bias { Some(vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?) } else { None };
    Ok(Linear::new(w, b))
}
