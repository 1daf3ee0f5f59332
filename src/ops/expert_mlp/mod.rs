//! Every expert's MLP over its block of the expert-sorted rows: per expert e with rows
//! \[offsets\[e\], offsets\[e + 1\]), y = gelu(x W1_e^T + b1_e) W2_e^T + b2_e (6 matmuls per expert),
//! or SwiGLU y = (silu(x Wg_e^T + bg_e) (x W1_e^T + b1_e)) W2_e^T + b2_e (9 matmuls), in one op
//! each way (the loop of per-expert Candle ops is 12-20 graph nodes per expert each way).
//! Only the experts that got rows take part: an expert without rows costs nothing and gets no
//! gradient (None, as in the plain-tensor twin and in PyTorch).
//!
//! Two forms on the CPU, with the same kernels (`kernels.rs`) and the same bits:
//! - [`expert_mlp`], the graph form: the active experts' parameters packed by `Tensor::cat` into
//!   one tensor that the op ([`ExpertMlp`], backward [`ExpertMlpBwd`]) differentiates, so each
//!   parameter's gradient reaches its own variable through autograd.
//! - [`expert_mlp_train`], the training step's form (`in_place.rs`): the op reads the weights where
//!   they are and its backward hands each active expert's gradients out of band
//!   ([`ExpertGrads`]): no copy of the weights, no packed gradient to zero-fill and add.
//!
//! On GPUs both run the per-expert loop with the matmuls on the device's GEMM and the
//! [`gelu`](super::gelu()) op's kernels (SwiGLU: Candle's silu); the plain-tensor twin is
//! [`expert_mlp_reference`].

mod in_place;
mod kernels;

pub use in_place::{expert_mlp_train, ExpertGrads, ExpertMlpInPlace};

use super::backend::cpu::{contiguous, out_vec, Float};
use super::gelu::Normal;
use super::swiglu::{swiglu, swiglu_reference};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use kernels::{Grads, Weights};
use std::sync::Arc;

/// The shape of one call: E experts of C -> H -> C, and the row blocks.
#[derive(Clone, Debug)]
pub struct ExpertMlp {
    pub c: usize,
    pub h: usize,
    pub bias: bool,
    /// SwiGLU experts (a gate projection) rather than GELU.
    pub gated: bool,
    /// E + 1 row offsets into the sorted rows.
    pub offsets: Arc<Vec<u32>>,
}

/// One expert's parameters, in the order they are packed: W1 (H, C) (the "up" projection of
/// SwiGLU, `c_fc`), b1, W2 (C, H), b2, and for SwiGLU the gate Wg (H, C) (`c_gate`), bg.
#[derive(Clone, Copy)]
pub struct ExpertParams<'a> {
    pub w1: &'a Tensor,
    pub b1: Option<&'a Tensor>,
    pub w2: &'a Tensor,
    pub b2: Option<&'a Tensor>,
    /// SwiGLU's gate (None: a GELU expert).
    pub wg: Option<&'a Tensor>,
    pub bg: Option<&'a Tensor>,
}

impl<'a> ExpertParams<'a> {
    /// The parameters in packing order, absent ones as None.
    fn all(&self) -> [Option<&'a Tensor>; 6] {
        [Some(self.w1), self.b1, Some(self.w2), self.b2, self.wg, self.bg]
    }
}

impl ExpertMlp {
    fn per_expert(&self) -> usize {
        self.ranges(0).iter().map(|r| r.len()).sum()
    }

    fn experts(&self) -> usize {
        self.offsets.len() - 1
    }

    /// (w1, b1, w2, b2, wg, bg) ranges of expert e in the packed buffer (empty when absent).
    fn ranges(&self, e: usize) -> [std::ops::Range<usize>; 6] {
        let (c, h) = (self.c, self.h);
        let lens = [
            h * c,
            if self.bias { h } else { 0 },
            c * h,
            if self.bias { c } else { 0 },
            if self.gated { h * c } else { 0 },
            if self.gated && self.bias { h } else { 0 },
        ];
        let mut at = e * lens.iter().sum::<usize>();
        lens.map(|n| {
            at += n;
            at - n..at
        })
    }

    /// Each expert's weights in the packed buffer `p`.
    fn weights<'a, T>(&self, p: &'a [T]) -> Vec<Weights<'a, T>> {
        (0..self.experts())
            .map(|e| {
                let [w1, b1, w2, b2, wg, bg] = self.ranges(e).map(|r| &p[r]);
                Weights { w1, b1, w2, b2, wg, bg }
            })
            .collect()
    }
}

/// The experts that got rows, and the offsets of their blocks: (active experts, E' + 1 offsets).
fn active<'a>(experts: &[ExpertParams<'a>], offsets: &[u32]) -> Result<(Vec<ExpertParams<'a>>, Vec<u32>)> {
    if offsets.len() != experts.len() + 1 {
        candle_core::bail!("expert_mlp: {} offsets for {} experts", offsets.len(), experts.len());
    }
    let mut kept = Vec::with_capacity(experts.len());
    let mut offs = vec![offsets[0]];
    for (e, p) in experts.iter().enumerate() {
        if offsets[e + 1] < offsets[e] {
            candle_core::bail!("expert_mlp: offsets decrease at expert {e}: {} then {}", offsets[e], offsets[e + 1]);
        }
        if offsets[e + 1] > offsets[e] {
            kept.push(*p);
            offs.push(offsets[e + 1]);
        }
    }
    Ok((kept, offs))
}

/// (H, bias, gated) of the experts, checked against rows of width `c` and the offsets' last entry `n`.
fn check_experts(experts: &[ExpertParams], offsets: &[u32], n: usize, c: usize) -> Result<(usize, bool, bool)> {
    let (h, wc) = experts.first().map(|p| p.w1.dims2()).transpose()?.unwrap_or((0, c));
    let bias = experts.first().is_some_and(|p| p.b1.is_some() && p.b2.is_some());
    let gated = experts.first().is_some_and(|p| p.wg.is_some());
    if offsets.len() != experts.len() + 1 || wc != c || offsets.last().copied() != Some(n as u32) {
        candle_core::bail!(
            "expert_mlp: {} experts of C = {wc} with {} offsets (last {:?}) for {n} rows of C = {c}",
            experts.len(),
            offsets.len(),
            offsets.last()
        );
    }
    for p in experts {
        let ok = p.w1.dims() == [h, c]
            && p.w2.dims() == [c, h]
            && p.b1.map_or(!bias, |b| bias && b.dims() == [h])
            && p.b2.map_or(!bias, |b| bias && b.dims() == [c])
            && p.wg.map_or(!gated, |w| gated && w.dims() == [h, c])
            && p.bg.map_or(!(gated && bias), |b| gated && bias && b.dims() == [h]);
        if !ok {
            candle_core::bail!(
                "expert_mlp: expert parameters are not all (H, C) = ({h}, {c}) and (C, H), with the same biases \
                 and gates (bias {bias}, gated {gated})"
            );
        }
    }
    Ok((h, bias, gated))
}

/// xs: (N_kept, C) rows grouped by expert (`offsets`, E + 1 entries) -> (N_kept, C), the graph
/// form: every active expert's parameter gets its gradient through autograd.
pub fn expert_mlp(xs: &Tensor, experts: &[ExpertParams], offsets: &[u32]) -> Result<Tensor> {
    if !xs.device().is_cpu() {
        return per_expert(xs, experts, offsets, true);
    }
    let (n, c) = xs.dims2()?;
    let (h, bias, gated) = check_experts(experts, offsets, n, c)?;
    let (experts, offsets) = active(experts, offsets)?;
    if experts.is_empty() {
        return xs.zeros_like();
    }
    let flat: Vec<Tensor> =
        experts.iter().flat_map(|p| p.all()).flatten().map(|t| t.flatten_all()).collect::<Result<_>>()?;
    let packed = Tensor::cat(&flat, 0)?;
    xs.contiguous()?.apply_op2(&packed, ExpertMlp { c, h, bias, gated, offsets: Arc::new(offsets) })
}

/// The plain-tensor twin: a loop of Candle ops per expert, then the blocks concatenated.
pub fn expert_mlp_reference(xs: &Tensor, experts: &[ExpertParams], offsets: &[u32]) -> Result<Tensor> {
    per_expert(xs, experts, offsets, false)
}

/// x W^T + b.
fn affine(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.matmul(&w.t()?)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// The loop of Candle ops per expert, then the blocks concatenated; the activation as the
/// [`gelu`](super::gelu()) / [`swiglu`] ops (`fused`) or their plain-tensor twins.
fn per_expert(xs: &Tensor, experts: &[ExpertParams], offsets: &[u32], fused: bool) -> Result<Tensor> {
    let (experts, offsets) = active(experts, offsets)?;
    let mut outs = Vec::new();
    for (e, p) in experts.iter().enumerate() {
        let (a, b) = (offsets[e] as usize, offsets[e + 1] as usize);
        let x = xs.narrow(0, a, b - a)?;
        let hd = affine(&x, p.w1, p.b1)?;
        let act = match (p.wg, fused) {
            (Some(wg), true) => swiglu(&affine(&x, wg, p.bg)?, &hd)?,
            (Some(wg), false) => swiglu_reference(&affine(&x, wg, p.bg)?, &hd)?,
            (None, true) => super::gelu::gelu(&hd)?,
            (None, false) => super::gelu::gelu_reference(&hd)?,
        };
        let mut y = act.matmul(&p.w2.t()?)?;
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

impl ExpertMlp {
    fn bwd_cpu<T: Normal>(&self, x: &[T], p: &[T], dy: &[T]) -> Vec<T> {
        let rows = x.len() / self.c;
        // [dx; dparams], each expert writing its own row block of dx and its own parameters.
        let mut out = out_vec::<T>(rows * self.c + p.len());
        let (dx, mut g_rest) = out.split_at_mut(rows * self.c);
        let mut gs = Vec::with_capacity(self.experts());
        for e in 0..self.experts() {
            let [w1, b1, w2, b2, wg, bg] = self.ranges(e).map(|r| r.len());
            let (g, r) = std::mem::take(&mut g_rest).split_at_mut(self.per_expert());
            g_rest = r;
            let (gw1, r) = g.split_at_mut(w1);
            let (gb1, r) = r.split_at_mut(b1);
            let (gw2, r) = r.split_at_mut(w2);
            let (gb2, r) = r.split_at_mut(b2);
            let (gwg, gbg) = r.split_at_mut(wg);
            debug_assert_eq!(gbg.len(), bg);
            gs.push(Grads { w1: gw1, b1: gb1, w2: gw2, b2: gb2, wg: gwg, bg: gbg });
        }
        kernels::backward_all(x, dy, None, &self.weights(p), &self.offsets, self.c, self.h, dx, gs);
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
        macro_rules! run {
            ($t:ty, $x:expr) => {{
                let p = &<$t>::slice(sp, "params", "expert-mlp")?[pa..pz];
                <$t>::storage(
                    kernels::forward_all(&$x[xa..xz], &self.weights(p), &self.offsets, self.c, self.h, false).0,
                )
            }};
        }
        let out = match sx {
            CpuStorage::F32(x) => run!(f32, x),
            CpuStorage::F64(x) => run!(f64, x),
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
