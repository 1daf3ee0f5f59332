//! The fused layer ops (`ops::{linear, norm, gelu, swiglu, causal_softmax, causal_attention, expert_mlp}`) against their plain-tensor
//! twins, forward and backward, on odd shapes in f32 and f64, and against f64 finite differences.
//! The twin comparisons run on every device (`test_device!`); f64 cases and finite differences run
//! on the CPU only.

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use common::fd::assert_grad_matches_fd;
use common::host::{flat, Rng};
use gumbel_moe::ops::{
    causal_softmax, causal_softmax_reference, gelu, gelu_reference, norm, norm_reference, swiglu, swiglu_reference,
    NormOp,
};

const CPU: Device = Device::Cpu;

/// N(0, std) values drawn on the host, as `dtype` on `dev`.
fn randn(rng: &mut Rng, shape: &[usize], std: f64, dtype: DType, dev: &Device) -> Result<Tensor> {
    let n = shape.iter().product();
    Tensor::from_vec(rng.normals(n, std), shape, &CPU)?.to_dtype(dtype)?.to_device(dev)
}

/// Whether `dev` runs `dtype` cases: f64 only on the CPU, as the GPU kernels are f32 only (and
/// Metal has no f64 at all).
fn runs(dev: &Device, dtype: DType) -> bool {
    dev.is_cpu() || dtype != DType::F64
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_device(&CPU)?.to_dtype(DType::F64)?.to_scalar::<f64>()
}

fn max_abs(a: &Tensor) -> Result<f64> {
    a.abs()?.flatten_all()?.max(0)?.to_device(&CPU)?.to_dtype(DType::F64)?.to_scalar::<f64>()
}

/// Forward values and the gradients of sum(y * w) for each input, of `f` at `inputs`.
fn value_and_grads(
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    w: &Tensor,
) -> Result<(Tensor, Vec<Tensor>)> {
    let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts)?;
    let g = (&y * w)?.sum_all()?.backward()?;
    let grads = ts.iter().map(|t| g.get(t).expect("every input gets a gradient").clone()).collect();
    Ok((y, grads))
}

/// Fused and twin agree to `tol` (relative to the largest magnitude) forward and backward.
fn check_twin(
    name: &str,
    fused: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    twin: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    out_shape: &[usize],
    tol: f64,
) -> Result<()> {
    let mut rng = Rng(99);
    let w = randn(&mut rng, out_shape, 1.0, inputs[0].dtype(), inputs[0].device())?;
    let (yf, gf) = value_and_grads(fused, inputs, &w)?;
    let (yt, gt) = value_and_grads(twin, inputs, &w)?;
    let d = max_abs_diff(&yf, &yt)?;
    assert!(d <= tol * (1.0 + max_abs(&yt)?), "{name} forward: max diff {d:e}");
    for (i, (a, b)) in gf.iter().zip(&gt).enumerate() {
        assert_eq!(a.dims(), b.dims(), "{name} grad {i} shape");
        let d = max_abs_diff(a, b)?;
        assert!(d <= tol * (1.0 + max_abs(b)?), "{name} grad of input {i}: max diff {d:e}");
    }
    Ok(())
}

fn norm_matches_twin_on_odd_shapes_on(dev: &Device) -> Result<()> {
    let mut rng = Rng(1);
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
        if !runs(dev, dtype) {
            continue;
        }
        for shape in [vec![1usize, 1], vec![3, 7], vec![2, 37, 19], vec![5, 129], vec![70, 33]] {
            let c = *shape.last().unwrap();
            let x = (randn(&mut rng, &shape, 2.0, dtype, dev)? + 0.7)?;
            let g = (randn(&mut rng, &[c], 0.5, dtype, dev)? + 1.0)?;
            let b = randn(&mut rng, &[c], 0.5, dtype, dev)?;
            for rms in [false, true] {
                let op = NormOp { eps: 1e-5, rms };
                let fused = |t: &[Tensor]| norm(&t[0], &t[1], t.get(2), op);
                let twin = |t: &[Tensor]| norm_reference(&t[0], &t[1], t.get(2), op);
                let what = format!("norm rms={rms} {dtype:?} {shape:?}");
                check_twin(&what, &fused, &twin, &[x.clone(), g.clone()], &shape, tol)?;
                if !rms {
                    check_twin(&what, &fused, &twin, &[x.clone(), g.clone(), b.clone()], &shape, tol)?;
                }
            }
        }
    }
    Ok(())
}

test_device!(
    norm_matches_twin_on_odd_shapes_on,
    norm_matches_twin_on_odd_shapes,
    norm_matches_twin_on_odd_shapes_cuda,
    norm_matches_twin_on_odd_shapes_metal
);

#[test]
fn norm_gradients_match_finite_differences() -> Result<()> {
    let mut rng = Rng(2);
    let (t, c) = (5, 6);
    let x = randn(&mut rng, &[t, c], 1.5, DType::F64, &CPU)?;
    let g0 = (randn(&mut rng, &[c], 0.3, DType::F64, &CPU)? + 1.0)?;
    let b0 = randn(&mut rng, &[c], 0.3, DType::F64, &CPU)?;
    let w = randn(&mut rng, &[t, c], 1.0, DType::F64, &CPU)?;
    for rms in [false, true] {
        let op = NormOp { eps: 1e-5, rms };
        let loss = |x: &Tensor| (norm(x, &g0, Some(&b0).filter(|_| !rms), op)? * &w)?.sum_all();
        assert_grad_matches_fd(loss, &x, 1e-6, &format!("norm rms={rms} "))?;
        // The gain and the bias, as (1, C) points.
        let lg = |g: &Tensor| (norm(&x, &g.flatten_all()?, Some(&b0).filter(|_| !rms), op)? * &w)?.sum_all();
        assert_grad_matches_fd(lg, &g0.reshape((1, c))?, 1e-6, &format!("norm gamma rms={rms} "))?;
        if !rms {
            let lb = |b: &Tensor| (norm(&x, &g0, Some(&b.flatten_all()?), op)? * &w)?.sum_all();
            assert_grad_matches_fd(lb, &b0.reshape((1, c))?, 1e-6, "norm beta ")?;
        }
    }
    Ok(())
}

fn gelu_matches_twin_and_finite_differences_on(dev: &Device) -> Result<()> {
    let mut rng = Rng(4);
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 5e-7)] {
        if !runs(dev, dtype) {
            continue;
        }
        for shape in [vec![1usize], vec![3, 7], vec![2, 33, 129]] {
            // Wide inputs reach both tails (Phi near 0 and near 1).
            let x = randn(&mut rng, &shape, 4.0, dtype, dev)?;
            let fused = |t: &[Tensor]| gelu(&t[0]);
            let twin = |t: &[Tensor]| gelu_reference(&t[0]);
            check_twin(&format!("gelu {dtype:?} {shape:?}"), &fused, &twin, &[x], &shape, tol)?;
        }
    }
    // f64 and finite differences: CPU only (see `runs`).
    if dev.is_cpu() {
        let x = randn(&mut rng, &[6, 5], 2.0, DType::F64, dev)?;
        let w = randn(&mut rng, &[6, 5], 1.0, DType::F64, dev)?;
        assert_grad_matches_fd(|x| (gelu(x)? * &w)?.sum_all(), &x, 1e-6, "gelu ")?;
    }
    // The f32 kernel (polynomial erf and exp) against f64 math, element by element.
    let xs: Vec<f64> = (0..4001).map(|i| -10.0 + i as f64 * 0.005).collect();
    let y = gelu(&Tensor::new(xs.iter().map(|&v| v as f32).collect::<Vec<f32>>(), dev)?)?.to_vec1::<f32>()?;
    for (&x, &got) in xs.iter().zip(&y) {
        let x32 = x as f32 as f64;
        let want = x32 * 0.5 * (1.0 + candle_core::cpu::erf::erf_f64(x32 / 2f64.sqrt()));
        assert!((got as f64 - want).abs() <= 2e-7 * (1.0 + want.abs()), "gelu({x32}) = {got}, want {want}");
    }
    Ok(())
}

test_device!(
    gelu_matches_twin_and_finite_differences_on,
    gelu_matches_twin_and_finite_differences,
    gelu_matches_twin_and_finite_differences_cuda,
    gelu_matches_twin_and_finite_differences_metal
);

fn swiglu_matches_twin_and_finite_differences_on(dev: &Device) -> Result<()> {
    let mut rng = Rng(14);
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 5e-7)] {
        if !runs(dev, dtype) {
            continue;
        }
        for shape in [vec![1usize], vec![3, 7], vec![2, 33, 129]] {
            // Wide gates reach both tails of the sigmoid.
            let g = randn(&mut rng, &shape, 6.0, dtype, dev)?;
            let u = randn(&mut rng, &shape, 1.0, dtype, dev)?;
            let fused = |t: &[Tensor]| swiglu(&t[0], &t[1]);
            let twin = |t: &[Tensor]| swiglu_reference(&t[0], &t[1]);
            check_twin(&format!("swiglu {dtype:?} {shape:?}"), &fused, &twin, &[g, u], &shape, tol)?;
        }
    }
    if dev.is_cpu() {
        let g = randn(&mut rng, &[6, 5], 2.0, DType::F64, dev)?;
        let u = randn(&mut rng, &[6, 5], 1.0, DType::F64, dev)?;
        let w = randn(&mut rng, &[6, 5], 1.0, DType::F64, dev)?;
        assert_grad_matches_fd(|g| (swiglu(g, &u)? * &w)?.sum_all(), &g, 1e-6, "swiglu gate ")?;
        assert_grad_matches_fd(|u| (swiglu(&g, u)? * &w)?.sum_all(), &u, 1e-6, "swiglu up ")?;
        // The f32 kernel (polynomial exp) against f64 math, element by element, far into both tails.
        let gs: Vec<f64> = (0..4001).map(|i| -100.0 + i as f64 * 0.05).collect();
        let gt = Tensor::new(gs.iter().map(|&v| v as f32).collect::<Vec<f32>>(), dev)?;
        let y = swiglu(&gt, &gt.ones_like()?)?.to_vec1::<f32>()?;
        for (&g, &got) in gs.iter().zip(&y) {
            let g32 = g as f32 as f64;
            let want = g32 / (1.0 + (-g32).exp());
            // Below g = -87.3 the polynomial exp saturates (see `exp_f32`): |silu| stays under 1e-35
            // instead of going subnormal.
            assert!((got as f64 - want).abs() <= 3e-7 * want.abs() + 1e-35, "silu({g32}) = {got}, want {want}");
        }
    }
    Ok(())
}

test_device!(
    swiglu_matches_twin_and_finite_differences_on,
    swiglu_matches_twin_and_finite_differences,
    swiglu_matches_twin_and_finite_differences_cuda,
    swiglu_matches_twin_and_finite_differences_metal
);

fn causal_softmax_matches_twin_and_finite_differences_on(dev: &Device) -> Result<()> {
    let mut rng = Rng(5);
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-6)] {
        if !runs(dev, dtype) {
            continue;
        }
        for shape in [vec![1usize, 1], vec![3, 7, 7], vec![2, 3, 33, 33]] {
            let s = randn(&mut rng, &shape, 3.0, dtype, dev)?;
            let fused = |t: &[Tensor]| causal_softmax(&t[0], 0.37);
            let twin = |t: &[Tensor]| causal_softmax_reference(&t[0], 0.37);
            check_twin(&format!("causal_softmax {dtype:?} {shape:?}"), &fused, &twin, &[s], &shape, tol)?;
        }
    }
    // f64 and finite differences: CPU only (see `runs`).
    if dev.is_cpu() {
        // Large scores (the row max must be subtracted), and exact zeros above the diagonal.
        let s = (randn(&mut rng, &[9, 9], 1.0, DType::F64, dev)? + 500.0)?;
        let p = causal_softmax(&s, 1.0)?.to_vec2::<f64>()?;
        for (i, row) in p.iter().enumerate() {
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12, "row {i} sums to {}", row.iter().sum::<f64>());
            assert!(row[i + 1..].iter().all(|&v| v == 0.0), "row {i} attends to the future: {row:?}");
        }
        let s = randn(&mut rng, &[6, 6], 2.0, DType::F64, dev)?;
        let w = randn(&mut rng, &[6, 6], 1.0, DType::F64, dev)?;
        assert_grad_matches_fd(|s| (causal_softmax(s, 0.6)? * &w)?.sum_all(), &s, 1e-6, "causal_softmax ")?;
    }
    assert!(causal_softmax(&randn(&mut rng, &[2, 3], 1.0, DType::F32, dev)?, 1.0).is_err(), "non-square scores");
    Ok(())
}

test_device!(
    causal_softmax_matches_twin_and_finite_differences_on,
    causal_softmax_matches_twin_and_finite_differences,
    causal_softmax_matches_twin_and_finite_differences_cuda,
    causal_softmax_matches_twin_and_finite_differences_metal
);

fn causal_attention_matches_twin_on_odd_shapes_on(dev: &Device) -> Result<()> {
    use gumbel_moe::ops::{causal_attention, causal_attention_reference, RopeTables};
    use std::sync::Arc;
    let mut rng = Rng(5);
    for (dtype, tol) in [(DType::F64, 1e-11), (DType::F32, 2e-5)] {
        if !runs(dev, dtype) {
            continue;
        }
        for (b, t, nh, hs) in
            [(1usize, 1usize, 1usize, 2usize), (2, 7, 3, 4), (3, 13, 2, 6), (1, 33, 4, 8), (2, 150, 2, 8)]
        {
            let c = nh * hs;
            let qkv = randn(&mut rng, &[b, t, 3 * c], 1.5, dtype, dev)?;
            for rope in [None, Some(Arc::new(RopeTables::new(hs, t + 3, 10000.0)))] {
                let fused = |x: &[Tensor]| causal_attention(&x[0], nh, rope.as_ref());
                let twin = |x: &[Tensor]| causal_attention_reference(&x[0], nh, rope.as_ref());
                let what = format!("attention {dtype:?} b={b} t={t} nh={nh} hs={hs} rope={}", rope.is_some());
                check_twin(&what, &fused, &twin, std::slice::from_ref(&qkv), &[b, t, c], tol)?;
            }
        }
    }
    Ok(())
}

test_device!(
    causal_attention_matches_twin_on_odd_shapes_on,
    causal_attention_matches_twin_on_odd_shapes,
    causal_attention_matches_twin_on_odd_shapes_cuda,
    causal_attention_matches_twin_on_odd_shapes_metal
);

fn causal_attention_gradient_matches_finite_differences_and_is_causal_on(dev: &Device) -> Result<()> {
    use gumbel_moe::ops::{causal_attention, RopeTables};
    use std::sync::Arc;
    let mut rng = Rng(6);
    let (t, nh, hs) = (5, 2, 4);
    let c = nh * hs;
    let rope = Arc::new(RopeTables::new(hs, t, 10000.0));
    // f64 and finite differences on the CPU (see `runs`); other devices check causality in f32.
    let dtype = if dev.is_cpu() { DType::F64 } else { DType::F32 };
    let x = randn(&mut rng, &[t, 3 * c], 1.0, dtype, dev)?;
    let w = randn(&mut rng, &[1, t, c], 1.0, dtype, dev)?;
    if dev.is_cpu() {
        let f = |x: &Tensor| (causal_attention(&x.unsqueeze(0)?, nh, Some(&rope))? * &w)?.sum_all();
        assert_grad_matches_fd(f, &x, 1e-6, "attention ")?;
    }
    // Causality: changing the last position's q, k, v leaves every earlier output unchanged.
    let y0 = causal_attention(&x.unsqueeze(0)?, nh, Some(&rope))?;
    let bump = Tensor::cat(&[Tensor::zeros((t - 1, 3 * c), dtype, dev)?, Tensor::ones((1, 3 * c), dtype, dev)?], 0)?;
    let y1 = causal_attention(&(&x + bump)?.unsqueeze(0)?, nh, Some(&rope))?;
    let early = max_abs_diff(&y0.narrow(1, 0, t - 1)?, &y1.narrow(1, 0, t - 1)?)?;
    assert_eq!(early, 0.0, "earlier positions saw the last one");
    assert!(max_abs_diff(&y0.narrow(1, t - 1, 1)?, &y1.narrow(1, t - 1, 1)?)? > 1e-3);
    Ok(())
}

test_device!(
    causal_attention_gradient_matches_finite_differences_and_is_causal_on,
    causal_attention_gradient_matches_finite_differences_and_is_causal,
    causal_attention_gradient_matches_finite_differences_and_is_causal_cuda,
    causal_attention_gradient_matches_finite_differences_and_is_causal_metal
);

/// The graph form, the training form (weights read in place, gradients out of band) and the
/// plain-tensor twin: the same outputs and gradients (the two fused forms bit for bit), and no
/// gradient at all for the experts without rows.
fn expert_mlp_matches_twin_including_empty_experts_on(dev: &Device) -> Result<()> {
    use gumbel_moe::ops::{expert_mlp, expert_mlp_reference, expert_mlp_train, ExpertParams};
    let mut rng = Rng(7);
    for (dtype, tol) in [(DType::F64, 1e-11), (DType::F32, 3e-5)] {
        if !runs(dev, dtype) {
            continue;
        }
        for (bias, gated) in [(true, false), (false, false), (true, true), (false, true)] {
            let (c, h) = (5, 7);
            // Experts 1 and 3 get no rows. The kernels keep the hidden activations of experts 2
            // and 5 transposed (16-256 rows; expert 5's bias sums in several blocks), those of
            // experts 0, 4 and 6 in rows: both layouts run.
            let offsets = [0u32, 4, 4, 24, 24, 25, 175, 475];
            let e = offsets.len() - 1;
            let n = *offsets.last().unwrap() as usize;
            let per = (if bias { 4 } else { 2 }) + (if gated { 1 + bias as usize } else { 0 });
            let mut inputs = vec![randn(&mut rng, &[n, c], 1.0, dtype, dev)?];
            for _ in 0..e {
                // In the order of `p` below: w1, [b1], w2, [b2], [wg, [bg]].
                inputs.push(randn(&mut rng, &[h, c], 0.5, dtype, dev)?);
                if bias {
                    inputs.push(randn(&mut rng, &[h], 0.5, dtype, dev)?);
                }
                inputs.push(randn(&mut rng, &[c, h], 0.5, dtype, dev)?);
                if bias {
                    inputs.push(randn(&mut rng, &[c], 0.5, dtype, dev)?);
                }
                if gated {
                    inputs.push(randn(&mut rng, &[h, c], 1.0, dtype, dev)?);
                    if bias {
                        inputs.push(randn(&mut rng, &[h], 0.5, dtype, dev)?);
                    }
                }
            }
            let what = format!("expert_mlp {dtype:?} bias={bias} gated={gated}");
            let w = randn(&mut Rng(99), &[n, c], 1.0, dtype, dev)?;
            let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            // Form 0: graph, 1: training form, 2: twin -> (y, each input's gradient).
            let run = |form: usize| -> Result<(Tensor, Vec<Option<Tensor>>)> {
                let ep: Vec<ExpertParams> = (0..e)
                    .map(|i| {
                        let mut p = ts[1 + per * i..1 + per * (i + 1)].iter();
                        let mut next = |present: bool| if present { p.next() } else { None };
                        let (w1, b1, w2, b2) = (next(true).unwrap(), next(bias), next(true).unwrap(), next(bias));
                        let (wg, bg) = (next(gated), next(gated && bias));
                        ExpertParams { w1, b1, w2, b2, wg, bg }
                    })
                    .collect();
                let (y, out) = match form {
                    0 => (expert_mlp(&ts[0], &ep, &offsets)?, None),
                    1 => expert_mlp_train(&ts[0], &ep, &offsets)?,
                    _ => (expert_mlp_reference(&ts[0], &ep, &offsets)?, None),
                };
                let gs = (&y * &w)?.sum_all()?.backward()?;
                let side: std::collections::HashMap<_, _> =
                    out.map(|o| o.grads()).unwrap_or_default().into_iter().collect();
                let grads = ts.iter().map(|t| gs.get(t).cloned().or_else(|| side.get(&t.id()).cloned())).collect();
                Ok((y, grads))
            };
            let (yf, gf) = run(0)?;
            let (yi, gi) = run(1)?;
            let (yt, gt) = run(2)?;
            let d = max_abs_diff(&yf, &yt)?;
            assert!(d <= tol * (1.0 + max_abs(&yt)?), "{what} forward: {d:e}");
            if dev.is_cpu() {
                assert_eq!(flat(&yi), flat(&yf), "{what}: the training form's forward has the graph form's bits");
            }
            for (i, t) in ts.iter().enumerate() {
                let expert = (i > 0).then(|| (i - 1) / per);
                let empty = expert.is_some_and(|x| offsets[x + 1] == offsets[x]);
                for (form, g) in [("graph", &gf[i]), ("training", &gi[i]), ("twin", &gt[i])] {
                    assert_eq!(
                        g.is_none(),
                        empty,
                        "{what} input {i} ({form} form): a gradient exactly when it has rows"
                    );
                }
                let (Some(got), Some(want), Some(inplace)) = (&gf[i], &gt[i], &gi[i]) else { continue };
                let d = max_abs_diff(got, want)?;
                assert!(d <= tol * (1.0 + max_abs(want)?), "{what} grad of input {i}: {d:e}");
                if dev.is_cpu() {
                    assert_eq!(flat(inplace), flat(got), "{what} grad of input {i}: training form vs graph form");
                    assert_eq!(inplace.dims(), t.dims());
                }
            }
        }
    }
    Ok(())
}

test_device!(
    expert_mlp_matches_twin_including_empty_experts_on,
    expert_mlp_matches_twin_including_empty_experts,
    expert_mlp_matches_twin_including_empty_experts_cuda,
    expert_mlp_matches_twin_including_empty_experts_metal
);

#[test]
fn expert_mlp_gradient_matches_finite_differences() -> Result<()> {
    use gumbel_moe::ops::{expert_mlp, expert_mlp_train, ExpertParams};
    let mut rng = Rng(8);
    let (c, h) = (3, 4);
    let offsets = [0u32, 2, 2, 5];
    let x = randn(&mut rng, &[5, c], 1.0, DType::F64, &CPU)?;
    let mut draw = |shape: &[usize]| -> Result<Vec<Tensor>> {
        (0..3).map(|_| randn(&mut rng, shape, 0.7, DType::F64, &CPU)).collect()
    };
    let (w1s, b1s, w2s, b2s) = (draw(&[h, c])?, draw(&[h])?, draw(&[c, h])?, draw(&[c])?);
    let (wgs, bgs) = (draw(&[h, c])?, draw(&[h])?);
    let w = randn(&mut rng, &[5, c], 1.0, DType::F64, &CPU)?;
    for (gated, train) in [(false, false), (false, true), (true, false), (true, true)] {
        let what = format!("expert_mlp gated={gated} training form={train}");
        // Expert 2's W1 and Wg may be replaced (the finite differences perturb them).
        let loss = |x: &Tensor, w1_2: Option<&Tensor>, wg_2: Option<&Tensor>| -> Result<Tensor> {
            let ep: Vec<ExpertParams> = (0..3)
                .map(|i| ExpertParams {
                    w1: if i == 2 { w1_2.unwrap_or(&w1s[2]) } else { &w1s[i] },
                    b1: Some(&b1s[i]),
                    w2: &w2s[i],
                    b2: Some(&b2s[i]),
                    wg: gated.then(|| if i == 2 { wg_2.unwrap_or(&wgs[2]) } else { &wgs[i] }),
                    bg: gated.then_some(&bgs[i]),
                })
                .collect();
            let y = if train { expert_mlp_train(x, &ep, &offsets)?.0 } else { expert_mlp(x, &ep, &offsets)? };
            (y * &w)?.sum_all()
        };
        assert_grad_matches_fd(|x| loss(x, None, None), &x, 1e-6, &format!("{what} x "))?;
        if !train {
            // The training form's parameter gradients go out of band (checked against this form above).
            assert_grad_matches_fd(|w1| loss(&x, Some(w1), None), &w1s[2], 1e-6, &format!("{what} W1 of expert 2 "))?;
            if gated {
                assert_grad_matches_fd(
                    |wg| loss(&x, None, Some(wg)),
                    &wgs[2],
                    1e-6,
                    &format!("{what} Wg of expert 2 "),
                )?;
            }
        }
    }
    Ok(())
}

fn linear_matches_twin_and_finite_differences_on(dev: &Device) -> Result<()> {
    use gumbel_moe::ops::{linear, linear_reference};
    let mut rng = Rng(9);
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
        if !runs(dev, dtype) {
            continue;
        }
        for (lead, inp, out) in
            [(vec![1usize], 1usize, 1usize), (vec![3], 7, 5), (vec![2, 9], 33, 65), (vec![130], 4, 3)]
        {
            let mut xs = lead.clone();
            xs.push(inp);
            let mut ys = lead.clone();
            ys.push(out);
            let x = randn(&mut rng, &xs, 1.0, dtype, dev)?;
            let w = randn(&mut rng, &[out, inp], 0.5, dtype, dev)?;
            let b = randn(&mut rng, &[out], 0.5, dtype, dev)?;
            let what = format!("linear {dtype:?} {xs:?} -> {out}");
            let fused = |t: &[Tensor]| linear(&t[0], &t[1], t.get(2));
            let twin = |t: &[Tensor]| linear_reference(&t[0], &t[1], t.get(2));
            check_twin(&what, &fused, &twin, &[x.clone(), w.clone(), b], &ys, tol)?;
            check_twin(&what, &fused, &twin, &[x, w], &ys, tol)?;
        }
    }
    // f64 and finite differences: CPU only (see `runs`).
    if dev.is_cpu() {
        let x = randn(&mut rng, &[4, 3], 1.0, DType::F64, dev)?;
        let w0 = randn(&mut rng, &[2, 3], 1.0, DType::F64, dev)?;
        let b0 = randn(&mut rng, &[2], 1.0, DType::F64, dev)?;
        let m = randn(&mut rng, &[4, 2], 1.0, DType::F64, dev)?;
        assert_grad_matches_fd(|x| (linear(x, &w0, Some(&b0))? * &m)?.sum_all(), &x, 1e-6, "linear x ")?;
        assert_grad_matches_fd(|w| (linear(&x, w, Some(&b0))? * &m)?.sum_all(), &w0, 1e-6, "linear W ")?;
        // The bias gradient (a row sum of dy), as a (1, out) point.
        let lb = |b: &Tensor| (linear(&x, &w0, Some(&b.flatten_all()?))? * &m)?.sum_all();
        assert_grad_matches_fd(lb, &b0.reshape((1, 2))?, 1e-6, "linear b ")?;
    }
    Ok(())
}

test_device!(
    linear_matches_twin_and_finite_differences_on,
    linear_matches_twin_and_finite_differences,
    linear_matches_twin_and_finite_differences_cuda,
    linear_matches_twin_and_finite_differences_metal
);
