//! The fused Gumbel router ops (src/ops/gumbel_router/) against the plain-tensor reference
//! (moe::routers::gumbel: prefilter, noise, relaxed, straight_through), on the CPU.

use candle_core::{DType, Device, Result, Tensor, Var};
use gumbel_moe::moe::routers::gumbel::{noise, prefilter, relaxed, straight_through};
use gumbel_moe::moe::routers::top_k;
use gumbel_moe::ops::{gumbel_route, gumbel_select, gumbel_weights, GumbelParams};
use gumbel_moe::rng::{philox4x32_10, Stream};

mod common;
use common::fd::assert_grad_matches_fd;
use common::host::chi2_sf;

/// Deterministic test logits (T, E) from Philox (N(0, scale)-ish via a sum of uniforms).
fn logits(t: usize, e: usize, tag: u32, scale: f64, dtype: DType) -> Result<Tensor> {
    let mut v = Vec::with_capacity(t * e);
    for i in 0..(t * e) as u32 {
        let r = philox4x32_10([i, tag, 7, (Stream::Init as u32) << 16], [11, 13]);
        let s: f64 = r.iter().map(|&x| x as f64 / u32::MAX as f64 - 0.5).sum::<f64>();
        v.push(s * scale * 1.7);
    }
    Tensor::from_vec(v, (t, e), &Device::Cpu)?.to_dtype(dtype)
}

fn params(k: usize, m: usize, tau: f64) -> GumbelParams {
    GumbelParams { k, m, tau, seed: 0x1234_5678_9abc, step: 17, layer: 3, token_base: 5, noisy: true }
}

/// What the reference router computes from `logits`: candidates (T*K), selected positions (T*m),
/// y (T, K), straight-through weights (T, m).
struct Reference {
    cands: Vec<u32>,
    sel: Vec<u32>,
    y: Tensor,
    w: Tensor,
}

fn reference(logits: &Tensor, p: &GumbelParams) -> Result<Reference> {
    let (t, _e) = logits.dims2()?;
    let k = p.k;
    let host = logits.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let cands = prefilter(&host, k);
    let g = if p.noisy { noise(&cands, p.seed, p.step as u64, p.layer, p.token_base) } else { vec![vec![0.0; k]; t] };
    let cand_idx: Vec<u32> = cands.iter().flatten().map(|&e| e as u32).collect();
    let cand_t = Tensor::from_vec(cand_idx.clone(), (t, k), &Device::Cpu)?;
    let cand = logits.gather(&cand_t, 1)?;
    let g_t = Tensor::from_vec(g.iter().flatten().copied().collect::<Vec<f64>>(), (t, k), &Device::Cpu)?
        .to_dtype(logits.dtype())?;
    let y = relaxed(&cand, &g_t, p.tau)?;
    let mut sel = Vec::new();
    for (tok, c) in cands.iter().enumerate() {
        let pert: Vec<f64> = c.iter().zip(&g[tok]).map(|(&e, gi)| host[tok][e] + gi).collect();
        sel.extend(top_k(&pert, p.m).into_iter().map(|x| x as u32));
    }
    let m = p.m.max(1);
    let sel_t = Tensor::from_vec(if p.m == 0 { vec![0u32; t] } else { sel.clone() }, (t, m), &Device::Cpu)?;
    let w = straight_through(&y, &sel_t, m)?;
    Ok(Reference { cands: cand_idx, sel, y, w })
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    a.to_dtype(DType::F64)?.sub(&b.to_dtype(DType::F64)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()
}

/// (T, E, K, m) shapes: E not a multiple of 32, K = 1, K = E, m = 2, T = 1. With AVX2, the rows
/// of (64, 64, 8, 1), (24, 8, 8, 2), (19, 40, 5, 2), (20, 64, 12, 3) and (16, 16, 16, 2) go 8 at a
/// time through the sorting-network top-K (E a multiple of 8, K <= 16; 19 and 20 rows leave tails
/// for the per-row path), and K = 12, 16 take the two-register choice and softmax.
const SHAPES: [(usize, usize, usize, usize); 12] = [
    (1, 8, 1, 1),
    (24, 8, 8, 2),
    (19, 40, 5, 2),
    (20, 64, 12, 3),
    (16, 16, 16, 2),
    (5, 37, 4, 2),
    (17, 100, 16, 2),
    (64, 64, 8, 1),
    (4, 6, 6, 3),
    (3, 10, 1, 1),
    (1, 256, 16, 16),
    (33, 256, 32, 2),
];

#[test]
fn forward_matches_reference() -> Result<()> {
    for dtype in [DType::F32, DType::F64] {
        for (i, &(t, e, k, m)) in SHAPES.iter().enumerate() {
            for tau in [1.0, 0.5] {
                let x = logits(t, e, i as u32, 2.0, dtype)?;
                let p = params(k, m, tau);
                let r = reference(&x, &p)?;
                let cs = gumbel_select(&x, &p)?;
                assert_eq!(cs.dims2()?, (t, k + m));
                let cs_host: Vec<u32> = cs.flatten_all()?.to_vec1()?;
                let (mut cands, mut sel) = (Vec::new(), Vec::new());
                for row in cs_host.chunks(k + m) {
                    cands.extend_from_slice(&row[..k]);
                    sel.extend_from_slice(&row[k..]);
                }
                assert_eq!(cands, r.cands, "candidates {dtype:?} T={t} E={e} K={k}");
                assert_eq!(sel, r.sel, "selection {dtype:?} T={t} E={e} K={k} m={m}");
                let y = gumbel_weights(&x, &cs, &p)?;
                assert_eq!(y.dtype(), dtype);
                let tol = if dtype == DType::F32 { 2e-6 } else { 1e-14 };
                let d = max_abs_diff(&y, &r.y)?;
                assert!(d < tol, "y differs by {d} ({dtype:?} T={t} E={e} K={k} tau={tau})");
                let f = gumbel_route(&x, &p, true)?;
                // y as the select op saved it (computed in the same pass, copied by the weights op).
                let d = max_abs_diff(&f.y, &r.y)?;
                assert!(d < tol, "saved y differs by {d} ({dtype:?} T={t} E={e} K={k} tau={tau})");
                assert_eq!(f.weights.dims2()?, (t, m));
                let d = max_abs_diff(&f.weights, &r.w)?;
                assert!(d == 0.0, "straight-through weights differ by {d}");
                let want: Vec<u32> = (0..t)
                    .flat_map(|tok| (0..m).map(move |j| (tok, j)))
                    .map(|(tok, j)| r.cands[tok * k + r.sel[tok * m + j] as usize])
                    .collect();
                assert_eq!(f.indices, want);
            }
        }
    }
    Ok(())
}

/// Gradients of a loss through the straight-through weights and through the soft y.
#[test]
fn backward_matches_reference() -> Result<()> {
    for dtype in [DType::F32, DType::F64] {
        for (i, &(t, e, k, m)) in SHAPES.iter().enumerate() {
            let x0 = logits(t, e, 100 + i as u32, 1.5, dtype)?;
            let p = params(k, m, 0.7);
            let rw = logits(t, m, 200 + i as u32, 1.0, dtype)?;
            let ry = logits(t, k, 300 + i as u32, 1.0, dtype)?;
            let loss =
                |w: &Tensor, y: &Tensor| -> Result<Tensor> { (w * &rw)?.sum_all()? + (y * &ry)?.sum_all()?.sqr()? };

            let xv = Var::from_tensor(&x0)?;
            let r = reference(xv.as_tensor(), &p)?;
            let g_ref = loss(&r.w, &r.y)?.backward()?.get(xv.as_tensor()).unwrap().clone();

            let xf = Var::from_tensor(&x0)?;
            let f = gumbel_route(xf.as_tensor(), &p, true)?;
            let g_fused = loss(&f.weights, &f.y)?.backward()?.get(xf.as_tensor()).unwrap().clone();

            assert_eq!(g_fused.dims2()?, (t, e));
            let scale = g_ref.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F64)?.to_scalar::<f64>()?.max(1.0);
            let d = max_abs_diff(&g_fused, &g_ref)? / scale;
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
            assert!(d < tol, "dlogits differ by {d} (relative) {dtype:?} T={t} E={e} K={k} m={m}");
            // Zero outside the candidates.
            let gh = g_fused.to_dtype(DType::F64)?.to_vec2::<f64>()?;
            for (tok, row) in gh.iter().enumerate() {
                let c = &r.cands[tok * k..(tok + 1) * k];
                for (j, v) in row.iter().enumerate() {
                    if !c.contains(&(j as u32)) {
                        assert_eq!(*v, 0.0, "gradient at non-candidate expert {j} of token {tok}");
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn soft_route_matches_reference() -> Result<()> {
    let x = logits(9, 37, 5, 1.0, DType::F32)?;
    let p = params(5, 2, 1.3);
    let f = gumbel_route(&x, &p, false)?;
    let r = reference(&x, &GumbelParams { m: 0, ..p })?;
    assert_eq!(f.m, 5);
    assert_eq!(f.indices, r.cands);
    assert!(max_abs_diff(&f.weights, &r.y)? < 2e-6);
    Ok(())
}

#[test]
fn same_key_same_indices_and_token_keyed_noise() -> Result<()> {
    let x = logits(200, 64, 9, 1.0, DType::F32)?;
    let p = params(8, 2, 1.0);
    let a: Vec<u32> = gumbel_select(&x, &p)?.flatten_all()?.to_vec1()?;
    let b: Vec<u32> = gumbel_select(&x, &p)?.flatten_all()?.to_vec1()?;
    assert_eq!(a, b, "same seed, same indices");
    let c: Vec<u32> = gumbel_select(&x, &GumbelParams { seed: p.seed + 1, ..p })?.flatten_all()?.to_vec1()?;
    assert_ne!(a, c, "another seed should move some selections");
    let d: Vec<u32> = gumbel_select(&x, &GumbelParams { step: p.step + 1, ..p })?.flatten_all()?.to_vec1()?;
    assert_ne!(a, d, "another step should move some selections");
    // The noise is keyed by token_base + row: rows 10.. with base 5 are rows 0.. with base 15.
    let tail = x.narrow(0, 10, 190)?;
    let e: Vec<u32> = gumbel_select(&tail, &GumbelParams { token_base: 15, ..p })?.flatten_all()?.to_vec1()?;
    assert_eq!(&a[10 * 10..], &e[..]);
    Ok(())
}

#[test]
fn strided_rows_match_contiguous() -> Result<()> {
    let wide = logits(21, 50, 4, 1.0, DType::F32)?;
    let x = wide.narrow(1, 3, 40)?; // rows strided by 50
    assert!(!x.is_contiguous());
    let xc = x.contiguous()?;
    let p = params(6, 2, 0.8);
    let a = gumbel_select(&x, &p)?;
    let b = gumbel_select(&xc, &p)?;
    assert_eq!(a.flatten_all()?.to_vec1::<u32>()?, b.flatten_all()?.to_vec1::<u32>()?);
    // Candidates given as a narrow (T, K) view of the (T, K + m) select output.
    let cand = a.narrow(1, 0, 6)?;
    let ya = gumbel_weights(&x, &cand, &p)?;
    let yb = gumbel_weights(&xc, &b, &p)?;
    assert_eq!(max_abs_diff(&ya, &yb)?, 0.0);
    Ok(())
}

#[test]
fn eval_mode_is_noise_free() -> Result<()> {
    let x = logits(30, 37, 6, 1.0, DType::F32)?;
    let p = GumbelParams { noisy: false, ..params(4, 2, 1.0) };
    let cs = gumbel_select(&x, &p)?.to_vec2::<u32>()?;
    for row in &cs {
        assert_eq!(&row[4..], &[0, 1], "without noise the best two candidates are selected");
    }
    let r = reference(&x, &p)?;
    let y = gumbel_weights(&x, &gumbel_select(&x, &p)?, &p)?;
    assert!(max_abs_diff(&y, &r.y)? < 2e-6);
    Ok(())
}

#[test]
fn finite_difference_gradcheck() -> Result<()> {
    for &(t, e, k, tau) in &[(3usize, 37usize, 5usize, 0.7f64), (2, 10, 10, 1.0), (4, 100, 1, 1.0)] {
        let x0 = logits(t, e, 40 + e as u32, 1.0, DType::F64)?;
        let p = params(k, 1, tau);
        let cand = gumbel_select(&x0, &p)?; // fixed: the candidate set does not move for small steps
        let r = logits(t, k, 50, 1.0, DType::F64)?;
        let f = |x: &Tensor| -> Result<Tensor> { (gumbel_weights(x, &cand, &p)? * &r)?.sum_all()?.sqr() };
        assert_grad_matches_fd(f, &x0, 1e-6, "")?;
    }
    Ok(())
}

/// The fused op's first pick is a sample from softmax over the top-K logits (Gumbel-max).
#[test]
fn selection_frequencies_follow_softmax_over_candidates() -> Result<()> {
    // E = 37: the per-row top-K; E = 64, K = 8: the sorting network (with AVX2).
    for (e, k) in [(37usize, 6usize), (64, 8)] {
        selection_frequencies(e, k)?;
    }
    Ok(())
}

fn selection_frequencies(e: usize, k: usize) -> Result<()> {
    let n = 40_000usize;
    let row = logits(1, e, 77, 1.0, DType::F32)?.to_vec2::<f32>()?.remove(0);
    let x = Tensor::from_vec(row.repeat(n), (n, e), &Device::Cpu)?;
    // Every token sees the same logits and its own noise (keyed by its token index).
    let p = GumbelParams { token_base: 0, ..params(k, 2, 1.0) };
    let cs = gumbel_select(&x, &p)?.to_vec2::<u32>()?;
    let top: Vec<usize> = top_k(&row.iter().map(|&v| v as f64).collect::<Vec<_>>(), k);
    let z: f64 = top.iter().map(|&i| (row[i] as f64).exp()).sum();
    let probs: Vec<f64> = top.iter().map(|&i| (row[i] as f64).exp() / z).collect();
    let mut counts = vec![0usize; k];
    for r in &cs {
        assert_eq!(r[..k].iter().map(|&c| c as usize).collect::<Vec<_>>(), top);
        counts[r[k] as usize] += 1;
    }
    let chi2: f64 = counts.iter().zip(&probs).map(|(&c, &q)| (c as f64 - n as f64 * q).powi(2) / (n as f64 * q)).sum();
    let pval = chi2_sf(chi2, (k - 1) as f64);
    assert!(pval > 1e-3, "selection counts {counts:?} vs softmax {probs:?}: chi2 = {chi2:.2}, p = {pval:.2e}");
    Ok(())
}

#[test]
fn bad_arguments_are_errors() -> Result<()> {
    let x = logits(4, 8, 1, 1.0, DType::F32)?;
    assert!(gumbel_select(&x, &params(9, 1, 1.0)).is_err(), "K > E");
    assert!(gumbel_select(&x, &params(4, 5, 1.0)).is_err(), "m > K");
    assert!(gumbel_select(&x, &params(0, 0, 1.0)).is_err(), "K = 0");
    assert!(gumbel_select(&x, &params(4, 1, 0.0)).is_err(), "tau = 0");
    assert!(gumbel_select(&x.to_dtype(DType::BF16)?, &params(4, 1, 1.0)).is_err(), "bf16");
    let mut v = x.to_vec2::<f32>()?;
    v[2][3] = f32::NAN;
    let bad = Tensor::new(v, &Device::Cpu)?;
    let err = gumbel_select(&bad, &params(4, 1, 1.0)).unwrap_err().to_string();
    assert!(err.contains("non-finite") && err.contains("token 2") && err.contains("expert 3"), "{err}");
    let wrong = Tensor::from_vec(vec![0u32, 1, 2, 99], (1, 4), &Device::Cpu)?;
    assert!(gumbel_weights(&x.narrow(0, 0, 1)?, &wrong, &params(4, 1, 1.0)).is_err(), "candidate out of range");
    Ok(())
}

/// The same keys and values that kernels/host_check.cpp asserts for the shared C header, so the
/// Rust and kernel Philox streams are pinned to one table.
#[test]
fn kernel_noise_constants() {
    use gumbel_moe::rng::gumbel_noise;
    let keys: [(u64, u32, u32, u32, u32, u32, f64); 3] = [
        (0x1234_5678_9abc, 17, 3, 5, 0, 0x51cd9c65, -0.13178364170919343),
        (0x2a, 3, 1, 65535, 63, 0x1e826c93, -0.7547785332091538),
        (0xfeed_beef_1234, 9, 2, 77, 255, 0xa8304807, 0.8672828807788139),
    ];
    for (seed, step, layer, token, expert, word, g) in keys {
        let r = philox4x32_10(
            [token, expert, step, (Stream::Gumbel as u32) << 16 | layer],
            [seed as u32, (seed >> 32) as u32],
        );
        assert_eq!(r[0], word);
        let n = gumbel_noise(seed, step, layer, token, expert) as f64;
        assert!((n - g).abs() < 2e-6 * (1.0 + g.abs()), "{n} vs {g}");
    }
}

/// The straight-through op alone: 1/m forward and the gradient of the tensor form
/// (`routers::gumbel::straight_through`) backward, m = 1 and 2; bad shapes are errors naming it.
#[test]
fn straight_through_op_matches_tensor_form() -> Result<()> {
    use gumbel_moe::ops::straight_through as st_op;
    for (k, m) in [(4usize, 1usize), (5, 2), (1, 1)] {
        let (t, e) = (7usize, 9usize);
        let x = logits(t, e, 40 + k as u32, 1.0, DType::F32)?;
        let p = params(k, m, 0.8);
        let cs = gumbel_moe::ops::gumbel_router::gumbel_select_saving_y(&x, &p)?;
        let yv = Var::from_tensor(&logits(t, k, 50 + m as u32, 1.0, DType::F32)?)?;
        let r = logits(t, m, 60, 1.0, DType::F32)?;
        let w_op = st_op(yv.as_tensor(), &cs, k, m)?;
        let sel = cs.narrow(1, k, m)?.contiguous()?;
        let w_ref = straight_through(yv.as_tensor(), &sel, m)?;
        assert_eq!(w_op.to_vec2::<f32>()?, w_ref.to_vec2::<f32>()?);
        let g_op = (w_op * &r)?.sum_all()?.backward()?.get(yv.as_tensor()).unwrap().clone();
        let g_ref = (w_ref * &r)?.sum_all()?.backward()?.get(yv.as_tensor()).unwrap().clone();
        assert_eq!(g_op.to_vec2::<f32>()?, g_ref.to_vec2::<f32>()?, "k={k} m={m}");
        assert!(g_op.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
    }
    let y = Tensor::zeros((3, 4), DType::F32, &Device::Cpu)?;
    let narrow = Tensor::zeros((3, 4), DType::U32, &Device::Cpu)?;
    let err = st_op(&y, &narrow, 4, 1).unwrap_err().to_string();
    assert!(err.contains("straight-through") && err.contains("cand_sel"), "{err}");
    let err = st_op(&y, &Tensor::zeros((3, 6), DType::U32, &Device::Cpu)?, 4, 0).unwrap_err().to_string();
    assert!(err.contains("m (0)"), "{err}");
    Ok(())
}
