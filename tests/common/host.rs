//! Host-side helpers shared by the router tests: a test-local generator independent of the
//! crate's Philox streams, f64 reference math (logits, top-k, softmax), tensor readers and a
//! tolerance check. Nothing here calls the code under test.
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

pub fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// Host logits x W^T in f64: x (T, d) row-major, w (E, d) row-major.
pub fn host_logits(x: &[f64], w: &[f64], t: usize, d: usize, e: usize) -> Vec<Vec<f64>> {
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

/// Checks the autograd gradient of the scalar `f` at the 2-D f64 point `x0` against central
/// finite differences (step 1e-6): |fd - grad| < rtol * (1 + |fd|) for every element.
pub fn assert_grad_matches_fd(
    f: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
    x0: &Tensor,
    rtol: f64,
    what: &str,
) -> candle_core::Result<()> {
    let xv = candle_core::Var::from_tensor(x0)?;
    let grad = f(xv.as_tensor())?.backward()?.get(xv.as_tensor()).expect("grad").to_vec2::<f64>()?;
    let base = x0.to_vec2::<f64>()?;
    let h = 1e-6;
    for i in 0..base.len() {
        for j in 0..base[i].len() {
            let mut plus = base.clone();
            plus[i][j] += h;
            let mut minus = base.clone();
            minus[i][j] -= h;
            let fp = f(&Tensor::new(plus, x0.device())?)?.to_scalar::<f64>()?;
            let fm = f(&Tensor::new(minus, x0.device())?)?.to_scalar::<f64>()?;
            let fd = (fp - fm) / (2.0 * h);
            let err = (fd - grad[i][j]).abs();
            assert!(
                err < rtol * (1.0 + fd.abs()),
                "{what}d/dx[{i},{j}]: autograd {} vs finite difference {fd}",
                grad[i][j]
            );
        }
    }
    Ok(())
}
