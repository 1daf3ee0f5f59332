//! The causal attention core as one op each way. It reads q, k, v straight from the (B, T, 3C)
//! projection, rotates q and k (RoPE, half-split) when given tables, and per (batch, head) computes
//! softmax(q k^T / sqrt(hs)) with the causal mask inside the loops, times v, into (B, T, C). The
//! backward ([`AttentionBwd`], itself an op) recomputes the probabilities from q and k (nothing of
//! size T x T is kept between the passes) and returns d(qkv) in the projection's layout. Per head
//! the products are `gemm` calls on the (T, T) scores (the half above the diagonal computed, then
//! zeroed). No attention dropout (with dropout on, the model uses the composite path). CPU kernel
//! here; on other devices [`causal_attention`] runs the twin [`causal_attention_reference`].

use super::backend::cpu::{contiguous, out_vec, Float};
use super::backend::simd::widest;
use super::float::{dot, max_of, sum_of};
use super::gemm::{matmul, matmul_strided, Mat};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;
use std::sync::Arc;

/// The row (query) and column (key) blocks of the causal products: a query block sees the keys
/// up to its last row only.
pub const CAUSAL_BLOCK: usize = 64;

/// The blocks `[r0, r1)` of `0..t`, [`CAUSAL_BLOCK`] long but the last.
fn blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t).step_by(CAUSAL_BLOCK).map(move |r0| (r0, (r0 + CAUSAL_BLOCK).min(t)))
}

/// RoPE tables: cos and sin of position t times frequency i, (t_max, hs / 2) row-major, as f32
/// (the values the composite rotary multiplies by).
#[derive(Clone, Debug)]
pub struct RopeTables {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub half: usize,
    pub t_max: usize,
}

impl RopeTables {
    /// nanoGPT/Llama RoPE: frequency theta^(-2i / hs).
    pub fn new(head_size: usize, t_max: usize, theta: f64) -> Self {
        let half = head_size / 2;
        let (mut cos, mut sin) = (Vec::with_capacity(t_max * half), Vec::with_capacity(t_max * half));
        for t in 0..t_max {
            for i in 0..half {
                let a = t as f64 / theta.powf(2.0 * i as f64 / head_size as f64);
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Self { cos, sin, half, t_max }
    }
}

/// The op: head count and optional rotary tables.
#[derive(Clone, Debug)]
pub struct CausalAttention {
    pub n_head: usize,
    pub rope: Option<Arc<RopeTables>>,
}

/// qkv: (B, T, 3C) -> (B, T, C), C = n_head * hs.
pub fn causal_attention(qkv: &Tensor, n_head: usize, rope: Option<&Arc<RopeTables>>) -> Result<Tensor> {
    if !qkv.device().is_cpu() {
        return causal_attention_reference(qkv, n_head, rope);
    }
    qkv.contiguous()?.apply_op1(CausalAttention { n_head, rope: rope.cloned() })
}

/// The plain-tensor twin of [`causal_attention`] (differentiable Candle ops, an additive mask).
pub fn causal_attention_reference(qkv: &Tensor, n_head: usize, rope: Option<&Arc<RopeTables>>) -> Result<Tensor> {
    let (b, t, c3) = qkv.dims3()?;
    let c = c3 / 3;
    let hs = c / n_head;
    let split = |i: usize| qkv.narrow(2, i * c, c)?.reshape((b, t, n_head, hs))?.transpose(1, 2)?.contiguous();
    let (mut q, mut k, v) = (split(0)?, split(1)?, split(2)?); // (B, nh, T, hs)
    if let Some(r) = rope {
        let table =
            |v: &[f32]| Tensor::from_slice(v, (r.t_max, r.half), qkv.device())?.to_dtype(qkv.dtype())?.narrow(0, 0, t);
        let (cos, sin) = (table(&r.cos)?, table(&r.sin)?);
        q = rotate_half(&q, &cos, &sin)?;
        k = rotate_half(&k, &cos, &sin)?;
    }
    let mask = causal_mask(t, qkv.dtype(), qkv.device())?;
    let att = (q.matmul(&k.t()?)? * (1.0 / (hs as f64).sqrt()))?.broadcast_add(&mask)?;
    let max = att.max_keepdim(D::Minus1)?.detach();
    let e = att.broadcast_sub(&max)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    p.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c))
}

/// RoPE on (B, nh, T, hs) with cos, sin (T, hs / 2), from differentiable ops (narrow, mul, cat).
pub fn rotate_half(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let (x1, x2) = (x.narrow(3, 0, half)?, x.narrow(3, half, half)?);
    let r1 = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let r2 = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Tensor::cat(&[r1, r2], 3)
}

/// An additive causal mask (T, T): 0 on and below the diagonal, a large negative number above.
/// A finite value (not -inf) keeps every intermediate finite.
pub fn causal_mask(t: usize, dtype: candle_core::DType, device: &candle_core::Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..t).flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { -1e9 })).collect();
    Tensor::from_vec(data, (t, t), device)?.to_dtype(dtype)
}

/// Shapes of one call: (B, T, C, hs).
fn dims(l: &Layout, n_head: usize, rope: &Option<Arc<RopeTables>>, op: &str) -> Result<(usize, usize, usize, usize)> {
    let d = l.dims();
    if d.len() != 3 || !d[2].is_multiple_of(3) {
        candle_core::bail!("{op}: qkv must be (B, T, 3C), got {:?}", l.shape());
    }
    let (b, t, c) = (d[0], d[1], d[2] / 3);
    if n_head == 0 || c % n_head != 0 {
        candle_core::bail!("{op}: C = {c} is not a multiple of n_head = {n_head}");
    }
    let hs = c / n_head;
    if let Some(r) = rope {
        if 2 * r.half != hs || t > r.t_max {
            candle_core::bail!(
                "{op}: rotary tables for hs {} up to T {} do not fit hs {hs}, T {t}",
                2 * r.half,
                r.t_max
            );
        }
    }
    Ok((b, t, c, hs))
}

/// One head's q and k (rotated), each (T, hs) row-major, from the (T, 3C) rows of a batch.
struct Head<T> {
    q: Vec<T>,
    k: Vec<T>,
}

impl CausalAttention {
    fn load<T: Float>(&self, rows: &[T], t: usize, c: usize, hs: usize, h: usize) -> Head<T> {
        let take = |part: usize| -> Vec<T> {
            let mut out = Vec::with_capacity(t * hs);
            for ti in 0..t {
                let s = ti * 3 * c + part * c + h * hs;
                out.extend_from_slice(&rows[s..s + hs]);
            }
            out
        };
        let (mut q, mut k) = (take(0), take(1));
        if let Some(r) = &self.rope {
            rotate(&mut q, r, t, hs, false);
            rotate(&mut k, r, t, hs, false);
        }
        Head { q, k }
    }

    /// The probabilities P (T, T) of one head: softmax of the scaled scores over j <= i, 0 above
    /// the diagonal.
    fn probs<T: Float>(hd: &Head<T>, t: usize, hs: usize) -> Vec<T> {
        let scale = T::from_f64(1.0 / (hs as f64).sqrt());
        let mut p = out_vec::<T>(t * t);
        for (r0, r1) in blocks(t) {
            // q k^T of rows r0..r1 against keys 0..r1; the rest of the rows is zeroed below.
            matmul_strided(&mut p[r0 * t..], t, Mat::rows(&hd.q[r0 * hs..], r1 - r0, hs), Mat::t(&hd.k, hs, r1), false);
        }
        causal_softmax_rows(&mut p, t, scale);
        p
    }

    /// Rows r0..r1 of a row-major (T, T) matrix, columns 0..r1 (the causal part of a row block).
    fn row_block<T>(m: &[T], t: usize, r0: usize, r1: usize) -> Mat<'_, T> {
        Mat { data: &m[r0 * t..], rows: r1 - r0, cols: r1, rs: t, cs: 1 }
    }

    /// Columns c0..c1 of a row-major (T, T) matrix, rows c0..T (the causal part of a column
    /// block), transposed: (c1 - c0, T - c0).
    fn col_block_t<T>(m: &[T], t: usize, c0: usize, c1: usize) -> Mat<'_, T> {
        Mat { data: &m[c0 * t + c0..], rows: c1 - c0, cols: t - c0, rs: 1, cs: t }
    }

    /// v of head h as a (T, hs) view of the (T, 3C) rows.
    fn v<'a, T>(rows: &'a [T], t: usize, c: usize, hs: usize, h: usize) -> Mat<'a, T> {
        Mat { data: &rows[2 * c + h * hs..], rows: t, cols: hs, rs: 3 * c, cs: 1 }
    }

    /// y of one head, (T, hs).
    fn fwd_head<T: Float>(&self, rows: &[T], t: usize, c: usize, hs: usize, h: usize) -> Vec<T> {
        let p = Self::probs(&self.load(rows, t, c, hs, h), t, hs);
        let mut y = out_vec::<T>(t * hs);
        let v = Self::v(rows, t, c, hs, h);
        for (r0, r1) in blocks(t) {
            matmul(&mut y[r0 * hs..r1 * hs], Self::row_block(&p, t, r0, r1), Mat { rows: r1, ..v }, false);
        }
        y
    }

    fn fwd_cpu<T: Float>(&self, x: &[T], b: usize, t: usize, c: usize, hs: usize) -> Vec<T> {
        let nh = self.n_head;
        let heads: Vec<Vec<T>> = (0..b * nh)
            .into_par_iter()
            .map(|bh| self.fwd_head(&x[(bh / nh) * t * 3 * c..(bh / nh + 1) * t * 3 * c], t, c, hs, bh % nh))
            .collect();
        let mut y = out_vec::<T>(b * t * c);
        for (bh, hy) in heads.iter().enumerate() {
            let (bi, h) = (bh / nh, bh % nh);
            for ti in 0..t {
                let dst = (bi * t + ti) * c + h * hs;
                y[dst..dst + hs].copy_from_slice(&hy[ti * hs..(ti + 1) * hs]);
            }
        }
        y
    }

    /// d(q, k, v) of one head, each (T, hs), from dy and y (B's (T, C) rows).
    #[allow(clippy::too_many_arguments)]
    fn bwd_head<T: Float>(
        &self,
        rows: &[T],
        y: &[T],
        dy: &[T],
        t: usize,
        c: usize,
        hs: usize,
        h: usize,
    ) -> [Vec<T>; 3] {
        let hd = self.load(rows, t, c, hs, h);
        let scale = T::from_f64(1.0 / (hs as f64).sqrt());
        let p = Self::probs(&hd, t, hs);
        // dy of this head from row r on, (T - r, hs).
        let dyh = |r: usize, rows: usize| Mat { data: &dy[r * c + h * hs..], rows, cols: hs, rs: c, cs: 1 };
        // dP = dY v^T, then dS = P (dP - D_i) * scale with D_i = dy_i . y_i = sum_j P_ij dP_ij.
        let mut ds = out_vec::<T>(t * t);
        let v = Self::v(rows, t, c, hs, h);
        for (r0, r1) in blocks(t) {
            let vt = Mat { data: v.data, rows: hs, cols: r1, rs: 1, cs: 3 * c };
            matmul_strided(&mut ds[r0 * t..], t, dyh(r0, r1 - r0), vt, false);
        }
        softmax_bwd_rows(&mut ds, &p, &dy[h * hs..], &y[h * hs..], t, hs, c, scale);
        let (mut dq, mut dk, mut dv) = (out_vec::<T>(t * hs), out_vec::<T>(t * hs), out_vec::<T>(t * hs));
        for (r0, r1) in blocks(t) {
            // dS k for query rows r0..r1; dS^T q and P^T dY for key rows r0..r1.
            matmul(&mut dq[r0 * hs..r1 * hs], Self::row_block(&ds, t, r0, r1), Mat::rows(&hd.k, r1, hs), false);
            let q = Mat::rows(&hd.q[r0 * hs..], t - r0, hs);
            matmul(&mut dk[r0 * hs..r1 * hs], Self::col_block_t(&ds, t, r0, r1), q, false);
            matmul(&mut dv[r0 * hs..r1 * hs], Self::col_block_t(&p, t, r0, r1), dyh(r0, t - r0), false);
        }
        if let Some(r) = &self.rope {
            rotate(&mut dq, r, t, hs, true);
            rotate(&mut dk, r, t, hs, true);
        }
        [dq, dk, dv]
    }
}

widest! {
    /// Row i of the (T, T) scores in place: the softmax of scale * s_ij over j <= i, 0 above
    /// the diagonal. Separate passes (scale, max, exp, sum, normalise) so each one vectorizes.
    fn causal_softmax_rows<T: Float>(p: &mut [T], t: usize, scale: T) {
        for (i, row) in p.chunks_mut(t).enumerate() {
            let live = &mut row[..=i];
            for v in live.iter_mut() {
                *v = *v * scale;
            }
            let m = max_of(live);
            for v in live.iter_mut() {
                *v = (*v - m).exp();
            }
            let inv = T::ONE / sum_of(live);
            for v in live.iter_mut() {
                *v = *v * inv;
            }
            row[i + 1..].fill(T::ZERO);
        }
    }
}

widest! {
    /// dS = P (dP - D_i) * scale in place of dP (T, T), D_i = dy_i . y_i; dy and y start at the
    /// head's column, rows `c` apart.
    #[allow(clippy::too_many_arguments)]
    fn softmax_bwd_rows<T: Float>(ds: &mut [T], p: &[T], dy: &[T], y: &[T], t: usize, hs: usize, c: usize, scale: T) {
        for (i, row) in ds.chunks_mut(t).enumerate() {
            let o = i * c;
            let di = dot(&dy[o..o + hs], &y[o..o + hs]);
            let pr = &p[i * t..(i + 1) * t];
            for j in 0..=i {
                row[j] = pr[j] * (row[j] - di) * scale;
            }
            row[i + 1..].fill(T::ZERO);
        }
    }
}

widest! {
/// RoPE on (T, hs) rows in place; `inverse` applies the transpose (the backward).
fn rotate<T: Float>(x: &mut [T], r: &RopeTables, t: usize, hs: usize, inverse: bool) {
    let half = r.half;
    for ti in 0..t {
        let row = &mut x[ti * hs..(ti + 1) * hs];
        for i in 0..half {
            let (c, s) = (T::from_f64(r.cos[ti * half + i] as f64), T::from_f64(r.sin[ti * half + i] as f64));
            let (x1, x2) = (row[i], row[half + i]);
            if inverse {
                row[i] = x1 * c + x2 * s;
                row[half + i] = x2 * c - x1 * s;
            } else {
                row[i] = x1 * c - x2 * s;
                row[half + i] = x2 * c + x1 * s;
            }
        }
    }
}
}

impl CustomOp1 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, t, c, hs) = dims(l, self.n_head, &self.rope, "causal-attention")?;
        let (a, z) = contiguous(l, "qkv", "causal-attention")?;
        let out = match s {
            CpuStorage::F32(v) => f32::storage(self.fwd_cpu(&v[a..z], b, t, c, hs)),
            CpuStorage::F64(v) => f64::storage(self.fwd_cpu(&v[a..z], b, t, c, hs)),
            other => candle_core::bail!("causal-attention: f32 or f64 input required, got {:?}", other.dtype()),
        };
        Ok((out, Shape::from((b, t, c))))
    }

    fn bwd(&self, qkv: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(qkv.apply_op3_no_bwd(y, &grad.contiguous()?, &AttentionBwd(self.clone()))?))
    }
}

/// The backward of [`CausalAttention`]: (qkv, y, dy) -> d(qkv), (B, T, 3C).
#[derive(Clone, Debug)]
pub struct AttentionBwd(pub CausalAttention);

impl AttentionBwd {
    #[allow(clippy::too_many_arguments)]
    fn run<T: Float>(&self, x: &[T], y: &[T], dy: &[T], b: usize, t: usize, c: usize, hs: usize) -> Vec<T> {
        let op = &self.0;
        let nh = op.n_head;
        let heads: Vec<[Vec<T>; 3]> = (0..b * nh)
            .into_par_iter()
            .map(|bh| {
                let bi = bh / nh;
                let rows = &x[bi * t * 3 * c..(bi + 1) * t * 3 * c];
                let (ys, dys) = (&y[bi * t * c..(bi + 1) * t * c], &dy[bi * t * c..(bi + 1) * t * c]);
                op.bwd_head(rows, ys, dys, t, c, hs, bh % nh)
            })
            .collect();
        let mut dx = out_vec::<T>(b * t * 3 * c);
        for (bh, parts) in heads.iter().enumerate() {
            let (bi, h) = (bh / nh, bh % nh);
            for (part, g) in parts.iter().enumerate() {
                for ti in 0..t {
                    let dst = (bi * t + ti) * 3 * c + part * c + h * hs;
                    dx[dst..dst + hs].copy_from_slice(&g[ti * hs..(ti + 1) * hs]);
                }
            }
        }
        dx
    }
}

impl CustomOp3 for AttentionBwd {
    fn name(&self) -> &'static str {
        "causal-attention-bwd"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sy: &CpuStorage,
        ly: &Layout,
        sd: &CpuStorage,
        ld: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = "causal-attention-bwd";
        let (b, t, c, hs) = dims(lx, self.0.n_head, &self.0.rope, op)?;
        for (l, what) in [(ly, "y"), (ld, "dy")] {
            if l.dims() != [b, t, c] {
                candle_core::bail!("{op}: {what} must be ({b}, {t}, {c}), got {:?}", l.shape());
            }
        }
        let (xa, xz) = contiguous(lx, "qkv", op)?;
        let (ya, yz) = contiguous(ly, "y", op)?;
        let (da, dz) = contiguous(ld, "dy", op)?;
        macro_rules! run {
            ($t:ty) => {{
                let x = &<$t>::slice(sx, "qkv", op)?[xa..xz];
                let y = &<$t>::slice(sy, "y", op)?[ya..yz];
                let dy = &<$t>::slice(sd, "dy", op)?[da..dz];
                <$t>::storage(self.run(x, y, dy, b, t, c, hs))
            }};
        }
        let out = match sx {
            CpuStorage::F32(_) => run!(f32),
            CpuStorage::F64(_) => run!(f64),
            other => candle_core::bail!("{op}: f32 or f64 input required, got {:?}", other.dtype()),
        };
        Ok((out, Shape::from((b, t, 3 * c))))
    }
}
