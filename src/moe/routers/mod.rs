//! The built-in routers, one per file, and the helpers they share: the gate, a device-side top-k
//! and the host top-k of the reference twins.
pub mod dense;
pub mod gumbel;
pub mod hash;
pub mod noisy_topk;
pub mod reinforce;
pub mod sigmoid_bias;
pub mod softmax_topk;

use super::RouteCtx;
use crate::config::{Config, RouterInput};
use crate::nn::Linear;
use candle_core::{DType, Result, Tensor, D};
use candle_nn::{Init, Module, VarBuilder};

/// The router projection d -> E (no bias), weight ~ N(0, std).
pub fn router_linear(d: usize, e: usize, std: f64, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get_with_hints((e, d), "weight", Init::Randn { mean: 0.0, stdev: std })?;
    Ok(Linear::new(w, None))
}

/// Where a router's logits come from (`model.router.input`).
pub enum Gate {
    /// "hidden": logits = x W, (T, d) -> (T, E); the parameter is `weight` (E, d).
    Hidden(Linear),
    /// "token": logits = table[token id], a learned (V, E) table `token_logits`: context-free
    /// routing, a learned version of hash routing.
    Token(Tensor),
}

impl Gate {
    /// The gate `model.router.input` names, initialised N(0, `init_std`).
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (e, r) = (cfg.model.moe.num_experts, &cfg.model.router);
        if r.input == RouterInput::Token {
            let v = cfg.model.vocab_size;
            if v == 0 {
                candle_core::bail!("router input = \"token\" needs model.vocab_size (0: not yet known)");
            }
            let init = Init::Randn { mean: 0.0, stdev: r.init_std };
            Ok(Gate::Token(vb.get_with_hints((v, e), "token_logits", init)?))
        } else {
            Ok(Gate::Hidden(router_linear(cfg.model.n_embd, e, r.init_std, vb)?))
        }
    }

    /// x: (T, d) -> logits (T, E).
    pub fn logits(&self, x: &Tensor, rc: &RouteCtx) -> Result<Tensor> {
        match self {
            Gate::Hidden(lin) => lin.forward(x),
            Gate::Token(table) => {
                let ids = token_ids(rc, x.dim(0)?, "router with input = \"token\"")?; // (T)
                table.index_select(&ids, 0) // (T, E)
            }
        }
    }
}

/// The (T,) input token ids of a routing call over T hidden-state rows; `who` names the router in
/// the error when they are missing or of the wrong length.
pub fn token_ids(rc: &RouteCtx, t: usize, who: &str) -> Result<Tensor> {
    let Some(ids) = &rc.token_ids else {
        candle_core::bail!(
            "{who} (layer {}) needs the token ids: route through Gpt::forward or MoeLayer::forward_with_ids",
            rc.layer
        )
    };
    let ids = ids.flatten_all()?; // (T)
    if ids.dim(0)? != t {
        candle_core::bail!("{who}: {} token ids for {t} hidden-state rows", ids.dim(0)?);
    }
    Ok(ids)
}

/// The k largest scores of each row, largest first: scores (T, E) -> (T, k) u32 expert indices on
/// the scores' device, with no copy to the host. On the CPU ties go to the lower index (argmax
/// keeps the first maximum, Candle's CPU arg-sort is stable), as [`top_k`]; GPU sorts may order
/// ties either way. A NaN score never panics the CPU sort: it ranks below every number (the MoE
/// layer stops on non-finite logits once routing is done).
pub fn top_k_indices(scores: &Tensor, k: usize) -> Result<Tensor> {
    let (_, e) = scores.dims2()?;
    if k == 0 || k > e {
        candle_core::bail!("top-k routing: k = {k} must be in 1..={e} (the number of experts)");
    }
    if k == 1 {
        return scores.argmax_keepdim(D::Minus1); // (T, 1) u32
    }
    let s = if scores.device().is_cpu() {
        // NaN -> -inf, so the CPU sort's comparator is a total order.
        let neg_inf = Tensor::full(f32::NEG_INFINITY, (), scores.device())?.to_dtype(scores.dtype())?;
        scores.eq(scores)?.where_cond(scores, &neg_inf.broadcast_as(scores.shape())?)?
    } else {
        scores.contiguous()?
    };
    s.arg_sort_last_dim(false)?.narrow(1, 0, k)?.contiguous() // (T, k) u32
}

/// (T, E) u32 rows 0, 1, ..., E - 1 on `like`'s device: every expert, for dense routing.
pub fn all_experts(t: usize, e: usize, like: &Tensor) -> Result<Tensor> {
    Tensor::arange(0u32, e as u32, like.device())?.unsqueeze(0)?.broadcast_as((t, e))?.contiguous()
}

/// The dtype a router compares perturbed or biased scores in: f64 where the device has it (the
/// choice is then the host's f64 choice), f32 on Metal.
pub fn select_dtype(like: &Tensor) -> DType {
    if like.device().is_metal() {
        DType::F32
    } else {
        DType::F64
    }
}

/// Host twin of [`top_k_indices`] for one row: the k largest values of `row`, largest first; ties
/// go to the lower index.
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
