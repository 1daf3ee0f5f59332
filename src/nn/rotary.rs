//! Rotary position embeddings (RoPE, Su et al. 2021), half-split layout as in GPT-NeoX/Llama,
//! written from differentiable ops (narrow, mul, cat).

use candle_core::{DType, Device, Result, Tensor};

#[derive(Clone, Debug)]
pub struct Rotary {
    cos: Tensor, // (T_max, hs/2)
    sin: Tensor, // (T_max, hs/2)
}

impl Rotary {
    pub fn new(head_size: usize, max_t: usize, theta: f64, dtype: DType, device: &Device) -> Result<Self> {
        let half = head_size / 2;
        let mut cos = Vec::with_capacity(max_t * half);
        let mut sin = Vec::with_capacity(max_t * half);
        for t in 0..max_t {
            for i in 0..half {
                let freq = 1.0 / theta.powf(2.0 * i as f64 / head_size as f64);
                let a = t as f64 * freq;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        let cos = Tensor::from_vec(cos, (max_t, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (max_t, half), device)?.to_dtype(dtype)?;
        Ok(Rotary { cos, sin })
    }

    /// x: (B, nh, T, hs) -> (B, nh, T, hs), rotated by position.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (_b, _h, t, hs) = x.dims4()?;
        let half = hs / 2;
        let cos = self.cos.narrow(0, 0, t)?; // (T, hs/2)
        let sin = self.sin.narrow(0, 0, t)?;
        let x1 = x.narrow(3, 0, half)?;
        let x2 = x.narrow(3, half, half)?;
        let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
        let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
        Tensor::cat(&[r1, r2], 3)
    }
}
