//! A step's gradient from its micro-batches: per parameter, the micro-batches' gradients summed in
//! micro-batch order, and the squared L2 norm of that sum for clipping, in one pass (CPU, f32 or
//! f64, contiguous), the parameters in parallel. Elsewhere: Candle's `add` and `sqr().sum_all()`.
//!
//! The sums have the bits of the tensor form ((g0 + g1) + g2 ...); the clip scale is applied later
//! by the optimizer ([`crate::train::AdamW::step_scaled`]), not as a pass of its own.

use crate::ops::backend::cpu::{out_vec, Float};
use crate::ops::backend::simd::widest;
use crate::ops::float::{add_into, sum8_f64};
use anyhow::Result;
use candle_core::{DType, Storage, Tensor};
use rayon::prelude::*;

/// `parts[m][i]`: micro-batch m's gradient of parameter i (None: no gradient). Returns the summed
/// gradients and the global L2 norm of the sum.
pub fn sum_grads(parts: Vec<Vec<Option<Tensor>>>, n_params: usize) -> Result<(Vec<Option<Tensor>>, f64)> {
    let mut by_param: Vec<Vec<Tensor>> = vec![Vec::new(); n_params];
    for micro in parts {
        anyhow::ensure!(micro.len() == n_params, "{} gradients for {n_params} parameters", micro.len());
        for (acc, g) in by_param.iter_mut().zip(micro) {
            acc.extend(g);
        }
    }
    let sums: Vec<Result<Option<(Tensor, f64)>>> = by_param.into_par_iter().map(|gs| sum_one(&gs)).collect();
    let (mut grads, mut sq) = (Vec::with_capacity(n_params), 0.0);
    for s in sums {
        match s? {
            Some((g, q)) => {
                sq += q;
                grads.push(Some(g));
            }
            None => grads.push(None),
        }
    }
    Ok((grads, sq.sqrt()))
}

/// The clip factor for a gradient of global norm `norm` (None: no clipping; `max_norm` 0 = off).
pub fn clip_scale(norm: f64, max_norm: f64) -> Option<f64> {
    (max_norm > 0.0 && norm > max_norm).then(|| max_norm / (norm + 1e-6))
}

/// The sum of `gs` in order and its squared norm (f64), or None for no gradients.
fn sum_one(gs: &[Tensor]) -> Result<Option<(Tensor, f64)>> {
    let Some(first) = gs.first() else { return Ok(None) };
    let fast = gs.iter().all(|g| g.is_contiguous() && g.device().is_cpu() && g.shape() == first.shape())
        && matches!(first.dtype(), DType::F32 | DType::F64)
        && gs.iter().all(|g| g.dtype() == first.dtype());
    if !fast {
        let mut s = first.clone();
        for g in &gs[1..] {
            s = (s + g)?;
        }
        let q = s.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        return Ok(Some((s, q)));
    }
    macro_rules! run {
        ($t:ty) => {{
            let guards: Vec<_> = gs.iter().map(|g| g.storage_and_layout()).collect();
            let mut slices = Vec::with_capacity(gs.len());
            for (st, l) in &guards {
                let Storage::Cpu(cpu) = &**st else { anyhow::bail!("gradient not on the CPU") };
                let v = cpu.as_slice::<$t>()?;
                slices.push(&v[l.start_offset()..l.start_offset() + l.shape().elem_count()]);
            }
            let (sum, q) = sum_slices(&slices);
            drop(guards);
            if gs.len() == 1 {
                return Ok(Some((first.clone(), q)));
            }
            (Tensor::from_vec(sum, first.shape(), first.device())?, q)
        }};
    }
    let out = match first.dtype() {
        DType::F32 => run!(f32),
        _ => run!(f64),
    };
    Ok(Some(out))
}

/// Elements summed in slice order, and the f64 sum of their squares. With one slice only the sum
/// of squares (the result is the slice itself; the returned vector is empty).
fn sum_slices<T: Float>(xs: &[&[T]]) -> (Vec<T>, f64) {
    if xs.len() == 1 {
        return (Vec::new(), sum_sq(xs[0]));
    }
    if xs.len() == 2 {
        let mut out = out_vec::<T>(xs[0].len());
        let q = add_sum_sq(&mut out, xs[0], xs[1]);
        return (out, q);
    }
    let mut out = xs[0].to_vec();
    for x in &xs[1..] {
        add_into(&mut out, x);
    }
    let q = sum_sq(&out);
    (out, q)
}

widest! {
    /// The f64 sum of squares, in the fixed eight-lane order of `sum8_f64`.
    fn sum_sq<T: Float>(x: &[T]) -> f64 {
        sum8_f64(x, |v| v * v)
    }
}

widest! {
    /// out = a + b, element by element, and the f64 sum of squares of out in the order of
    /// [`sum_sq`] (so the bits of the two passes), in one pass: two micro-batches' gradients.
    fn add_sum_sq<T: Float>(out: &mut [T], a: &[T], b: &[T]) -> f64 {
        let mut acc = [0.0f64; 8];
        let n8 = out.len() / 8 * 8;
        for ((o, x), y) in out[..n8].chunks_exact_mut(8).zip(a.chunks_exact(8)).zip(b.chunks_exact(8)) {
            for l in 0..8 {
                let v = x[l] + y[l];
                o[l] = v;
                let d = v.to_f64();
                acc[l] += d * d;
            }
        }
        let mut s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        for i in n8..out.len() {
            let v = a[i] + b[i];
            out[i] = v;
            let d = v.to_f64();
            s += d * d;
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn sums_in_order_with_the_tensor_forms_bits_and_the_f64_norm() -> Result<()> {
        let dev = Device::Cpu;
        let mk =
            |k: f32| Tensor::from_vec((0..37).map(|i| ((i as f32) * k).sin() * 1e3).collect::<Vec<f32>>(), 37, &dev);
        let (a, b, c) = (mk(0.3)?, mk(1.7)?, mk(2.9)?);
        let parts = vec![vec![Some(a.clone()), None], vec![Some(b.clone()), None], vec![Some(c.clone()), None]];
        let (g, norm) = sum_grads(parts, 2)?;
        assert!(g[1].is_none(), "no gradient stays None");
        let want = ((&a + &b)? + &c)?;
        assert_eq!(g[0].as_ref().unwrap().to_vec1::<f32>()?, want.to_vec1::<f32>()?, "same bits as the tensor adds");
        let q: f64 = want.to_vec1::<f32>()?.iter().map(|&v| (v as f64) * (v as f64)).sum();
        assert!((norm - q.sqrt()).abs() <= 1e-12 * q.sqrt(), "norm {norm} vs {}", q.sqrt());
        // One micro-batch: the gradient itself, and its norm.
        let (g1, n1) = sum_grads(vec![vec![Some(a.clone()), None]], 2)?;
        assert_eq!(g1[0].as_ref().unwrap().to_vec1::<f32>()?, a.to_vec1::<f32>()?);
        let qa: f64 = a.to_vec1::<f32>()?.iter().map(|&v| (v as f64) * (v as f64)).sum();
        assert!((n1 - qa.sqrt()).abs() <= 1e-12 * qa.sqrt());
        // Two micro-batches take the one-pass sum: the bits of the add and of the separate norm pass.
        let (g2, n2) = sum_grads(vec![vec![Some(a.clone())], vec![Some(b.clone())]], 1)?;
        let ab = (&a + &b)?;
        assert_eq!(g2[0].as_ref().unwrap().to_vec1::<f32>()?, ab.to_vec1::<f32>()?);
        assert_eq!(n2.to_bits(), sum_sq(&ab.to_vec1::<f32>()?).sqrt().to_bits(), "one pass, same bits");
        // A non-contiguous gradient takes the tensor path and gives the same sum.
        let t = Tensor::from_vec((0..12).map(|i| i as f32).collect::<Vec<_>>(), (3, 4), &dev)?.t()?;
        let (gt, _) = sum_grads(vec![vec![Some(t.clone())], vec![Some(t.clone())]], 1)?;
        assert_eq!(gt[0].as_ref().unwrap().to_vec2::<f32>()?, (&t + &t)?.to_vec2::<f32>()?);
        assert_eq!(clip_scale(2.0, 1.0), Some(1.0 / (2.0 + 1e-6)));
        assert_eq!(clip_scale(0.5, 1.0), None);
        assert_eq!(clip_scale(9.0, 0.0), None, "max_norm 0 turns clipping off");
        Ok(())
    }
}
