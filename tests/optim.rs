//! AdamW: the fused in-place CPU step (`ops::adamw`) against the tensor-op path
//! (`AdamW::step_reference`, bit for bit) and against the formulas evaluated on the host in f64;
//! save / load round trips; in-place updates of `Var`s; the fallbacks (strided or aliased
//! gradients, bf16). `bench_step_52m` (ignored) times one step on 52 M f32 parameters.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use gumbel_moe::train::optim::{AdamW, AdamWConfig};
use std::collections::HashMap;

const CFG: AdamWConfig = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };

/// Name and shape of the test parameters: a rank-2 one larger than a rayon chunk (16384) with a
/// partial last chunk, a rank-3 one, rank-1 ones (no decay) and a router weight.
const SHAPES: &[(&str, &[usize])] = &[
    ("a.weight", &[70, 300]),
    ("b.weight", &[3, 4, 5]),
    ("c.bias", &[300]),
    ("d.router.weight", &[8, 16]),
    ("e.gain", &[7]),
    ("f.frozen", &[5, 5]),
];

/// Deterministic values in about [-scale, scale], with some exact zeros.
fn values(seed: u64, n: usize, scale: f64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            if i % 97 == 5 {
                0.0
            } else {
                ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
            }
        })
        .collect()
}

fn params(dtype: DType) -> Result<Vec<(String, Var)>> {
    let mut out = Vec::new();
    for (k, (name, shape)) in SHAPES.iter().enumerate() {
        let n = shape.iter().product();
        let t = Tensor::from_vec(values(100 + k as u64, n, 1.0), *shape, &Device::Cpu)?.to_dtype(dtype)?;
        out.push((name.to_string(), Var::from_tensor(&t)?));
    }
    Ok(out)
}

/// Same names and values, separate storage.
fn copy_params(ps: &[(String, Var)]) -> Result<Vec<(String, Var)>> {
    ps.iter().map(|(n, p)| Ok((n.clone(), Var::from_tensor(&p.as_tensor().copy()?)?))).collect()
}

/// Gradients of step `s`: `f.frozen` never has one, `e.gain` skips step 2, sizes vary by step.
fn grads(dtype: DType, s: usize) -> Result<Vec<Option<Tensor>>> {
    let mut out = Vec::new();
    for (k, (name, shape)) in SHAPES.iter().enumerate() {
        if *name == "f.frozen" || (*name == "e.gain" && s == 2) {
            out.push(None);
            continue;
        }
        let n = shape.iter().product();
        let scale = [1.0, 1e-3, 0.3, 5.0, 1e-6][s % 5];
        let g = Tensor::from_vec(values(1000 * s as u64 + k as u64, n, scale), *shape, &Device::Cpu)?;
        out.push(Some(g.to_dtype(dtype)?));
    }
    Ok(out)
}

fn optimizer(ps: Vec<(String, Var)>) -> Result<AdamW> {
    let mut opt = AdamW::new(ps, CFG)?;
    opt.set_lr_scale(".router.", 3.0);
    opt.set_decay_scale(".router.", 0.0);
    opt.set_decay_scale("b.", 0.5);
    Ok(opt)
}

fn lr(s: usize) -> f64 {
    [1e-2, 3e-3, 2e-2, 1e-3, 5e-3, 1e-2][s % 6]
}

fn bits(t: &Tensor) -> Result<Vec<u64>> {
    Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?.into_iter().map(f64::to_bits).collect())
}

fn host(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

/// The optimizer state as written by `save`.
fn saved(opt: &AdamW) -> Result<HashMap<String, Tensor>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("opt.safetensors");
    opt.save(&path)?;
    Ok(candle_core::safetensors::load(&path, &Device::Cpu)?)
}

fn assert_same_state(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> Result<()> {
    assert_eq!(a.len(), b.len());
    for (k, t) in a {
        let u = &b[k];
        assert_eq!(t.dtype(), u.dtype(), "{k}");
        assert_eq!(t.dims(), u.dims(), "{k}");
        assert_eq!(bits(t)?, bits(u)?, "{k}");
    }
    Ok(())
}

fn fused_matches_reference(dtype: DType) -> Result<()> {
    fused_matches_reference_scaled(dtype, false)
}

/// `scaled`: every other step with a clip factor (`step_scaled`), whose fused form must give the
/// bits of the tensor path's `g * scale` before the update.
fn fused_matches_reference_scaled(dtype: DType, scaled: bool) -> Result<()> {
    let pf = params(dtype)?;
    let pr = copy_params(&pf)?;
    let frozen = bits(pf[5].1.as_tensor())?;
    let (mut of, mut or) = (optimizer(pf.clone())?, optimizer(pr.clone())?);
    for s in 0..6 {
        let g = grads(dtype, s)?;
        if scaled {
            let scale = (s % 2 == 0).then_some(0.3719 + s as f64 / 7.0);
            of.step_scaled(&g, lr(s), scale)?;
            let gs: Vec<Option<Tensor>> = match scale {
                Some(k) => g.iter().map(|g| g.as_ref().map(|g| (g * k).unwrap())).collect(),
                None => g.clone(),
            };
            or.step_reference(&gs, lr(s))?;
        } else {
            of.step(&g, lr(s))?;
            or.step_reference(&g, lr(s))?;
        }
        for ((name, a), (_, b)) in pf.iter().zip(&pr) {
            assert_eq!(bits(a.as_tensor())?, bits(b.as_tensor())?, "{dtype:?} step {s}: {name}");
        }
    }
    assert_eq!(of.step_count(), 6);
    assert_eq!(bits(pf[5].1.as_tensor())?, frozen, "a parameter with no gradient moved");
    assert_same_state(&saved(&of)?, &saved(&or)?)
}

#[test]
fn scaled_step_matches_scaling_the_gradients_first() -> Result<()> {
    fused_matches_reference_scaled(DType::F32, true)?;
    fused_matches_reference_scaled(DType::F64, true)
}

#[test]
fn fused_matches_reference_f32() -> Result<()> {
    fused_matches_reference(DType::F32)
}

#[test]
fn fused_matches_reference_f64() -> Result<()> {
    fused_matches_reference(DType::F64)
}

/// The AdamW formulas on the host in f64, from the same (dtype-rounded) start and gradients.
fn matches_host(dtype: DType, tol: f64) -> Result<()> {
    let ps = params(dtype)?;
    let mut opt = optimizer(ps.clone())?;
    let mut theta: Vec<Vec<f64>> = ps.iter().map(|(_, p)| host(p.as_tensor())).collect::<Result<_>>()?;
    let mut m: Vec<Vec<f64>> = theta.iter().map(|t| vec![0.0; t.len()]).collect();
    let mut v = m.clone();
    for s in 0..6 {
        let g = grads(dtype, s)?;
        opt.step(&g, lr(s))?;
        let t = (s + 1) as i32;
        let (bc1, bc2) = (1.0 - CFG.beta1.powi(t), 1.0 - CFG.beta2.powi(t));
        for (k, (name, p)) in ps.iter().enumerate() {
            let Some(g) = &g[k] else { continue };
            let g = host(g)?;
            let lr = lr(s) * if name.contains(".router.") { 3.0 } else { 1.0 };
            let wd = CFG.weight_decay
                * if name.contains(".router.") {
                    0.0
                } else if name.starts_with("b.") {
                    0.5
                } else {
                    1.0
                };
            let decays = p.rank() >= 2 && wd > 0.0;
            for i in 0..g.len() {
                m[k][i] = CFG.beta1 * m[k][i] + (1.0 - CFG.beta1) * g[i];
                v[k][i] = CFG.beta2 * v[k][i] + (1.0 - CFG.beta2) * g[i] * g[i];
                if decays {
                    theta[k][i] *= 1.0 - lr * wd;
                }
                theta[k][i] -= lr * (m[k][i] / bc1) / ((v[k][i] / bc2).sqrt() + CFG.eps);
            }
        }
        for (k, (name, p)) in ps.iter().enumerate() {
            for (i, (a, b)) in host(p.as_tensor())?.iter().zip(&theta[k]).enumerate() {
                assert!((a - b).abs() <= tol, "{dtype:?} step {s} {name}[{i}]: {a} vs {b}");
            }
        }
    }
    let state = saved(&opt)?;
    for (k, (name, _)) in ps.iter().enumerate() {
        for (kind, want) in [("m", &m[k]), ("v", &v[k])] {
            let got = host(&state[&format!("{kind}.{name}")])?;
            for (i, (a, b)) in got.iter().zip(want.iter()).enumerate() {
                assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{kind}.{name}[{i}]: {a} vs {b}");
            }
        }
    }
    Ok(())
}

#[test]
fn fused_matches_host_f64() -> Result<()> {
    matches_host(DType::F64, 1e-12)
}

#[test]
fn fused_matches_host_f32() -> Result<()> {
    matches_host(DType::F32, 2e-6)
}

// Save after 3 fused steps, load into a fresh optimizer over equal parameters: same state, and the
// next steps agree bit for bit.
#[test]
fn save_load_round_trip() -> Result<()> {
    for dtype in [DType::F32, DType::F64] {
        let pa = params(dtype)?;
        let mut a = optimizer(pa.clone())?;
        for s in 0..3 {
            a.step(&grads(dtype, s)?, lr(s))?;
        }
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("opt.safetensors");
        a.save(&path)?;
        let pb = copy_params(&pa)?;
        let mut b = optimizer(pb.clone())?;
        b.load(&path)?;
        assert_eq!(b.step_count(), 3);
        assert_same_state(&saved(&a)?, &saved(&b)?)?;
        for s in 3..6 {
            let g = grads(dtype, s)?;
            a.step(&g, lr(s))?;
            b.step(&g, lr(s))?;
        }
        for ((name, x), (_, y)) in pa.iter().zip(&pb) {
            assert_eq!(bits(x.as_tensor())?, bits(y.as_tensor())?, "{dtype:?} {name}");
        }
        assert_same_state(&saved(&a)?, &saved(&b)?)?;
    }
    Ok(())
}

// A checkpoint of the tensor-op path (separate m / v tensors, the format of earlier versions)
// loads into the fused optimizer, which then continues exactly as the tensor path does.
#[test]
fn reference_checkpoint_resumes_fused() -> Result<()> {
    let pr = params(DType::F32)?;
    let mut r = optimizer(pr.clone())?;
    for s in 0..3 {
        r.step_reference(&grads(DType::F32, s)?, lr(s))?;
    }
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("opt.safetensors");
    r.save(&path)?;
    let pf = copy_params(&pr)?;
    let mut f = optimizer(pf.clone())?;
    f.load(&path)?;
    for s in 3..6 {
        let g = grads(DType::F32, s)?;
        r.step_reference(&g, lr(s))?;
        f.step(&g, lr(s))?;
    }
    for ((name, x), (_, y)) in pr.iter().zip(&pf) {
        assert_eq!(bits(x.as_tensor())?, bits(y.as_tensor())?, "{name}");
    }
    assert_same_state(&saved(&r)?, &saved(&f)?)
}

// Missing tensors and wrong shapes are refused.
#[test]
fn load_rejects_bad_state() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("opt.safetensors");
    let p = Var::from_tensor(&Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?)?;
    let mut opt = AdamW::new(vec![("w".into(), p)], CFG)?;
    let mut map = HashMap::new();
    map.insert("m.w".to_string(), Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?);
    map.insert("v.w".to_string(), Tensor::zeros((3, 2), DType::F32, &Device::Cpu)?);
    map.insert("step".to_string(), Tensor::new(&[4i64], &Device::Cpu)?);
    candle_core::safetensors::save(&map, &path)?;
    assert!(format!("{:#}", opt.load(&path).unwrap_err()).contains("has shape"));
    map.remove("v.w");
    candle_core::safetensors::save(&map, &path)?;
    assert!(format!("{:#}", opt.load(&path).unwrap_err()).contains("missing tensor v.w"));
    Ok(())
}

// The fused step writes into the variable's own storage: every handle on the Var (the model's
// clone) sees the new value, tensors computed before the step keep theirs, the gradient used by the
// step is untouched, and the next forward / backward uses the new value.
#[test]
fn var_is_updated_in_place() -> Result<()> {
    let p = Var::from_vec(values(7, 40_000, 1.0), (200, 200), &Device::Cpu)?.to_dtype(DType::F32)?;
    let p = Var::from_tensor(&p)?;
    let model_handle = p.clone();
    let before = (p.as_tensor() * 1.0)?;
    let before_bits = bits(&before)?;
    let mut opt = AdamW::new(vec![("w".into(), p.clone())], CFG)?;
    let loss = p.as_tensor().sqr()?.sum_all()?;
    let g = loss.backward()?.remove(p.as_tensor()).expect("gradient");
    let g_bits = bits(&g)?;
    opt.step(&[Some(g.clone())], 1e-2)?;
    assert_eq!(bits(&g)?, g_bits, "the gradient changed");
    assert_eq!(bits(&before)?, before_bits, "a tensor computed before the step changed");
    let after = host(model_handle.as_tensor())?;
    assert_ne!(after, host(&before)?);
    let loss = model_handle.as_tensor().sqr()?.sum_all()?;
    let g2 = loss.backward()?.remove(p.as_tensor()).expect("gradient");
    for (a, b) in host(&g2)?.iter().zip(&after) {
        assert_eq!(*a, 2.0 * b);
    }
    Ok(())
}

// Fallbacks: a strided gradient (copied, then fused), a gradient that shares the parameter's
// storage (tensor path; no deadlock), bf16 (tensor path): all equal the reference.
#[test]
fn fallbacks_match_reference() -> Result<()> {
    let dev = &Device::Cpu;
    for case in ["strided", "aliased", "bf16"] {
        let dtype = if case == "bf16" { DType::BF16 } else { DType::F32 };
        let t = Tensor::from_vec(values(3, 300 * 70, 1.0), (300, 70), dev)?.t()?.to_dtype(dtype)?.contiguous()?;
        let (pf, pr) = (Var::from_tensor(&t)?, Var::from_tensor(&t.copy()?)?);
        let mut of = AdamW::new(vec![("w".into(), pf.clone())], CFG)?;
        let mut or = AdamW::new(vec![("w".into(), pr.clone())], CFG)?;
        for s in 0..3 {
            let g = Tensor::from_vec(values(50 + s, 300 * 70, 0.1), (300, 70), dev)?.to_dtype(dtype)?.t()?;
            let (gf, gr) = match case {
                "aliased" => (pf.as_tensor().clone(), pr.as_tensor().copy()?),
                _ => (g.clone(), g),
            };
            if case == "strided" {
                assert!(!gf.is_contiguous());
            }
            of.step(&[Some(gf)], lr(s as usize))?;
            or.step_reference(&[Some(gr)], lr(s as usize))?;
            assert_eq!(bits(pf.as_tensor())?, bits(pr.as_tensor())?, "{case} step {s}");
        }
        assert_same_state(&saved(&of)?, &saved(&or)?)?;
    }
    Ok(())
}

// One step on 400 (128, 1024) f32 parameters (52 M), tensor path vs fused path.
// RAYON_NUM_THREADS=1 cargo test --release --test optim bench_step_52m -- --ignored --nocapture
#[test]
#[ignore]
fn bench_step_52m() -> Result<()> {
    let dev = &Device::Cpu;
    let mk = || -> Result<Vec<(String, Var)>> {
        (0..400)
            .map(|i| Ok((format!("p{i:03}.weight"), Var::from_tensor(&Tensor::ones((128, 1024), DType::F32, dev)?)?)))
            .collect()
    };
    let g: Vec<Option<Tensor>> =
        (0..400).map(|i| Ok(Some(Tensor::full(1e-3 * (i + 1) as f32, (128, 1024), dev)?))).collect::<Result<_>>()?;
    let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        f()?; // warm-up (first touch of the moments)
        let mut ts = Vec::new();
        for _ in 0..5 {
            let t0 = std::time::Instant::now();
            f()?;
            ts.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        ts.sort_by(f64::total_cmp);
        Ok(ts[2])
    };
    let mut r = AdamW::new(mk()?, CFG)?;
    let t_ref = time(&mut || r.step_reference(&g, 1e-3))?;
    drop(r);
    let mut f = AdamW::new(mk()?, CFG)?;
    let t_fused = time(&mut || f.step(&g, 1e-3))?;
    println!(
        "AdamW step, 52.4 M f32 parameters, {} rayon threads: tensor path {t_ref:.1} ms, fused {t_fused:.1} ms (median of 5)",
        rayon::current_num_threads()
    );
    Ok(())
}
