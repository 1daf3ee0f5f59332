//! The built-in routers, one per file, and the host-side helpers they share.
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
use candle_core::{DType, Result, Tensor};
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
