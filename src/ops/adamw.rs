//! One fused, in-place AdamW update of a parameter and its two moments (CPU, f32 / f64).
//!
//! The moments of a parameter of shape S live in one contiguous state tensor of shape (2, *S): m in
//! row 0, v in row 1. [`adamw_fused_step`] updates the state and the parameter in one pass over
//! their elements (rayon over chunks of [`CHUNK`] elements), with no allocation:
//!
//! ```text
//! m = b1 m + (1 - b1) g
//! v = b2 v + (1 - b2) g^2
//! p = p (1 - lr wd)                      (only when `decay` is set)
//! p = p - lr (m / bc1) / (sqrt(v / bc2) + eps)
//! ```
//!
//! Every element goes through exactly the roundings of the tensor-op path (`AdamW::step_reference`
//! in `train::optim`): each scalar product there is a Candle `affine(mul, add)`, evaluated as
//! `x * T::from_f64(mul) + T::from_f64(add)` with the same f64 constants, and the tensor ops
//! (add, sqr, sqrt, div, sub) are the plain element-wise ones, so the two paths agree bit for bit.
//!
//! Two Candle in-place ops nest: [`MomentsUpdate`] (an `InplaceOp2`) holds the state's storage for
//! writing and the gradient's for reading, and inside its `cpu_fwd` runs `ParamUpdate` (an
//! `InplaceOp1`) on the parameter, which receives the state slice through the op struct. The three
//! storages must be distinct (the caller checks that the gradient does not share the parameter's
//! storage; the state is owned by the optimizer). There are no CUDA / Metal kernels: on other
//! devices, dtypes or layouts the optimizer keeps its tensor-op path.

use super::backend::cpu::{contiguous, Float};
use super::backend::simd::widest;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, InplaceOp1, InplaceOp2, Layout, Result, Tensor};
use rayon::prelude::*;
use std::cell::RefCell;

/// Elements per rayon task.
pub const CHUNK: usize = 1 << 14;

/// The scalars of one AdamW update of one parameter, as the tensor-op path uses them (f64).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Bias corrections 1 - beta1^t and 1 - beta2^t.
    pub bc1: f64,
    pub bc2: f64,
    /// Learning rate of this parameter (lr scale included).
    pub lr: f64,
    /// Decoupled decay factor 1 - lr * wd, or None when the parameter is not decayed.
    pub decay: Option<f64>,
    /// The gradient's clip factor (g * scale first, as Candle's `affine(scale, 0)`), or None.
    pub grad_scale: Option<f64>,
}

/// The constants of [`AdamWStep`] converted once to the element type, as Candle's `affine` does.
#[derive(Clone, Copy)]
struct Consts<T> {
    b1: T,
    omb1: T,
    b2: T,
    omb2: T,
    inv_bc1: T,
    inv_bc2: T,
    eps: T,
    lr: T,
    decay: Option<T>,
    grad_scale: Option<T>,
}

impl<T: Float> Consts<T> {
    fn new(s: &AdamWStep) -> Self {
        let f = T::from_f64;
        Self {
            b1: f(s.beta1),
            omb1: f(1.0 - s.beta1),
            b2: f(s.beta2),
            omb2: f(1.0 - s.beta2),
            inv_bc1: f(1.0 / s.bc1),
            inv_bc2: f(1.0 / s.bc2),
            eps: f(s.eps),
            lr: f(s.lr),
            decay: s.decay.map(f),
            grad_scale: s.grad_scale.map(f),
        }
    }
}

widest! {
/// One chunk: the element-wise update, written as the tensor path's sequence of ops. The `+ zero`
/// terms are the `add` of Candle's `affine` (they turn -0 into +0, so they are kept).
fn chunk<T: Float>(p: &mut [T], m: &mut [T], v: &mut [T], g: &[T], c: &Consts<T>) {
    let zero = T::ZERO;
    let n = p.len();
    let (m, v, g) = (&mut m[..n], &mut v[..n], &g[..n]);
    for i in 0..n {
        let gi = match c.grad_scale {
            Some(s) => g[i] * s + zero,
            None => g[i],
        };
        let mi = (m[i] * c.b1 + zero) + (gi * c.omb1 + zero);
        let vi = (v[i] * c.b2 + zero) + ((gi * gi) * c.omb2 + zero);
        // affine(1, eps): x * 1 is exact, so only the + eps remains.
        let denom = (vi * c.inv_bc2 + zero).sqrt() + c.eps;
        let update = (mi * c.inv_bc1 + zero) / denom;
        let mut theta = p[i];
        if let Some(d) = c.decay {
            theta = theta * d + zero;
        }
        p[i] = theta - (update * c.lr + zero);
        m[i] = mi;
        v[i] = vi;
    }
}
}

fn kernel<T: Float>(p: &mut [T], mv: &mut [T], g: &[T], s: &AdamWStep) {
    let c = Consts::<T>::new(s);
    let (m, v) = mv.split_at_mut(p.len());
    if p.len() <= CHUNK {
        chunk(p, m, v, g, &c);
    } else {
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|(((p, m), v), g)| chunk(p, m, v, g, &c));
    }
}

/// The outer op: runs on the state tensor (2, *S) (written) with the gradient (read).
pub struct MomentsUpdate<'a> {
    pub param: &'a Tensor,
    pub step: AdamWStep,
}

/// The inner op: runs on the parameter, with the state and gradient slices the outer op holds.
struct ParamUpdate<'a, T> {
    mv: RefCell<Option<&'a mut [T]>>,
    g: &'a [T],
    step: AdamWStep,
}

impl<T: Float> InplaceOp1 for ParamUpdate<'_, T> {
    fn name(&self) -> &'static str {
        "adamw-param"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let (a, b) = contiguous(l, "parameter", "adamw")?;
        let p = T::slice_mut(s, "parameter (the state's dtype)", "adamw")?;
        let Some(mv) = self.mv.borrow_mut().take() else { bail!("adamw: parameter op ran twice") };
        let p = &mut p[a..b];
        if p.len() != self.g.len() || mv.len() != 2 * p.len() {
            bail!("adamw: {} parameter elements, {} gradient, {} state", p.len(), self.g.len(), mv.len());
        }
        kernel(p, mv, self.g, &self.step);
        Ok(())
    }
}

fn moments_and_param<T: Float>(
    param: &Tensor,
    step: AdamWStep,
    mv: &mut CpuStorage,
    mv_l: &Layout,
    g: &CpuStorage,
    g_l: &Layout,
) -> Result<()> {
    let (ma, mb) = contiguous(mv_l, "state", "adamw")?;
    let (ga, gb) = contiguous(g_l, "gradient", "adamw")?;
    let g = T::slice(g, "gradient (the state's dtype)", "adamw")?;
    let mv = &mut T::slice_mut(mv, "state", "adamw")?[ma..mb];
    param.inplace_op1(&ParamUpdate { mv: RefCell::new(Some(mv)), g: &g[ga..gb], step })
}

impl InplaceOp2 for MomentsUpdate<'_> {
    fn name(&self) -> &'static str {
        "adamw-moments"
    }

    fn cpu_fwd(&self, mv: &mut CpuStorage, mv_l: &Layout, g: &CpuStorage, g_l: &Layout) -> Result<()> {
        match mv {
            CpuStorage::F32(_) => moments_and_param::<f32>(self.param, self.step, mv, mv_l, g, g_l),
            CpuStorage::F64(_) => moments_and_param::<f64>(self.param, self.step, mv, mv_l, g, g_l),
            other => bail!("adamw: fused step needs f32 or f64, got {:?}", other.dtype()),
        }
    }
}

/// Whether [`adamw_fused_step`] can update `param` whose state is `mv` with gradient `grad`: all
/// on the CPU, one float dtype (f32 or f64), `param` and `mv` contiguous, shapes (S), (2, *S), (S),
/// and `grad` not sharing `param`'s or `mv`'s storage. `grad` may be strided (it is then copied).
pub fn fusable(param: &Tensor, mv: &Tensor, grad: &Tensor) -> bool {
    let dt = param.dtype();
    param.device().is_cpu()
        && grad.device().is_cpu()
        && mv.device().is_cpu()
        && matches!(dt, candle_core::DType::F32 | candle_core::DType::F64)
        && grad.dtype() == dt
        && mv.dtype() == dt
        && param.is_contiguous()
        && mv.is_contiguous()
        && grad.dims() == param.dims()
        && mv.dims().first() == Some(&2)
        && &mv.dims()[1..] == param.dims()
        && distinct_storages(&[param, mv, grad])
}

/// Address of a tensor's storage (the lock is released before returning, the address stays valid
/// while the tensor lives): equal addresses mean a shared allocation (`Tensor::same_storage` is
/// private to Candle).
fn storage_addr(t: &Tensor) -> usize {
    let (s, _) = t.storage_and_layout();
    &*s as *const _ as *const u8 as usize
}

fn distinct_storages(ts: &[&Tensor]) -> bool {
    let a: Vec<usize> = ts.iter().map(|t| storage_addr(t)).collect();
    (0..a.len()).all(|i| (i + 1..a.len()).all(|j| a[i] != a[j]))
}

/// Updates `mv` (2, *S) and `param` (S) in place with `grad` (S); see the module doc. Call only
/// when [`fusable`] holds.
pub fn adamw_fused_step(param: &Tensor, mv: &Tensor, grad: &Tensor, step: AdamWStep) -> Result<()> {
    if !fusable(param, mv, grad) {
        bail!("adamw: fused step does not apply to these tensors");
    }
    let grad = grad.contiguous()?;
    mv.inplace_op2(&grad, &MomentsUpdate { param, step })
}
