//! A step's gradient from its micro-batches: per parameter, the micro-batches' gradients summed in
//! a fixed pairwise tree ([`tree_split`]), and the squared L2 norm of that sum for clipping, in one
//! pass (CPU, f32 or f64, contiguous), the parameters in parallel. Elsewhere: Candle's `add` and
//! `sqr().sum_all()`.
//!
//! The tree is what makes data parallelism exact: when ranks each sum a block of 2^k consecutive
//! micro-batches and then the blocks' sums are summed by the same rule, every addition is the one
//! a single process makes ([`crate::train::data_parallel`]). With two micro-batches the tree is
//! `g0 + g1`; with four, `(g0 + g1) + (g2 + g3)`. The clip scale is applied later by the optimizer
//! ([`crate::train::AdamW::step_scaled`]), not as a pass of its own.

use crate::ops::backend::cpu::{out_vec, Float};
use crate::ops::backend::simd::widest;
use crate::ops::float::{add_into, sum8_f64};
use anyhow::Result;
use candle_core::{DType, Storage, Tensor};
use rayon::prelude::*;

/// `parts[m][i]`: micro-batch m's gradient of parameter i (None: no gradient). Returns the summed
/// gradients and the global L2 norm of the sum.
pub fn sum_grads(parts: Vec<Vec<Option<Tensor>>>, n_params: usize) -> Result<(Vec<Option<Tensor>>, f64)> {
    sum_grads_with(parts, n_params, true)
}

/// [`sum_grads`]; without `norm` the norm is not computed (0 is returned): a rank's partial sum.
pub fn sum_grads_with(
    parts: Vec<Vec<Option<Tensor>>>,
    n_params: usize,
    norm: bool,
) -> Result<(Vec<Option<Tensor>>, f64)> {
    let (mut grads, mut sq) = (Vec::with_capacity(n_params), 0.0);
    for s in sum_each(parts, n_params, norm)? {
        match s {
            Some((g, q)) => {
                sq += q;
                grads.push(Some(g));
            }
            None => grads.push(None),
        }
    }
    Ok((grads, sq.sqrt()))
}

/// Each parameter's tree sum over `parts` and its squared L2 norm (f64; 0 without `norm`), None
/// where no part has a gradient. [`sum_grads`] adds the squares in parameter order.
pub fn sum_each(parts: Vec<Vec<Option<Tensor>>>, n_params: usize, norm: bool) -> Result<Vec<Option<(Tensor, f64)>>> {
    let mut by_param: Vec<Vec<Option<Tensor>>> = (0..n_params).map(|_| Vec::with_capacity(parts.len())).collect();
    for micro in parts {
        anyhow::ensure!(micro.len() == n_params, "{} gradients for {n_params} parameters", micro.len());
        for (acc, g) in by_param.iter_mut().zip(micro) {
            acc.push(g);
        }
    }
    by_param.into_par_iter().map(|gs| sum_one(&gs, norm)).collect()
}

/// The clip factor for a gradient of global norm `norm` (None: no clipping; `max_norm` 0 = off).
pub fn clip_scale(norm: f64, max_norm: f64) -> Option<f64> {
    (max_norm > 0.0 && norm > max_norm).then(|| max_norm / (norm + 1e-6))
}

/// Where the sum of `n` >= 2 consecutive terms splits: its first `tree_split(n)` terms (the
/// largest power of two below n) are summed, then the rest, then the two sums. A missing term
/// (None) leaves the other side's sum as it is.
pub fn tree_split(n: usize) -> usize {
    let mut p = 1;
    while p * 2 < n {
        p *= 2;
    }
    p
}

/// `xs` summed by the tree of [`tree_split`], with `add` (None: no terms).
pub fn tree_sum<T: Clone>(xs: &[Option<T>], add: &mut impl FnMut(T, T) -> Result<T>) -> Result<Option<T>> {
    match xs.len() {
        0 => Ok(None),
        1 => Ok(xs[0].clone()),
        n => {
            let p = tree_split(n);
            let a = tree_sum(&xs[..p], add)?;
            let b = tree_sum(&xs[p..], add)?;
            Ok(match (a, b) {
                (Some(a), Some(b)) => Some(add(a, b)?),
                (a, b) => a.or(b),
            })
        }
    }
}

/// A partial sum on the fast path: one of the gradients themselves, or a new vector.
#[derive(Clone)]
enum Part<'a, T> {
    Borrowed(&'a [T]),
    Owned(Vec<T>),
}

impl<T: Float> Part<'_, T> {
    fn slice(&self) -> &[T] {
        match self {
            Part::Borrowed(s) => s,
            Part::Owned(v) => v,
        }
    }
}

/// The tree sum of `gs` and its squared norm (f64; 0 without `norm`), or None for no gradients.
fn sum_one(gs: &[Option<Tensor>], norm: bool) -> Result<Option<(Tensor, f64)>> {
    let present: Vec<&Tensor> = gs.iter().flatten().collect();
    let Some(&first) = present.first() else { return Ok(None) };
    let fast = present.iter().all(|g| g.is_contiguous() && g.device().is_cpu() && g.shape() == first.shape())
        && matches!(first.dtype(), DType::F32 | DType::F64)
        && present.iter().all(|g| g.dtype() == first.dtype());
    if !fast {
        let s = tree_sum(gs, &mut |a: Tensor, b: Tensor| Ok((a + b)?))?.expect("one gradient at least");
        let q = if norm { s.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()? } else { 0.0 };
        return Ok(Some((s, q)));
    }
    macro_rules! run {
        ($t:ty) => {{
            let guards: Vec<_> = gs.iter().map(|g| g.as_ref().map(|g| g.storage_and_layout())).collect();
            let mut slices: Vec<Option<&[$t]>> = Vec::with_capacity(gs.len());
            for g in &guards {
                slices.push(match g {
                    None => None,
                    Some((st, l)) => {
                        let Storage::Cpu(cpu) = &**st else { anyhow::bail!("gradient not on the CPU") };
                        let v = cpu.as_slice::<$t>()?;
                        Some(&v[l.start_offset()..l.start_offset() + l.shape().elem_count()])
                    }
                });
            }
            let (sum, q) = sum_slices(&slices, norm)?;
            drop(guards);
            match sum {
                // One gradient: the tensor itself.
                None => (present[0].clone(), q),
                Some(v) => (Tensor::from_vec(v, first.shape(), first.device())?, q),
            }
        }};
    }
    let out = match first.dtype() {
        DType::F32 => run!(f32),
        _ => run!(f64),
    };
    Ok(Some(out))
}

/// The tree sum of the slices (None when it is a single slice: that slice) and the f64 sum of
/// squares of the result (0 without `norm`). The last addition and the norm share one pass.
fn sum_slices<T: Float>(xs: &[Option<&[T]>], norm: bool) -> Result<(Option<Vec<T>>, f64)> {
    let add = &mut |a: Part<'_, T>, b: Part<'_, T>| -> Result<Part<'_, T>> {
        let mut out = match a {
            Part::Owned(v) => v,
            Part::Borrowed(s) => s.to_vec(),
        };
        add_into(&mut out, b.slice());
        Ok(Part::Owned(out))
    };
    let parts: Vec<Option<Part<'_, T>>> = xs.iter().map(|x| x.map(Part::Borrowed)).collect();
    let (a, b) = if parts.len() >= 2 {
        let p = tree_split(parts.len());
        (tree_sum(&parts[..p], add)?, tree_sum(&parts[p..], add)?)
    } else {
        (parts.first().cloned().flatten(), None)
    };
    Ok(match (a, b) {
        (Some(a), Some(b)) => {
            let (a, b) = (a.slice(), b.slice());
            let mut out = out_vec::<T>(a.len());
            let q = if norm {
                add_sum_sq(&mut out, a, b)
            } else {
                out.copy_from_slice(a);
                add_into(&mut out, b);
                0.0
            };
            (Some(out), q)
        }
        (Some(x), None) | (None, Some(x)) => {
            let q = if norm { sum_sq(x.slice()) } else { 0.0 };
            match x {
                Part::Borrowed(_) => (None, q),
                Part::Owned(v) => (Some(v), q),
            }
        }
        (None, None) => (None, 0.0),
    })
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
    fn sums_by_the_tree_with_the_tensor_forms_bits_and_the_f64_norm() -> Result<()> {
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
        // Four micro-batches: the tree (g0 + g1) + (g2 + g3); a missing one leaves its partner.
        let d = mk(4.1)?;
        let four =
            |g1: Option<Tensor>| vec![vec![Some(a.clone())], vec![g1], vec![Some(c.clone())], vec![Some(d.clone())]];
        let (g4, n4) = sum_grads(four(Some(b.clone())), 1)?;
        let want4 = ((&a + &b)? + (&c + &d)?)?;
        assert_eq!(g4[0].as_ref().unwrap().to_vec1::<f32>()?, want4.to_vec1::<f32>()?, "the tree's bits");
        assert_eq!(n4.to_bits(), sum_sq(&want4.to_vec1::<f32>()?).sqrt().to_bits());
        let (g3, _) = sum_grads(four(None), 1)?;
        let want3 = (&a + (&c + &d)?)?;
        assert_eq!(g3[0].as_ref().unwrap().to_vec1::<f32>()?, want3.to_vec1::<f32>()?, "None keeps the tree");
        // Two ranks' partial sums of two each, summed again: the single tree's bits.
        let (p0, _) = sum_grads_with(vec![vec![Some(a.clone())], vec![Some(b.clone())]], 1, false)?;
        let (p1, _) = sum_grads_with(vec![vec![Some(c.clone())], vec![Some(d.clone())]], 1, false)?;
        let (g22, n22) = sum_grads(vec![p0, p1], 1)?;
        assert_eq!(g22[0].as_ref().unwrap().to_vec1::<f32>()?, want4.to_vec1::<f32>()?);
        assert_eq!(n22.to_bits(), n4.to_bits());
        assert_eq!((tree_split(2), tree_split(3), tree_split(4), tree_split(6), tree_split(8)), (1, 2, 2, 4, 4));
        assert_eq!(clip_scale(2.0, 1.0), Some(1.0 / (2.0 + 1e-6)));
        assert_eq!(clip_scale(0.5, 1.0), None);
        assert_eq!(clip_scale(9.0, 0.0), None, "max_norm 0 turns clipping off");
        Ok(())
    }
}
