//! LayerNorm and RMSNorm written from differentiable ops (Candle's fused `layer_norm`/`rms_norm`
//! and the `LayerNorm`/`RmsNorm` modules on contiguous input have no backward).

use candle_core::{Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

const EPS: f64 = 1e-5;

#[derive(Clone, Debug)]
pub struct Norm {
    weight: Tensor,
    bias: Option<Tensor>,
    rms: bool,
}

impl Norm {
    /// `kind`: "layer" or "rms"; the gain starts at 1, the bias (LayerNorm with `bias`) at 0.
    pub fn new(dim: usize, kind: &str, bias: bool, vb: VarBuilder) -> Result<Self> {
        let rms = kind == "rms";
        let weight = vb.get_with_hints(dim, "weight", Init::Const(1.0))?;
        let bias = if bias && !rms { Some(vb.get_with_hints(dim, "bias", Init::Const(0.0))?) } else { None };
        Ok(Norm { weight, bias, rms })
    }

    /// x: (..., d) -> (..., d)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let xn = if self.rms {
            let ms = x.sqr()?.mean_keepdim(D::Minus1)?; // (..., 1)
            x.broadcast_div(&(ms + EPS)?.sqrt()?)?
        } else {
            let mean = x.mean_keepdim(D::Minus1)?; // (..., 1)
            let xc = x.broadcast_sub(&mean)?;
            let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
            xc.broadcast_div(&(var + EPS)?.sqrt()?)?
        };
        let y = xn.broadcast_mul(&self.weight)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}
