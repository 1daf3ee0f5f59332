//! Rotary position embeddings (RoPE, Su et al. 2021), half-split layout as in GPT-NeoX/Llama,
//! written from differentiable ops (`ops::attention::rotate_half`) on tables kept on the device.

use crate::ops::attention::{rotate_half, RopeTables};
use candle_core::{DType, Device, Result, Tensor};
use std::sync::Arc;

#[derive(Clone, Debug)]
pub struct Rotary {
    cos: Tensor, // (T_max, hs/2)
    sin: Tensor, // (T_max, hs/2)
    tables: Arc<RopeTables>,
}

impl Rotary {
    pub fn new(head_size: usize, max_t: usize, theta: f64, dtype: DType, device: &Device) -> Result<Self> {
        let tables = RopeTables::new(head_size, max_t, theta);
        let half = tables.half;
        let cos = Tensor::from_slice(&tables.cos, (max_t, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_slice(&tables.sin, (max_t, half), device)?.to_dtype(dtype)?;
        Ok(Rotary { cos, sin, tables: Arc::new(tables) })
    }

    /// The host tables, for the fused attention op.
    pub fn tables(&self) -> &Arc<RopeTables> {
        &self.tables
    }

    /// x: (B, nh, T, hs) -> (B, nh, T, hs), rotated by position.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let t = x.dim(2)?;
        rotate_half(x, &self.cos.narrow(0, 0, t)?, &self.sin.narrow(0, 0, t)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::IndexOp;

    // RoPE's defining property: <R(q, m), R(k, n)> depends only on m - n, and R keeps norms
    // (to f32 precision: the tables are stored in f32).
    #[test]
    fn scores_depend_only_on_relative_position() -> Result<()> {
        let (hs, t) = (8, 12);
        let r = Rotary::new(hs, t, 10000.0, DType::F64, &Device::Cpu)?;
        let q: Vec<f64> = (0..hs).map(|i| (i as f64 * 0.7).sin() + 0.3).collect();
        let k: Vec<f64> = (0..hs).map(|i| (i as f64 * 1.3).cos() - 0.1).collect();
        // The same q and k at every position: (1, 1, T, hs).
        let rep = |v: &Vec<f64>| Tensor::from_vec(v.repeat(t), (1, 1, t, hs), &Device::Cpu);
        let (rq, rk) = (r.apply(&rep(&q)?)?, r.apply(&rep(&k)?)?);
        let dot = |m: usize, n: usize| -> Result<f64> {
            (rq.i((0, 0, m))? * rk.i((0, 0, n))?)?.sum_all()?.to_scalar::<f64>()
        };
        for (m, n, s) in [(5, 2, 4), (3, 3, 7), (1, 9, 2)] {
            assert!(
                (dot(m, n)? - dot(m + s, n + s)?).abs() < 1e-6,
                "m={m} n={n} s={s}: {} vs {}",
                dot(m, n)?,
                dot(m + s, n + s)?
            );
        }
        assert!((dot(5, 2)? - dot(2, 5)?).abs() > 1e-3, "scores must depend on the sign of m - n");
        let norm = |x: &Tensor| -> Result<f64> { x.sqr()?.sum_all()?.to_scalar::<f64>() };
        assert!((norm(&rq.i((0, 0, 7))?)? - norm(&rep(&q)?.i((0, 0, 0))?)?).abs() < 1e-6);
        Ok(())
    }
}
