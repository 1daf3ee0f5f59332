//! Host-side helpers shared by the router tests: a test-local generator independent of the
//! crate's Philox streams, f64 reference math (logits, top-k, softmax), tensor readers, a
//! tolerance check and a chi-square test. Nothing here calls the code under test.
#![allow(dead_code)]

use candle_core::{DType, Tensor};
use gumbel_moe::config::Config;
use gumbel_moe::moe::{RouteCtx, Router, Routing};
use gumbel_moe::nn::Ctx;

/// SplitMix64: a test-local generator, independent of the crate's Philox streams.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    pub fn normals(&mut self, n: usize, std: f64) -> Vec<f64> {
        (0..n).map(|_| std * self.normal()).collect()
    }
}

/// A small config with the given router: `e` experts over `d`-dim tokens, m experts per token,
/// pre-filter K, router init N(0, 1).
pub fn router_config(kind: &str, e: usize, d: usize, m: usize, k: usize, hard: bool) -> Config {
    let mut c = Config::default();
    c.model.n_embd = d;
    c.model.n_head = 1;
    c.model.n_layer = 2;
    c.model.moe.num_experts = e;
    c.model.moe.expert_hidden = 16;
    c.model.router.kind = kind.parse().expect("a router kind");
    c.model.router.top_m = m;
    c.model.router.prefilter = k;
    c.model.router.hard = hard;
    c.model.router.init_std = 1.0;
    c
}

pub fn train_ctx(seed: u64, step: u64, tau: f64) -> Ctx {
    Ctx { train: true, step, tau, seed, micro: 0 }
}

pub fn route(r: &dyn Router, x: &Tensor, ctx: Ctx, layer: u32) -> Routing {
    r.route(x, &RouteCtx::new(ctx, layer)).expect("route")
}

pub fn vec2(t: &Tensor) -> Vec<Vec<f64>> {
    t.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap()
}

pub fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

/// A (T, m) u32 index tensor (e.g. `Routing::indices`) as a row-major host vector.
pub fn index_vec(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<u32>().unwrap()
}

/// Host u32 indices as a (N,) CPU tensor.
pub fn u32_tensor(v: &[u32]) -> Tensor {
    Tensor::new(v, &candle_core::Device::Cpu).unwrap()
}

/// Host values as a (rows, cols) CPU tensor of `dtype`.
pub fn tensor2(data: &[f64], rows: usize, cols: usize, dtype: DType) -> Tensor {
    Tensor::from_vec(data.to_vec(), (rows, cols), &candle_core::Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

pub fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// Host logits x W^T in f64: x (T, d) row-major, w (E, d) row-major.
pub fn reference_logits(x: &[f64], w: &[f64], t: usize, d: usize, e: usize) -> Vec<Vec<f64>> {
    (0..t).map(|i| (0..e).map(|j| (0..d).map(|k| x[i * d + k] * w[j * d + k]).sum()).collect()).collect()
}

/// Indices of the k largest entries, largest first, by repeated selection; ties go to the lower index.
pub fn host_topk(v: &[f64], k: usize) -> Vec<usize> {
    let mut taken = vec![false; v.len()];
    let mut out = Vec::with_capacity(k);
    for _ in 0..k {
        let mut best: Option<usize> = None;
        for i in 0..v.len() {
            if !taken[i] && best.is_none_or(|b| v[i] > v[b]) {
                best = Some(i);
            }
        }
        let b = best.unwrap();
        taken[b] = true;
        out.push(b);
    }
    out
}

pub fn host_softmax(v: &[f64]) -> Vec<f64> {
    let mx = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let ex: Vec<f64> = v.iter().map(|a| (a - mx).exp()).collect();
    let s: f64 = ex.iter().sum();
    ex.iter().map(|a| a / s).collect()
}

#[track_caller]
pub fn assert_close(got: f64, want: f64, rtol: f64, atol: f64, what: &str) {
    let tol = atol + rtol * want.abs().max(got.abs());
    assert!(
        (got - want).abs() <= tol,
        "{what}: got {got:e}, want {want:e} (|diff| {:e} > tol {tol:e})",
        (got - want).abs()
    );
}

/// Upper tail of the standard normal (Abramowitz & Stegun 26.2.17, |error| < 7.5e-8).
pub fn normal_sf(z: f64) -> f64 {
    if z < 0.0 {
        return 1.0 - normal_sf(-z);
    }
    let t = 1.0 / (1.0 + 0.231_641_9 * z);
    let poly =
        t * (0.319_381_530 + t * (-0.356_563_782 + t * (1.781_477_937 + t * (-1.821_255_978 + t * 1.330_274_429))));
    (-z * z / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt() * poly
}

/// P(chi2_df > x) by the Wilson-Hilferty cube-root normal approximation.
pub fn chi2_sf(x: f64, df: f64) -> f64 {
    let v = 2.0 / (9.0 * df);
    normal_sf(((x / df).powf(1.0 / 3.0) - (1.0 - v)) / v.sqrt())
}

/// Pearson chi-square of `counts` against probabilities `probs`; panics when p < 1e-3.
#[track_caller]
pub fn chi_square(counts: &[usize], probs: &[f64], label: &str) {
    let n: usize = counts.iter().sum();
    let chi2: f64 = counts.iter().zip(probs).map(|(&c, &q)| (c as f64 - n as f64 * q).powi(2) / (n as f64 * q)).sum();
    let p = chi2_sf(chi2, (counts.len() - 1) as f64);
    assert!(p > 1e-3, "{label}: counts {counts:?} vs probabilities {probs:?}: chi2 = {chi2:.2}, p = {p:.2e}");
}

/// The test's own SplitMix64 finaliser of a token id, modulo `e`: the hash router's expert.
pub fn host_hash(id: u32, e: usize) -> u32 {
    let mut z = (id as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) % e as u64) as u32
}
