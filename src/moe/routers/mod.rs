//! The built-in routers, one per file, and the host-side helpers they share.
pub mod dense;
pub mod gumbel;
pub mod hash;
pub mod noisy_topk;
pub mod reinforce;
pub mod sigmoid_bias;
pub mod softmax_topk;

use super::RouteCtx;
use crate::nn::Linear;
use candle_core::{DType, Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// The router projection d -> E (no bias), weight ~ N(0, std).
pub fn router_linear(d: usize, e: usize, std: f64, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get_with_hints((e, d), "weight", Init::Randn { mean: 0.0, stdev: std })?;
    Ok(Linear::new(w, None))
}

/// Copies (T, E) logits to the host as f64 and stops on a non-finite value, naming where it is.
pub fn host_logits(logits: &Tensor, rc: &RouteCtx) -> Result<Vec<Vec<f64>>> {
    let rows = logits.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    for (t, row) in rows.iter().enumerate() {
        if let Some(e) = row.iter().position(|v| !v.is_finite()) {
            candle_core::bail!(
                "non-finite router logit {} at step {}, layer {}, token {t}, expert {e}: training diverged",
                row[e],
                rc.ctx.step,
                rc.layer
            );
        }
    }
    Ok(rows)
}

/// Indices of the k largest values of `row`, largest first; ties go to the lower index.
pub fn top_k(row: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// A (rows, cols) u32 index tensor on `like`'s device.
pub fn index_tensor(data: Vec<u32>, rows: usize, cols: usize, like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(data, (rows, cols), like.device())
}
