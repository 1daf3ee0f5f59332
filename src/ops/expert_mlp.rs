//! Every expert's GELU MLP over its block of the expert-sorted rows, as one op each way: per
//! expert e with rows [offsets[e], offsets[e + 1]), y = gelu(x W1_e^T + b1_e) W2_e^T + b2_e.
//! The backward ([`ExpertMlpBwd`], itself an op) recomputes the hidden activations and returns
//! dx and every expert's dW1, db1, dW2, db2 in one buffer.
//!
//! The parameters travel as one flat tensor, per expert [W1 (H, C), b1 (H), W2 (C, H), b2 (C)]
//! (the biases only with `bias`), built with `Tensor::cat`, so each expert's gradients flow back
//! to its own variables. It replaces the loop of per-expert Candle ops (about 12 graph nodes per
//! expert each way) with 6 matmuls per expert in two ops. Experts run in parallel, deterministic.
//! CPU kernel here; on GPUs [`expert_mlp`] runs the per-expert loop with the matmuls on the device's
//! GEMM and the [`gelu`](super::gelu()) op's kernels; the plain-tensor twin is [`expert_mlp_reference`].

use super::backend::cpu::{contiguous, out_vec, Float};
use super::float::add_rows;
use super::gelu::{gelu_act_and_grad, gelu_in_place, Normal};
use super::gemm::{matmul, Mat};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// The shape of one call: E experts of C -> H -> C, and the row blocks.
#[derive(Clone, Debug)]
pub struct ExpertMlp {
    pub c: usize,
    pub h: usize,
    pub bias: bool,
    /// E + 1 row offsets into the sorted rows.
    pub offsets: Arc<Vec<u32>>,
}

/// One expert's parameters, in the order they are packed.
pub struct ExpertParams<'a> {
    pub w1: &'a Tensor,
    pub b1: Option<&'a Tensor>,
    pub w2: &'a Tensor,
    pub b2: Option<&'a Tensor>,
}

impl ExpertMlp {
    fn per_expert(&self) -> usize {
        2 * self.h * self.c + if self.bias { self.h + self.c } else { 0 }
    }

    fn experts(&self) -> usize {
        self.offsets.len() - 1
    }

    /// (w1, b1, w2, b2) ranges of expert e in the packed buffer.
    fn ranges(&self, e: usize) -> [std::ops::Range<usize>; 4] {
        let (c, h) = (self.c, self.h);
        let s = e * self.per_expert();
        let bh = if self.bias { h } else { 0 };
        let bc = if self.bias { c } else { 0 };
        let w1 = s..s + h * c;
        let b1 = w1.end..w1.end + bh;
        let w2 = b1.end..b1.end + c * h;
        let b2 = w2.end..w2.end + bc;
        [w1, b1, w2, b2]
    }
}

/// xs: (N_kept, C) rows grouped by expert (`offsets`, E + 1 entries) -> (N_kept, C).
pub fn expert_mlp(xs: &Tensor, experts: &[ExpertParams], offsets: &[u32]) -> Result<Tensor> {
    Ok(expert_mlp_with(xs, experts, offsets, false)?.0)
}

/// Every expert's parameters as one packed tensor outside the autograd graph (the training step's
/// form, [`expert_mlp_packed`]): Candle's backward leaves the packed gradient under `packed`, and
/// [`PackedExperts::grads`] cuts it into each parameter's gradient as views.
#[derive(Clone, Debug)]
pub struct PackedExperts {
    pub packed: Tensor,
    /// Each parameter tensor (the model's own, matched by id) and its offset in `packed`.
    pub pieces: Vec<(Tensor, usize)>,
}

impl PackedExperts {
    /// (parameter id, gradient) of every piece, or nothing when the backward gave none.
    pub fn grads(&self, gs: &candle_core::backprop::GradStore) -> Result<Vec<(candle_core::TensorId, Tensor)>> {
        let Some(g) = gs.get(&self.packed) else { return Ok(Vec::new()) };
        self.pieces
            .iter()
            .map(|(t, off)| Ok((t.id(), g.narrow(0, *off, t.elem_count())?.reshape(t.shape())?)))
            .collect()
    }
}

/// [`expert_mlp`] with the parameters packed outside the graph ([`PackedExperts`]): one gradient
/// buffer for all of them, where the graph form fills and adds three (the packed tensor, each
/// piece, each piece's reshape). None (and the graph form) off the CPU.
pub fn expert_mlp_packed(
    xs: &Tensor,
    experts: &[ExpertParams],
    offsets: &[u32],
) -> Result<(Tensor, Option<PackedExperts>)> {
    expert_mlp_with(xs, experts, offsets, true)
}

fn expert_mlp_with(
    xs: &Tensor,
    experts: &[ExpertParams],
    offsets: &[u32],
    detached: bool,
) -> Result<(Tensor, Option<PackedExperts>)> {
    if !xs.device().is_cpu() {
        return Ok((per_expert(xs, experts, offsets, super::gelu::gelu)?, None));
    }
    let (n, c) = xs.dims2()?;
    let (h, wc) = experts.first().map(|p| p.w1.dims2()).transpose()?.unwrap_or((0, c));
    let bias = experts.first().is_some_and(|p| p.b1.is_some() && p.b2.is_some());
    if offsets.len() != experts.len() + 1 || wc != c || offsets.last().copied() != Some(n as u32) {
        candle_core::bail!(
            "expert_mlp: {} experts of C = {wc} with {} offsets (last {:?}) for {n} rows of C = {c}",
            experts.len(),
            offsets.len(),
            offsets.last()
        );
    }
    let mut parts = Vec::with_capacity(4 * experts.len());
    for p in experts {
        parts.push(p.w1);
        if bias {
            parts.push(p.b1.expect("bias"));
        }
        parts.push(p.w2);
        if bias {
            parts.push(p.b2.expect("bias"));
        }
    }
    let flat = parts
        .iter()
        .map(|t| if detached { t.detach().flatten_all() } else { t.flatten_all() })
        .collect::<Result<Vec<_>>>()?;
    let packed = Tensor::cat(&flat, 0)?;
    let op = ExpertMlp { c, h, bias, offsets: Arc::new(offsets.to_vec()) };
    if packed.elem_count() != op.per_expert() * experts.len() {
        candle_core::bail!("expert_mlp: expert parameters are not all (H, C) = ({h}, {c}) and (C, H)");
    }
    let y = xs.contiguous()?.apply_op2(&packed, op)?;
    let packed = detached.then(|| {
        let mut off = 0;
        let pieces = parts
            .iter()
            .map(|t| {
                off += t.elem_count();
                ((*t).clone(), off - t.elem_count())
            })
            .collect();
        PackedExperts { packed, pieces }
    });
    Ok((y, packed))
}

/// The plain-tensor twin: a loop of Candle ops per expert, then the blocks concatenated.
pub fn expert_mlp_reference(xs: &Tensor, experts: &[ExpertParams], offsets: &[u32]) -> Result<Tensor> {
    per_expert(xs, experts, offsets, super::gelu::gelu_reference)
}

/// The loop of Candle ops per expert with activation `act`, then the blocks concatenated.
fn per_expert(
    xs: &Tensor,
    experts: &[ExpertParams],
    offsets: &[u32],
    act: fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    if offsets.len() != experts.len() + 1 {
        candle_core::bail!("expert_mlp: {} offsets for {} experts", offsets.len(), experts.len());
    }
    let mut outs = Vec::new();
    for (e, p) in experts.iter().enumerate() {
        let (a, b) = (offsets[e] as usize, offsets[e + 1] as usize);
        if b == a {
            continue;
        }
        let x = xs.narrow(0, a, b - a)?;
        let mut hd = x.matmul(&p.w1.t()?)?;
        if let Some(b1) = p.b1 {
            hd = hd.broadcast_add(b1)?;
        }
        let mut y = act(&hd)?.matmul(&p.w2.t()?)?;
        if let Some(b2) = p.b2 {
            y = y.broadcast_add(b2)?;
        }
        outs.push(y);
    }
    if outs.is_empty() {
        return xs.zeros_like();
    }
    Tensor::cat(&outs, 0)
}

/// Pre-activation (n, H) = x W1^T + b1 of one expert.
fn hidden<T: Float>(x: &[T], w1: &[T], b1: &[T], n: usize, c: usize, h: usize) -> Vec<T> {
    let mut pre = out_vec::<T>(n * h);
    matmul(&mut pre, Mat::rows(x, n, c), Mat::t(w1, c, h), false);
    if !b1.is_empty() {
        add_rows(&mut pre, b1);
    }
    pre
}

impl ExpertMlp {
    fn fwd_cpu<T: Normal>(&self, x: &[T], p: &[T]) -> Vec<T> {
        let (c, h) = (self.c, self.h);
        let o = &self.offsets;
        let blocks: Vec<Vec<T>> = (0..self.experts())
            .into_par_iter()
            .map(|e| {
                let (a, b) = (o[e] as usize, o[e + 1] as usize);
                let n = b - a;
                let [w1, b1, w2, b2] = self.ranges(e);
                let mut act = hidden(&x[a * c..b * c], &p[w1], &p[b1], n, c, h);
                gelu_in_place(&mut act);
                let mut y = out_vec::<T>(n * c);
                matmul(&mut y, Mat::rows(&act, n, h), Mat::t(&p[w2], h, c), false);
                if self.bias {
                    add_rows(&mut y, &p[b2.clone()]);
                }
                y
            })
            .collect();
        blocks.concat()
    }

    fn bwd_cpu<T: Normal>(&self, x: &[T], p: &[T], dy: &[T]) -> Vec<T> {
        let (c, h) = (self.c, self.h);
        let o = &self.offsets;
        let rows = x.len() / c;
        // [dx; dparams], each expert writing its own row block of dx and its own parameters.
        let mut out = out_vec::<T>(rows * c + p.len());
        let (dx_all, g_all) = out.split_at_mut(rows * c);
        let mut pieces = Vec::with_capacity(self.experts());
        let (mut dx_rest, mut g_rest) = (dx_all, g_all);
        for e in 0..self.experts() {
            let n = (o[e + 1] - o[e]) as usize;
            let (dx, r) = std::mem::take(&mut dx_rest).split_at_mut(n * c);
            let (g, gr) = std::mem::take(&mut g_rest).split_at_mut(self.per_expert());
            (dx_rest, g_rest) = (r, gr);
            pieces.push((e, dx, g));
        }
        pieces.into_par_iter().for_each(|(e, dx, g)| {
            let (a, b) = (o[e] as usize, o[e + 1] as usize);
            let n = b - a;
            let [w1, b1, w2, _] = self.ranges(e);
            let (xe, dye) = (&x[a * c..b * c], &dy[a * c..b * c]);
            let pre = hidden(xe, &p[w1.clone()], &p[b1], n, c, h);
            let mut act = out_vec::<T>(n * h);
            let mut dpre = out_vec::<T>(n * h);
            // dA = dY W2, then through GELU: dH = dA * gelu'(H).
            matmul(&mut dpre, Mat::rows(dye, n, c), Mat::rows(&p[w2.clone()], c, h), false);
            gelu_act_and_grad(&mut dpre, &mut act, &pre);
            let off = e * self.per_expert();
            let [gw1, gb1, gw2, gb2] = self.ranges(e).map(|r| r.start - off..r.end - off);
            matmul(&mut g[gw2], Mat::t(dye, c, n), Mat::rows(&act, n, h), false); // dW2 = dY^T A
            matmul(&mut g[gw1], Mat::t(&dpre, h, n), Mat::rows(xe, n, c), false); // dW1 = dH^T X
            if self.bias {
                g[gb1].copy_from_slice(&super::float::col_sum(&dpre, h));
                g[gb2].copy_from_slice(&super::float::col_sum(dye, c));
            }
            matmul(dx, Mat::rows(&dpre, n, h), Mat::rows(&p[w1], h, c), false); // dX = dH W1
        });
        out
    }

    fn check(&self, lx: &Layout, lp: &Layout, op: &str) -> Result<usize> {
        let d = lx.dims();
        if d.len() != 2 || d[1] != self.c || self.offsets.last().copied() != Some(d[0] as u32) {
            candle_core::bail!("{op}: rows must be ({:?}, {}), got {:?}", self.offsets.last(), self.c, lx.shape());
        }
        if lp.shape().elem_count() != self.per_expert() * self.experts() {
            candle_core::bail!(
                "{op}: {} packed parameters, expected {}",
                lp.shape().elem_count(),
                self.per_expert() * self.experts()
            );
        }
        Ok(d[0])
    }
}

impl CustomOp2 for ExpertMlp {
    fn name(&self) -> &'static str {
        "expert-mlp"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sp: &CpuStorage, lp: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = self.check(lx, lp, "expert-mlp")?;
        let (xa, xz) = contiguous(lx, "rows", "expert-mlp")?;
        let (pa, pz) = contiguous(lp, "params", "expert-mlp")?;
        let out = match sx {
            CpuStorage::F32(x) => {
                f32::storage(self.fwd_cpu(&x[xa..xz], &f32::slice(sp, "params", "expert-mlp")?[pa..pz]))
            }
            CpuStorage::F64(x) => {
                f64::storage(self.fwd_cpu(&x[xa..xz], &f64::slice(sp, "params", "expert-mlp")?[pa..pz]))
            }
            other => candle_core::bail!("expert-mlp: f32 or f64 input required, got {:?}", other.dtype()),
        };
        Ok((out, Shape::from((n, self.c))))
    }

    fn bwd(&self, x: &Tensor, p: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = x.dim(0)? * self.c;
        let g = x.apply_op3_no_bwd(p, &grad.contiguous()?, &ExpertMlpBwd(self.clone()))?;
        Ok((Some(g.narrow(0, 0, n)?.reshape(x.shape())?), Some(g.narrow(0, n, p.elem_count())?.reshape(p.shape())?)))
    }
}

/// The backward of [`ExpertMlp`]: (rows, params, dy) -> [dx; dparams] flat.
#[derive(Clone, Debug)]
pub struct ExpertMlpBwd(pub ExpertMlp);

impl CustomOp3 for ExpertMlpBwd {
    fn name(&self) -> &'static str {
        "expert-mlp-bwd"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sp: &CpuStorage,
        lp: &Layout,
        sd: &CpuStorage,
        ld: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = &self.0;
        let n = op.check(lx, lp, "expert-mlp-bwd")?;
        if ld.dims() != [n, op.c] {
            candle_core::bail!("expert-mlp-bwd: dy must be ({n}, {}), got {:?}", op.c, ld.shape());
        }
        let (xa, xz) = contiguous(lx, "rows", "expert-mlp-bwd")?;
        let (pa, pz) = contiguous(lp, "params", "expert-mlp-bwd")?;
        let (da, dz) = contiguous(ld, "dy", "expert-mlp-bwd")?;
        macro_rules! run {
            ($t:ty) => {{
                let x = &<$t>::slice(sx, "rows", "expert-mlp-bwd")?[xa..xz];
                let p = &<$t>::slice(sp, "params", "expert-mlp-bwd")?[pa..pz];
                let dy = &<$t>::slice(sd, "dy", "expert-mlp-bwd")?[da..dz];
                <$t>::storage(op.bwd_cpu(x, p, dy))
            }};
        }
        let out = match sx {
            CpuStorage::F32(_) => run!(f32),
            CpuStorage::F64(_) => run!(f64),
            other => candle_core::bail!("expert-mlp-bwd: f32 or f64 input required, got {:?}", other.dtype()),
        };
        Ok((out, Shape::from(n * op.c + lp.shape().elem_count())))
    }
}
