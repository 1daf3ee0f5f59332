//! y = x W^T (+ b) over the flattened leading dimensions of x, as one op each way. The backward
//! ([`LinearBwd`], itself an op) returns dx = dy W, dW = dy^T x and db = the row sum of dy from one
//! call.
//!
//! The composite form (reshape, transpose, matmul, broadcast add, reshape) is five graph nodes,
//! and Candle's backward zero-fills and adds a gradient buffer at each of them; its bias gradient
//! is a strided leading-dimension reduction. This is one node. The matmuls are `gemm` calls,
//! threaded as Candle's own (`RAYON_NUM_THREADS`). CPU kernel here; on other devices [`linear`]
//! runs the plain-tensor twin [`linear_reference`].

use super::backend::cpu::{contiguous, out_vec, Float};
use super::gemm::{matmul_par, Mat};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// x: (..., in), w: (out, in), b: (out) -> (..., out).
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return linear_reference(x, w, b);
    }
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    match b {
        Some(b) => x.apply_op3(&w, b, Linear),
        None => x.apply_op2(&w, Linear),
    }
}

/// The plain-tensor twin of [`linear`]: one 2-D matmul and a broadcast add.
pub fn linear_reference(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let inp = *dims.last().unwrap_or(&1);
    let y = x.reshape((x.elem_count() / inp.max(1), inp))?.matmul(&w.t()?)?;
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out = dims;
    *out.last_mut().expect("rank >= 1") = w.dim(0)?;
    y.reshape(out)
}

/// The forward op (bias when applied to three tensors).
#[derive(Clone, Copy, Debug)]
pub struct Linear;

/// (rows, in, out) of a call, checked.
fn dims(lx: &Layout, lw: &Layout, op: &str) -> Result<(usize, usize, usize)> {
    let (out, inp) = match lw.dims() {
        [o, i] => (*o, *i),
        d => candle_core::bail!("{op}: weight must be (out, in), got {d:?}"),
    };
    let xin = lx.dims().last().copied().unwrap_or(0);
    if lx.dims().is_empty() || xin != inp {
        candle_core::bail!("{op}: x {:?} does not end in the weight's in = {inp}", lx.shape());
    }
    Ok((lx.shape().elem_count() / inp.max(1), inp, out))
}

fn fwd_cpu<T: Float>(x: &[T], w: &[T], b: Option<&[T]>, n: usize, inp: usize, out: usize) -> Vec<T> {
    let mut y = out_vec::<T>(n * out);
    matmul_par(&mut y, Mat::rows(x, n, inp), Mat::t(w, inp, out), false);
    if let Some(b) = b {
        super::float::add_rows(&mut y, b);
    }
    y
}

impl Linear {
    fn fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, inp, out) = dims(lx, lw, "linear")?;
        let (xa, xz) = contiguous(lx, "x", "linear")?;
        let (wa, wz) = contiguous(lw, "weight", "linear")?;
        let brange = match bias {
            Some((_, lb)) => {
                if lb.dims() != [out] {
                    candle_core::bail!("linear: bias must be ({out}), got {:?}", lb.shape());
                }
                Some(contiguous(lb, "bias", "linear")?)
            }
            None => None,
        };
        macro_rules! run {
            ($t:ty) => {{
                let x = &<$t>::slice(sx, "x", "linear")?[xa..xz];
                let w = &<$t>::slice(sw, "weight", "linear")?[wa..wz];
                let b = match (bias, brange) {
                    (Some((sb, _)), Some((ba, bz))) => Some(&<$t>::slice(sb, "bias", "linear")?[ba..bz]),
                    _ => None,
                };
                <$t>::storage(fwd_cpu(x, w, b, n, inp, out))
            }};
        }
        let y = match sx {
            CpuStorage::F32(_) => run!(f32),
            CpuStorage::F64(_) => run!(f64),
            other => candle_core::bail!("linear: f32 or f64 input required, got {:?}", other.dtype()),
        };
        let mut shape = lx.dims().to_vec();
        *shape.last_mut().expect("checked rank") = out;
        Ok((y, Shape::from(shape)))
    }

    /// dx, dW, db from the packed output of [`LinearBwd`].
    fn grads(x: &Tensor, w: &Tensor, grad: &Tensor, bias: bool) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let (out, inp) = w.dims2()?;
        let nx = x.elem_count();
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &LinearBwd { bias })?;
        let dx = packed.narrow(0, 0, nx)?.reshape(x.shape())?;
        let dw = packed.narrow(0, nx, out * inp)?.reshape((out, inp))?;
        let db = if bias { Some(packed.narrow(0, nx + out * inp, out)?) } else { None };
        Ok((dx, dw, db))
    }
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sw: &CpuStorage, lw: &Layout) -> Result<(CpuStorage, Shape)> {
        self.fwd(sx, lx, sw, lw, None)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = Self::grads(x, w, grad, false)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd(sx, lx, sw, lw, Some((sb, lb)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = Self::grads(x, w, grad, true)?;
        Ok((Some(dx), Some(dw), db))
    }
}

/// The backward of [`Linear`]: (x, W, dy) -> [dx; dW; db] flat (db only with `bias`).
#[derive(Clone, Copy, Debug)]
pub struct LinearBwd {
    pub bias: bool,
}

fn bwd_cpu<T: Float>(x: &[T], w: &[T], dy: &[T], n: usize, inp: usize, out: usize, bias: bool) -> Vec<T> {
    let nb = if bias { out } else { 0 };
    let mut g = out_vec::<T>(n * inp + out * inp + nb);
    let (dx, rest) = g.split_at_mut(n * inp);
    let (dw, db) = rest.split_at_mut(out * inp);
    matmul_par(dx, Mat::rows(dy, n, out), Mat::rows(w, out, inp), false); // dy W
    matmul_par(dw, Mat::t(dy, out, n), Mat::rows(x, n, inp), false); // dy^T x
    if bias {
        db.copy_from_slice(&super::float::col_sum(dy, out));
    }
    g
}

impl CustomOp3 for LinearBwd {
    fn name(&self) -> &'static str {
        "linear-bwd"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sd: &CpuStorage,
        ld: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, inp, out) = dims(lx, lw, "linear-bwd")?;
        if ld.shape().elem_count() != n * out || ld.dims().last() != Some(&out) {
            candle_core::bail!("linear-bwd: dy {:?} does not match {n} rows of {out}", ld.shape());
        }
        let (xa, xz) = contiguous(lx, "x", "linear-bwd")?;
        let (wa, wz) = contiguous(lw, "weight", "linear-bwd")?;
        let (da, dz) = contiguous(ld, "dy", "linear-bwd")?;
        macro_rules! run {
            ($t:ty) => {{
                let x = &<$t>::slice(sx, "x", "linear-bwd")?[xa..xz];
                let w = &<$t>::slice(sw, "weight", "linear-bwd")?[wa..wz];
                let dy = &<$t>::slice(sd, "dy", "linear-bwd")?[da..dz];
                <$t>::storage(bwd_cpu(x, w, dy, n, inp, out, self.bias))
            }};
        }
        let g = match sx {
            CpuStorage::F32(_) => run!(f32),
            CpuStorage::F64(_) => run!(f64),
            other => candle_core::bail!("linear-bwd: f32 or f64 input required, got {:?}", other.dtype()),
        };
        let len = n * inp + out * inp + if self.bias { out } else { 0 };
        Ok((g, Shape::from(len)))
    }
}
