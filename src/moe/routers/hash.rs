//! Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models"): each token goes to a
//! fixed expert chosen by hashing its input token id, expert = mix(id) mod E, weight 1. No
//! parameters and nothing learned; the expert of a token id is the same in every layer, step and run.
//!
//! mix is the SplitMix64 finaliser (Steele et al. 2014), a fixed bijective integer hash whose low
//! bits are well spread, so ids map to experts near uniformly. The router needs the token ids:
//! `Gpt::forward` passes them in `RouteCtx::token_ids`. The routing's `logits` are zeros (T, E) and
//! `probs` uniform, constants of no parameter, so the balance loss and z-loss are constants too.
//! With `model.vocab_size` known (always in a model) the router looks the experts up in a (V,)
//! table on the device; without it (a router built on its own) it hashes a host copy of the ids.

use super::token_ids;
use crate::config::Config;
use crate::moe::{RouteCtx, Router, Routing};
use candle_core::{DType, Device, Result, Tensor};
use std::sync::Mutex;

pub struct HashRouter {
    e: usize,
    /// model.vocab_size (0: not known, the ids are then hashed on the host).
    vocab: usize,
    /// (V,) u32 expert of every token id, on the device of the last call.
    table: Mutex<Option<Tensor>>,
}

impl HashRouter {
    pub fn new(cfg: &Config) -> Result<Self> {
        let e = cfg.model.moe.num_experts;
        if e == 0 {
            candle_core::bail!("hash router needs num_experts > 0");
        }
        Ok(Self { e, vocab: cfg.model.vocab_size, table: Mutex::new(None) })
    }

    /// The (V,) expert table on `dev`, built once per device; None when V is not known.
    fn table(&self, dev: &Device) -> Result<Option<Tensor>> {
        if self.vocab == 0 {
            return Ok(None);
        }
        let mut t = self.table.lock().map_err(|_| candle_core::Error::Msg("hash router: table poisoned".into()))?;
        if let Some(tb) = t.as_ref().filter(|tb| tb.device().same_device(dev)) {
            return Ok(Some(tb.clone()));
        }
        let v: Vec<u32> = (0..self.vocab as u32).map(|id| hash_expert(id, self.e)).collect();
        let tb = Tensor::from_vec(v, self.vocab, dev)?;
        *t = Some(tb.clone());
        Ok(Some(tb))
    }
}

/// SplitMix64's finaliser: a fixed bijection of u64 with good avalanche.
pub fn mix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The expert of token id `id` among `e`.
pub fn hash_expert(id: u32, e: usize) -> u32 {
    (mix64(id as u64) % e as u64) as u32
}

impl Router for HashRouter {
    fn route(&self, x: &Tensor, rc: &RouteCtx) -> Result<Routing> {
        let t = x.dim(0)?;
        let ids = token_ids(rc, t, "hash router")?.to_dtype(DType::U32)?; // (T,)
        let indices = match self.table(x.device())? {
            Some(table) => table.index_select(&ids, 0)?.reshape((t, 1))?, // (T, 1) u32
            None => {
                let host: Vec<u32> = ids.to_vec1::<u32>()?.iter().map(|&id| hash_expert(id, self.e)).collect();
                Tensor::from_vec(host, (t, 1), x.device())?
            }
        };
        let weights = Tensor::ones((t, 1), x.dtype(), x.device())?; // (T, 1), a constant
        let logits = Tensor::zeros((t, self.e), x.dtype(), x.device())?; // (T, E)
        let probs = (logits.ones_like()? / self.e as f64)?; // (T, E) uniform = softmax(zeros)
        Routing::new(indices, weights, logits, probs)
    }

    fn num_experts(&self) -> usize {
        self.e
    }
}
