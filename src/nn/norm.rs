//! LayerNorm and RMSNorm: the `ops::norm` op (one pass each way) or its plain-tensor twin
//! (Candle's own `layer_norm`/`rms_norm` and the `LayerNorm`/`RmsNorm` modules on contiguous input
//! have no backward).

use crate::config::NormKind;
use crate::ops::{norm, norm_reference, NormOp};
use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};

const EPS: f64 = 1e-5;

#[derive(Clone, Debug)]
pub struct Norm {
    weight: Tensor,
    bias: Option<Tensor>,
    rms: bool,
    fused: bool,
}

impl Norm {
    /// `kind`: LayerNorm or RMSNorm; the gain starts at 1, the bias (LayerNorm with `bias`) at 0.
    /// `fused`: through `ops::norm` rather than its plain-tensor twin.
    pub fn new(dim: usize, kind: NormKind, bias: bool, fused: bool, vb: VarBuilder) -> Result<Self> {
        let rms = kind == NormKind::Rms;
        let weight = vb.get_with_hints(dim, "weight", Init::Const(1.0))?;
        let bias = if bias && !rms { Some(vb.get_with_hints(dim, "bias", Init::Const(0.0))?) } else { None };
        Ok(Norm { weight, bias, rms, fused })
    }

    /// x: (..., d) -> (..., d)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let op = NormOp { eps: EPS, rms: self.rms };
        if self.fused {
            norm(x, &self.weight, self.bias.as_ref(), op)
        } else {
            norm_reference(x, &self.weight, self.bias.as_ref(), op)
        }
    }
}
