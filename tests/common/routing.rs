//! Router builders shared by the router tests: a small config per router kind, a router over a
//! given weight or over fresh parameters, routing by token ids, a tiny GPT, and the crate's Gumbel
//! noise at a key.
#![allow(dead_code)]

use super::host::{router_config, Rng};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use gumbel_moe::config::Config;
use gumbel_moe::model::Gpt;
use gumbel_moe::moe::{build_router, RouteCtx, Router, Routing};
use gumbel_moe::nn::{Ctx, Params};
use gumbel_moe::rng::gumbel_noise;
use std::collections::HashMap;

const CPU: Device = Device::Cpu;

/// A small config: `e` experts over `d`-dim tokens, the given router.
pub fn config(kind: &str, e: usize, d: usize, m: usize, k: usize, hard: bool) -> Config {
    // Soft Gumbel here means all K candidates (top_m = K); soft top-m < K is tested in gumbel_top_m.rs.
    router_config(kind, e, d, if kind == "gumbel" && !hard { k } else { m }, k, hard)
}

/// A router whose projection weight is exactly `w` (E, d): logits = x w^T.
pub fn router_from(cfg: &Config, w: &Tensor) -> Box<dyn Router> {
    let mut ts = HashMap::new();
    ts.insert("weight".to_string(), w.clone());
    let vb = VarBuilder::from_tensors(ts, w.dtype(), &CPU);
    build_router(cfg, 0, vb).expect("build router")
}

/// A router over fresh parameters (f64), its named variables set to `vals` (others N(0, 1)).
pub fn router_with(cfg: &Config, vals: &[(&str, Vec<f64>)], rng: &mut Rng) -> (Box<dyn Router>, Params) {
    let params = Params::new();
    let router = build_router(cfg, 0, params.var_builder(3, DType::F64, &CPU)).expect("build router");
    for (name, v) in params.named() {
        let data = match vals.iter().find(|(n, _)| *n == name) {
            Some((_, d)) => d.clone(),
            None => rng.normals(v.elem_count(), 1.0),
        };
        v.set(&Tensor::from_vec(data, v.shape(), &CPU).unwrap().to_dtype(v.dtype()).unwrap()).unwrap();
    }
    (router, params)
}

/// Routes zero (N, d) f32 tokens with the token ids `ids`.
pub fn hash_route(router: &dyn Router, ids: &[u32], d: usize, ctx: Ctx, layer: u32) -> Routing {
    let n = ids.len();
    let x = Tensor::zeros((n, d), DType::F32, &CPU).unwrap();
    let rc = RouteCtx { ctx, layer, token_ids: Some(Tensor::new(ids, &CPU).unwrap()) };
    router.route(&x, &rc).unwrap()
}

/// A tiny GPT with the given router in every block.
pub fn tiny_gpt(kind: &str, params: &Params, e: usize) -> (Config, Gpt) {
    let mut cfg = router_config(kind, e, 8, 1, 1, true);
    cfg.model.vocab_size = 11;
    cfg.model.block_size = 8;
    cfg.model.n_head = 2;
    cfg.model.moe_every = 1;
    cfg.model.router.init_std = 0.5;
    let gpt = Gpt::new(&cfg, params.var_builder(2, DType::F32, &CPU)).unwrap();
    (cfg, gpt)
}

/// The crate's Gumbel noise of (seed, step, layer, token, expert) in f64.
pub fn noise_of(seed: u64, step: u64, layer: u32, token: u32, expert: usize) -> f64 {
    gumbel_noise(seed, step as u32, layer, token, expert as u32) as f64
}
