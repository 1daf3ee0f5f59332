//! The SwiGLU product y = silu(g) u = g sigmoid(g) u (Shazeer 2020; Llama's and Mixtral's MLP) as
//! one op each way, where Candle's `silu(g) * u` is a scalar-`expf` pass, a product and about six
//! tensor ops in the backward. Backward ([`SwigluBwd`], itself an op): du = dy silu(g),
//! dg = dy u silu'(g), silu'(g) = s (1 + g (1 - s)), s = sigmoid(g).
//!
//! f32 uses the polynomial exp of `ops::float::exp_f32` (no libm call, so the loops
//! vectorize), f64 libm. CPU kernels here, also used by the SwiGLU experts of
//! [`expert_mlp`](mod@super::expert_mlp); on other devices [`swiglu`] is the plain-tensor twin
//! [`swiglu_reference`].

use super::backend::cpu::{contiguous, out_vec, Float};
use super::backend::simd::widest;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Elements per rayon task.
const CHUNK: usize = 1 << 14;

/// silu(g) u, g and u of one shape (..., H) -> (..., H).
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if !g.device().is_cpu() {
        return swiglu_reference(g, u);
    }
    if g.shape() != u.shape() {
        candle_core::bail!("swiglu: gate {:?} and up {:?} differ in shape", g.shape(), u.shape());
    }
    g.contiguous()?.apply_op2(&u.contiguous()?, Swiglu)
}

/// The plain-tensor twin of [`swiglu`]: Candle's `silu(g) * u`.
pub fn swiglu_reference(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    candle_nn::ops::silu(g)? * u
}

/// (sigmoid(g), silu(g)).
#[inline(always)]
fn sig_silu<T: Float>(g: T) -> (T, T) {
    let s = T::ONE / (T::ONE + (T::ZERO - g).exp());
    (s, g * s)
}

/// From the gate g, up u and the gradient d of the product: (silu(g) u, du = d silu(g),
/// dg = d u silu'(g)), silu'(g) = s (1 + g (1 - s)).
#[inline(always)]
fn act_and_grads<T: Float>(g: T, u: T, d: T) -> (T, T, T) {
    let (s, silu) = sig_silu(g);
    (silu * u, d * silu, d * u * (s * (T::ONE + g * (T::ONE - s))))
}

widest! {
    /// a = silu(g) u, element by element.
    pub(crate) fn swiglu_chunk<T: Float>(a: &mut [T], g: &[T], u: &[T]) {
        for ((a, &g), &u) in a.iter_mut().zip(g).zip(u) {
            *a = sig_silu(g).1 * u;
        }
    }
}

widest! {
    /// dg = dy u silu'(g) and du = dy silu(g), element by element.
    fn swiglu_bwd_chunk<T: Float>(dg: &mut [T], du: &mut [T], g: &[T], u: &[T], dy: &[T]) {
        for ((((dg, du), &g), &u), &d) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dy) {
            (_, *du, *dg) = act_and_grads(g, u, d);
        }
    }
}

widest! {
    /// From the gate g and up u and, in `du`, the gradient d of the product: a = silu(g) u, and
    /// du = d silu(g), dg = d u silu'(g) (one pass for a SwiGLU MLP's backward, which needs all).
    pub(crate) fn swiglu_act_and_grad<T: Float>(du: &mut [T], dg: &mut [T], a: &mut [T], g: &[T], u: &[T]) {
        for ((((du, dg), a), &g), &u) in du.iter_mut().zip(dg.iter_mut()).zip(a.iter_mut()).zip(g).zip(u) {
            (*a, *du, *dg) = act_and_grads(g, u, *du);
        }
    }
}

/// The forward op: (g, u) -> silu(g) u.
#[derive(Clone, Copy, Debug)]
pub struct Swiglu;

/// The backward op: (g, u, dy) -> [dg; du], flat.
#[derive(Clone, Copy, Debug)]
pub struct SwigluBwd;

fn fwd_cpu<T: Float>(g: &[T], u: &[T]) -> Vec<T> {
    let mut a = out_vec::<T>(g.len());
    a.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .for_each(|(a, (g, u))| swiglu_chunk(a, g, u));
    a
}

fn bwd_cpu<T: Float>(g: &[T], u: &[T], dy: &[T]) -> Vec<T> {
    let n = g.len();
    let mut out = out_vec::<T>(2 * n);
    let (dg, du) = out.split_at_mut(n);
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)).zip(dy.par_chunks(CHUNK)))
        .for_each(|((dg, du), ((g, u), dy))| swiglu_bwd_chunk(dg, du, g, u, dy));
    out
}

/// The contiguous ranges of tensors that must all have the shape of the first.
fn ranges<const N: usize>(ls: [&Layout; N], op: &str) -> Result<[(usize, usize); N]> {
    let mut out = [(0, 0); N];
    for (i, l) in ls.iter().enumerate() {
        if l.shape() != ls[0].shape() {
            candle_core::bail!("{op}: input {i} has shape {:?}, input 0 has {:?}", l.shape(), ls[0].shape());
        }
        out[i] = contiguous(l, "input", op)?;
    }
    Ok(out)
}

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, sg: &CpuStorage, lg: &Layout, su: &CpuStorage, lu: &Layout) -> Result<(CpuStorage, Shape)> {
        let [(ga, gz), (ua, uz)] = ranges([lg, lu], self.name())?;
        let out = match sg {
            CpuStorage::F32(g) => f32::storage(fwd_cpu(&g[ga..gz], &f32::slice(su, "up", "swiglu")?[ua..uz])),
            CpuStorage::F64(g) => f64::storage(fwd_cpu(&g[ga..gz], &f64::slice(su, "up", "swiglu")?[ua..uz])),
            other => candle_core::bail!("swiglu: f32 or f64 input required, got {:?}", other.dtype()),
        };
        Ok((out, lg.shape().clone()))
    }

    fn bwd(&self, g: &Tensor, u: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = g.elem_count();
        let both = g.apply_op3_no_bwd(u, &dy.contiguous()?, &SwigluBwd)?;
        Ok((Some(both.narrow(0, 0, n)?.reshape(g.shape())?), Some(both.narrow(0, n, n)?.reshape(u.shape())?)))
    }
}

impl CustomOp3 for SwigluBwd {
    fn name(&self) -> &'static str {
        "swiglu-bwd"
    }

    fn cpu_fwd(
        &self,
        sg: &CpuStorage,
        lg: &Layout,
        su: &CpuStorage,
        lu: &Layout,
        sd: &CpuStorage,
        ld: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [(ga, gz), (ua, uz), (da, dz)] = ranges([lg, lu, ld], self.name())?;
        macro_rules! run {
            ($t:ty, $g:expr) => {{
                let u = &<$t>::slice(su, "up", "swiglu-bwd")?[ua..uz];
                let dy = &<$t>::slice(sd, "dy", "swiglu-bwd")?[da..dz];
                <$t>::storage(bwd_cpu(&$g[ga..gz], u, dy))
            }};
        }
        let out = match sg {
            CpuStorage::F32(g) => run!(f32, g),
            CpuStorage::F64(g) => run!(f64, g),
            other => candle_core::bail!("swiglu-bwd: f32 or f64 input required, got {:?}", other.dtype()),
        };
        Ok((out, Shape::from(2 * (gz - ga))))
    }
}
