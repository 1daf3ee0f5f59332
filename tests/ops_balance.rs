//! The fused balance-statistics op (src/ops/balance_stats/) against its plain-tensor twin
//! (`balance_stats_reference`: expert_fractions + softmax(logits).mean(0)) and against finite
//! differences; and the fused balance loss against `moe::losses::load_balance`. The twin and loss
//! comparisons run on every device (`test_device!`, f64 cases on the CPU only); finite differences,
//! thread counts and argument errors on the CPU.

use candle_core::{DType, Device, Result, Tensor, Var};
use gumbel_moe::moe::losses::{load_balance, load_balance_fused};
use gumbel_moe::nn::ops::softmax;
use gumbel_moe::ops::balance_stats::chunk_rows;
use gumbel_moe::ops::{balance_stats, balance_stats_reference, BalanceStatsBwd};
use gumbel_moe::rng::{philox4x32_10, Stream};

mod common;
use common::fd::assert_grad_matches_fd;

const CPU: Device = Device::Cpu;

/// Whether `dev` runs `dtype` cases: f64 only on the CPU, as the GPU kernels are f32 only (and
/// Metal has no f64 at all).
fn runs(dev: &Device, dtype: DType) -> bool {
    dev.is_cpu() || dtype != DType::F64
}

/// Deterministic test values (rows, cols) from Philox, roughly N(0, scale), as `dtype` on `dev`.
fn randn(rows: usize, cols: usize, tag: u32, scale: f64, dtype: DType, dev: &Device) -> Result<Tensor> {
    let mut v = Vec::with_capacity(rows * cols);
    for i in 0..(rows * cols) as u32 {
        let r = philox4x32_10([i, tag, 9, (Stream::Init as u32) << 16], [21, 23]);
        let s: f64 = r.iter().map(|&x| x as f64 / u32::MAX as f64 - 0.5).sum::<f64>();
        v.push(s * scale * 1.7);
    }
    Tensor::from_vec(v, (rows, cols), &CPU)?.to_dtype(dtype)?.to_device(dev)
}

/// (T, m) expert indices in 0..E from Philox on `dev`, skewed toward low experts so the counts differ.
fn indices(t: usize, m: usize, e: usize, tag: u32, dev: &Device) -> Result<Tensor> {
    let v: Vec<u32> = (0..(t * m) as u32)
        .map(|i| {
            let r = philox4x32_10([i, tag, 3, (Stream::Init as u32) << 16], [5, 8]);
            let a = r[0] as usize % e;
            (a.min(r[1] as usize % e)) as u32
        })
        .collect();
    Tensor::from_vec(v, (t, m), dev)
}

/// max |a|, read on the host (in f64).
fn max_abs(a: &Tensor) -> Result<f64> {
    a.to_device(&CPU)?.to_dtype(DType::F64)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()
}

/// max |a - b| / max |b|, on the host in f64.
fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (a.to_device(&CPU)?, b.to_device(&CPU)?);
    let d = max_abs(&a.to_dtype(DType::F64)?.sub(&b.to_dtype(DType::F64)?)?)?;
    Ok(d / max_abs(&b)?.max(1e-300))
}

/// (T, E, m): E not a multiple of 32, E = 256, m = 2 and 4, T = 1, several chunks with a ragged
/// last one (T = 1000: chunks of 32; T = 5000: chunks of 71).
const SHAPES: [(usize, usize, usize); 9] = [
    (1, 8, 1),
    (1, 256, 4),
    (1, 1, 1),
    (5, 37, 2),
    (33, 100, 2),
    (64, 64, 1),
    (1000, 37, 2),
    (300, 256, 4),
    (5000, 16, 1),
];

#[test]
fn chunking_covers_the_rows() {
    for t in [1usize, 31, 32, 33, 1000, 1024, 1025, 5000, 65_536, 1_000_000] {
        let c = chunk_rows(t);
        assert!(c >= 32 && c * c >= t && (c == 32 || (c - 1) * (c - 1) < t), "T = {t}: chunk {c}");
    }
}

fn forward_matches_reference_on(dev: &Device) -> Result<()> {
    for (i, &(t, e, m)) in SHAPES.iter().enumerate() {
        // The f64 twin on the host; the op and its same-dtype twin on `dev`.
        let x64 = randn(t, e, i as u32, 2.0, DType::F64, &CPU)?;
        let want64 = balance_stats_reference(&x64, &indices(t, m, e, i as u32, &CPU)?)?; // (2, E)
        let idx = indices(t, m, e, i as u32, dev)?;
        for dtype in [DType::F64, DType::F32] {
            if !runs(dev, dtype) {
                continue;
            }
            let x = x64.to_dtype(dtype)?.to_device(dev)?;
            let got = balance_stats(&x, &idx)?;
            assert_eq!(got.dims2()?, (2, e));
            assert_eq!(got.dtype(), dtype);
            // f: the same f64 quotient rounded to the dtype, bit for bit.
            let want = balance_stats_reference(&x, &idx)?;
            let (fg, fw) = (
                got.get(0)?.to_device(&CPU)?.to_dtype(DType::F64)?.to_vec1::<f64>()?,
                want.get(0)?.to_device(&CPU)?.to_dtype(DType::F64)?.to_vec1::<f64>()?,
            );
            assert_eq!(fg, fw, "f differs ({dtype:?} T={t} E={e} m={m})");
            let fsum: f64 = fg.iter().sum();
            assert!((fsum - 1.0).abs() < 1e-6, "f sums to {fsum}");
            // P: against the same-dtype twin and against the f64 twin.
            let tol = if dtype == DType::F32 { 2e-6 } else { 1e-13 };
            let d = rel_err(&got.get(1)?, &want.get(1)?)?;
            assert!(d < tol, "P vs same-dtype reference: {d} ({dtype:?} T={t} E={e} m={m})");
            let d = rel_err(&got.get(1)?, &want64.get(1)?)?;
            assert!(d < tol, "P vs f64 reference: {d} ({dtype:?} T={t} E={e} m={m})");
        }
    }
    Ok(())
}

test_device!(
    forward_matches_reference_on,
    forward_matches_reference,
    forward_matches_reference_cuda,
    forward_matches_reference_metal
);

/// d/dlogits of sum(stats * r) for a random (2, E) r: the f row carries no gradient, the P row
/// the softmax-mean gradient; fused backward op vs autograd through the plain-tensor twin.
fn backward_matches_reference_on(dev: &Device) -> Result<()> {
    for (i, &(t, e, m)) in SHAPES.iter().enumerate() {
        for dtype in [DType::F64, DType::F32] {
            if !runs(dev, dtype) {
                continue;
            }
            let x0 = randn(t, e, 100 + i as u32, 1.5, dtype, dev)?;
            let idx = indices(t, m, e, 100 + i as u32, dev)?;
            let r = randn(2, e, 200 + i as u32, 1.0, dtype, dev)?;
            let grad = |f: &dyn Fn(&Tensor) -> Result<Tensor>| -> Result<Tensor> {
                let v = Var::from_tensor(&x0)?;
                let loss = (f(v.as_tensor())? * &r)?.sum_all()?;
                Ok(loss.backward()?.get(v.as_tensor()).expect("logits gradient").clone())
            };
            let g_ref = grad(&|x| balance_stats_reference(x, &idx))?;
            let g_fused = grad(&|x| balance_stats(x, &idx))?;
            assert_eq!(g_fused.dims2()?, (t, e));
            // (E = 1: softmax is constant, the gradient is exactly 0 on both sides.)
            assert!(e == 1 || max_abs(&g_ref)? > 0.0, "reference gradient is trivially zero");
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
            let d = rel_err(&g_fused, &g_ref)?;
            assert!(d < tol, "dlogits differ by {d} (relative) {dtype:?} T={t} E={e} m={m}");
        }
    }
    Ok(())
}

test_device!(
    backward_matches_reference_on,
    backward_matches_reference,
    backward_matches_reference_cuda,
    backward_matches_reference_metal
);

/// The backward op on its own: strided logits rows and a strided grad give what the contiguous
/// ones give, and the gradient row 0 (dL/df) is ignored.
#[test]
fn backward_op_ignores_the_count_row_and_strides() -> Result<()> {
    let (t, e) = (70usize, 37usize);
    let wide = randn(t, e + 5, 7, 1.0, DType::F64, &CPU)?;
    let x = wide.narrow(1, 2, e)?;
    assert!(!x.is_contiguous());
    let g = randn(2, e, 8, 1.0, DType::F64, &CPU)?;
    let a = x.apply_op2_no_bwd(&g, &BalanceStatsBwd)?;
    let b = x.contiguous()?.apply_op2_no_bwd(&g, &BalanceStatsBwd)?;
    assert_eq!(max_abs(&(&a - &b)?)?, 0.0);
    let g2 = Tensor::cat(&[randn(1, e, 9, 5.0, DType::F64, &CPU)?, g.get(1)?.unsqueeze(0)?], 0)?;
    let c = x.apply_op2_no_bwd(&g2, &BalanceStatsBwd)?;
    assert_eq!(max_abs(&(&a - &c)?)?, 0.0, "the f row of the gradient must not matter");
    // and the closed form p * (g - <p, g>) / T row by row.
    let p = softmax(&x)?; // (T, E)
    let gp = g.get(1)?.unsqueeze(0)?; // (1, E)
    let dot = p.broadcast_mul(&gp)?.sum_keepdim(1)?; // (T, 1)
    let want = (p * gp.broadcast_sub(&dot)?)?.affine(1.0 / t as f64, 0.0)?;
    assert!(rel_err(&a, &want)? < 1e-13);
    Ok(())
}

fn strided_inputs_match_contiguous_on(dev: &Device) -> Result<()> {
    let wide = randn(50, 40, 4, 1.0, DType::F32, dev)?;
    let x = wide.narrow(1, 3, 33)?; // rows strided by 40
    let idx_wide = indices(50, 3, 33, 4, dev)?;
    let idx = idx_wide.narrow(1, 1, 2)?; // rows strided by 3
    let a = balance_stats(&x, &idx)?;
    let b = balance_stats(&x.contiguous()?, &idx.contiguous()?)?;
    assert_eq!(max_abs(&(&a - &b)?)?, 0.0);
    Ok(())
}

test_device!(
    strided_inputs_match_contiguous_on,
    strided_inputs_match_contiguous,
    strided_inputs_match_contiguous_cuda,
    strided_inputs_match_contiguous_metal
);

/// Same bits on every run and whatever the number of rayon threads (fixed chunks, fixed order).
#[test]
fn deterministic_across_thread_counts() -> Result<()> {
    let x = randn(4000, 64, 5, 3.0, DType::F32, &CPU)?;
    let idx = indices(4000, 2, 64, 5, &CPU)?;
    let bits = |s: &Tensor| -> Result<Vec<u32>> {
        Ok(s.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())
    };
    let a = bits(&balance_stats(&x, &idx)?)?;
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("pool");
    let b = pool.install(|| balance_stats(&x, &idx))?;
    assert_eq!(a, bits(&b)?);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().expect("pool");
    let c = pool.install(|| balance_stats(&x, &idx))?;
    assert_eq!(a, bits(&c)?);
    Ok(())
}

/// Central differences in f64 of a nonlinear function of the P row.
#[test]
fn finite_difference_gradcheck() -> Result<()> {
    for &(t, e, m) in &[(3usize, 37usize, 2usize), (1, 8, 1), (40, 5, 3)] {
        let x0 = randn(t, e, 40 + e as u32, 1.0, DType::F64, &CPU)?;
        let idx = indices(t, m, e, 41, &CPU)?;
        let r = randn(2, e, 42, 1.0, DType::F64, &CPU)?;
        let f = |x: &Tensor| -> Result<Tensor> { (balance_stats(x, &idx)? * &r)?.sum_all()?.sqr() };
        assert_grad_matches_fd(f, &x0, 1e-7, &format!("T={t} E={e}: "))?;
    }
    Ok(())
}

/// load_balance_fused(logits, indices) == load_balance(softmax(logits), indices), value and
/// gradient, and the loss is 1 for uniform routing.
fn fused_loss_matches_load_balance_on(dev: &Device) -> Result<()> {
    for (i, &(t, e, m)) in SHAPES.iter().enumerate() {
        for dtype in [DType::F64, DType::F32] {
            if !runs(dev, dtype) {
                continue;
            }
            let x0 = randn(t, e, 300 + i as u32, 2.0, dtype, dev)?;
            let idx = indices(t, m, e, 300 + i as u32, dev)?;
            let (va, vb) = (Var::from_tensor(&x0)?, Var::from_tensor(&x0)?);
            let a = load_balance_fused(va.as_tensor(), &idx)?;
            let b = load_balance(&softmax(vb.as_tensor())?, &idx)?;
            let tol = if dtype == DType::F32 { 2e-6 } else { 1e-13 };
            let (av, bv) = (
                a.to_device(&CPU)?.to_dtype(DType::F64)?.to_scalar::<f64>()?,
                b.to_device(&CPU)?.to_dtype(DType::F64)?.to_scalar::<f64>()?,
            );
            assert!((av - bv).abs() <= tol * bv.abs(), "loss {av} vs {bv} ({dtype:?} T={t} E={e} m={m})");
            let ga = a.backward()?.get(va.as_tensor()).expect("grad").clone();
            let gb = b.backward()?.get(vb.as_tensor()).expect("grad").clone();
            let d = rel_err(&ga, &gb)?;
            assert!(d < tol * 5.0, "loss gradient differs by {d} ({dtype:?} T={t} E={e} m={m})");
        }
    }
    // Uniform logits and perfectly balanced indices: E * sum(1/E * 1/E) = 1.
    let (t, e) = (64usize, 8usize);
    let idx = Tensor::from_vec((0..t as u32).map(|i| i % e as u32).collect::<Vec<_>>(), (t, 1), dev)?;
    let l = load_balance_fused(&Tensor::zeros((t, e), DType::F32, dev)?, &idx)?.to_scalar::<f32>()?;
    assert!((l - 1.0).abs() < 1e-6, "uniform loss {l}");
    Ok(())
}

test_device!(
    fused_loss_matches_load_balance_on,
    fused_loss_matches_load_balance,
    fused_loss_matches_load_balance_cuda,
    fused_loss_matches_load_balance_metal
);

#[test]
fn bad_arguments_are_errors() -> Result<()> {
    let x = randn(6, 8, 1, 1.0, DType::F32, &CPU)?;
    let mut v: Vec<u32> = indices(6, 2, 8, 1, &CPU)?.flatten_all()?.to_vec1()?;
    v[7] = 99; // token 3, slot 1
    let bad = Tensor::from_vec(v, (6, 2), &CPU)?;
    let err = balance_stats(&x, &bad).unwrap_err().to_string();
    assert!(err.contains("99") && err.contains("token 3") && err.contains("slot 1") && err.contains("E = 8"), "{err}");
    assert!(balance_stats_reference(&x, &bad).is_err());
    let ok = indices(6, 2, 8, 1, &CPU)?;
    assert!(balance_stats(&x.to_dtype(DType::BF16)?, &ok).is_err(), "bf16 logits");
    assert!(balance_stats(&x, &ok.to_dtype(DType::F32)?).is_err(), "float indices");
    assert!(balance_stats(&x, &indices(5, 2, 8, 1, &CPU)?).is_err(), "T mismatch");
    assert!(balance_stats(&x.flatten_all()?, &ok).is_err(), "1-D logits");
    assert!(balance_stats(&x.narrow(0, 0, 0)?, &ok.narrow(0, 0, 0)?).is_err(), "T = 0");
    let g = Tensor::zeros((3, 8), DType::F32, &CPU)?;
    assert!(x.apply_op2_no_bwd(&g, &BalanceStatsBwd).is_err(), "grad must be (2, E)");
    Ok(())
}
