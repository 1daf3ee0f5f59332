//! The training step's expert MLP: the op reads each active expert's weights where they are (no
//! packed copy), and its backward writes each active expert's gradients into tensors of their own,
//! handed out of band through [`ExpertGrads`] instead of through Candle's `GradStore` (which
//! would zero-fill a buffer as large as all experts and add into it). Its work grows with the rows
//! and the experts they reach, not with the number of experts. The forward keeps what the
//! backward needs (N, 2H: GELU's activation and derivative, or SwiGLU's U and G), which the graph
//! form recomputes. Same kernels and bits as the graph form [`expert_mlp`](super::expert_mlp).

use super::kernels::{self, Grads, Weights};
use super::{active, check_experts, per_expert, ExpertParams};
use crate::ops::backend::cpu::{contiguous, out_vec, Float};
use crate::ops::gelu::Normal;
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, Device, Layout, Result, Shape, Storage, Tensor, TensorId, WithDType,
};
use std::sync::{Arc, Mutex};

/// The gradients of the experts' parameters from a backward through [`expert_mlp_train`]'s output:
/// one (parameter id, gradient) per parameter of every expert that got rows; empty until the
/// backward ran.
#[derive(Clone, Debug, Default)]
pub struct ExpertGrads {
    slot: Arc<Mutex<Vec<(TensorId, Tensor)>>>,
}

impl ExpertGrads {
    /// (parameter id, gradient) of every parameter that got one.
    pub fn grads(&self) -> Vec<(TensorId, Tensor)> {
        self.slot.lock().expect("expert gradients").clone()
    }
}

/// The forward op over the sorted rows (N, C) -> (N, C), with the active experts' weights
/// (w1, b1, w2, b2, wg, bg; biases None without bias, the gate None for GELU) and E' + 1 offsets.
#[derive(Clone, Debug)]
pub struct ExpertMlpInPlace {
    c: usize,
    h: usize,
    offsets: Arc<Vec<u32>>,
    params: Arc<Vec<[Option<Tensor>; 6]>>,
    out: ExpertGrads,
    /// What the forward kept for the backward (N, 2H), taken by the backward.
    saved: Arc<Mutex<Option<CpuStorage>>>,
}

/// [`expert_mlp`](super::expert_mlp) for a training step: xs (N_kept, C) grouped by expert
/// (`offsets`, E + 1 entries) -> (N_kept, C), and the experts' gradients after a backward
/// ([`ExpertGrads`]; None off the CPU, where the graph form runs and autograd has them).
pub fn expert_mlp_train(
    xs: &Tensor,
    experts: &[ExpertParams],
    offsets: &[u32],
) -> Result<(Tensor, Option<ExpertGrads>)> {
    if !xs.device().is_cpu() {
        return Ok((per_expert(xs, experts, offsets, true)?, None));
    }
    let (n, c) = xs.dims2()?;
    let (h, _, _) = check_experts(experts, offsets, n, c)?;
    let (experts, offsets) = active(experts, offsets)?;
    let out = ExpertGrads::default();
    if experts.is_empty() {
        return Ok((xs.zeros_like()?, Some(out)));
    }
    let params = experts.iter().map(|p| p.all().map(|t| t.cloned()));
    let op = ExpertMlpInPlace {
        c,
        h,
        offsets: Arc::new(offsets),
        params: Arc::new(params.collect()),
        out: out.clone(),
        saved: Arc::default(),
    };
    Ok((xs.contiguous()?.apply_op1(op)?, Some(out)))
}

/// `f` of each expert's weights, read in place from their storages (contiguous, CPU, of type T)
/// under read locks held for the call.
fn with_weights<T: Float, R>(params: &[[Option<Tensor>; 6]], f: impl FnOnce(&[Weights<T>]) -> R) -> Result<R> {
    let guards: Vec<_> = params.iter().flatten().map(|t| t.as_ref().map(|t| t.storage_and_layout())).collect();
    let mut s = Vec::with_capacity(guards.len());
    for g in &guards {
        s.push(match g {
            None => &[][..],
            Some((st, l)) => {
                let Storage::Cpu(cpu) = &**st else { candle_core::bail!("expert-mlp: parameter not on the CPU") };
                let (a, z) = contiguous(l, "parameter", "expert-mlp")?;
                &T::slice(cpu, "parameter", "expert-mlp")?[a..z]
            }
        });
    }
    let ws: Vec<Weights<T>> =
        s.chunks(6).map(|w| Weights { w1: w[0], b1: w[1], w2: w[2], b2: w[3], wg: w[4], bg: w[5] }).collect();
    Ok(f(&ws))
}

impl ExpertMlpInPlace {
    fn check(&self, l: &Layout, op: &str) -> Result<(usize, usize)> {
        if l.dims() != [*self.offsets.last().unwrap_or(&0) as usize, self.c] {
            candle_core::bail!("{op}: rows must be ({:?}, {}), got {:?}", self.offsets.last(), self.c, l.shape());
        }
        contiguous(l, "rows", op)
    }

    /// dx of the rows, and every active expert's gradients into the [`ExpertGrads`] slot.
    fn bwd_cpu<T: Normal + WithDType>(&self, x: &[T], dy: &[T]) -> Result<Vec<T>> {
        let mut dx = out_vec::<T>(x.len());
        let saved = self.saved.lock().expect("saved activations").take();
        let kept = match &saved {
            Some(s) if s.dtype() == T::DTYPE => Some(T::slice(s, "saved activations", "expert-mlp-in-place-bwd")?),
            _ => None,
        };
        let bufs = with_weights(&self.params, |ws: &[Weights<T>]| {
            let mut bufs: Vec<[Vec<T>; 6]> = ws
                .iter()
                .map(|w| [w.w1.len(), w.b1.len(), w.w2.len(), w.b2.len(), w.wg.len(), w.bg.len()].map(out_vec::<T>))
                .collect();
            let gs = bufs.iter_mut().map(|[w1, b1, w2, b2, wg, bg]| Grads { w1, b1, w2, b2, wg, bg }).collect();
            kernels::backward_all(x, dy, kept, ws, &self.offsets, self.c, self.h, &mut dx, gs);
            bufs
        })?;
        let mut grads = Vec::with_capacity(4 * bufs.len());
        for (ps, bs) in self.params.iter().zip(bufs) {
            for (p, b) in ps.iter().zip(bs) {
                if let Some(p) = p {
                    grads.push((p.id(), Tensor::from_vec(b, p.shape(), &Device::Cpu)?));
                }
            }
        }
        *self.out.slot.lock().expect("expert gradients") = grads;
        Ok(dx)
    }
}

impl CustomOp1 for ExpertMlpInPlace {
    fn name(&self) -> &'static str {
        "expert-mlp-in-place"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (a, z) = self.check(l, "expert-mlp-in-place")?;
        macro_rules! run {
            ($t:ty, $x:expr) => {{
                let (y, kept) = with_weights(&self.params, |ws: &[Weights<$t>]| {
                    kernels::forward_all(&$x[a..z], ws, &self.offsets, self.c, self.h, true)
                })?;
                *self.saved.lock().expect("saved activations") = kept.map(<$t>::storage);
                <$t>::storage(y)
            }};
        }
        let out = match s {
            CpuStorage::F32(x) => run!(f32, x),
            CpuStorage::F64(x) => run!(f64, x),
            other => candle_core::bail!("expert-mlp-in-place: f32 or f64 input required, got {:?}", other.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &InPlaceBwd(self.clone()))?))
    }
}

/// The backward of [`ExpertMlpInPlace`]: (rows, dy) -> dx, the parameters' gradients out of band.
#[derive(Clone, Debug)]
struct InPlaceBwd(ExpertMlpInPlace);

impl CustomOp2 for InPlaceBwd {
    fn name(&self) -> &'static str {
        "expert-mlp-in-place-bwd"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sd: &CpuStorage, ld: &Layout) -> Result<(CpuStorage, Shape)> {
        let op = &self.0;
        let (xa, xz) = op.check(lx, "expert-mlp-in-place-bwd")?;
        let (da, dz) = op.check(ld, "expert-mlp-in-place-bwd")?;
        let out = match sx {
            CpuStorage::F32(x) => f32::storage(op.bwd_cpu(&x[xa..xz], &f32::slice(sd, "dy", "expert-mlp")?[da..dz])?),
            CpuStorage::F64(x) => f64::storage(op.bwd_cpu(&x[xa..xz], &f64::slice(sd, "dy", "expert-mlp")?[da..dz])?),
            other => candle_core::bail!("expert-mlp-in-place-bwd: f32 or f64 required, got {:?}", other.dtype()),
        };
        Ok((out, lx.shape().clone()))
    }
}
