//! The CPU kernels of the expert MLP ops, over each expert's own weight slices: one expert's
//! forward and backward, and every expert of a call in parallel (deterministic: each expert
//! writes only its own rows and its own gradients). GELU experts: y = gelu(x W1^T + b1) W2^T + b2;
//! SwiGLU experts (a gate Wg): y = (silu(x Wg^T + bg) (x W1^T + b1)) W2^T + b2. The forward can
//! keep what the backward needs, which otherwise recomputes it: for GELU the activation
//! A = gelu(U) and its derivative gelu'(U), U = x W1^T + b1 (so the backward computes no GELU);
//! for SwiGLU the pre-activations U and G = x Wg^T + bg. An expert with tens of rows keeps its
//! hidden activations transposed ([`Hidden`]).

use super::super::backend::cpu::out_vec;
use super::super::float::{add_per_row, add_rows, col_sum, mul_into, row_sums};
use super::super::gelu::{gelu_act_and_deriv, Normal};
use super::super::gemm::{matmul, matmul_par, Mat};
use super::super::swiglu::{swiglu_act_and_grad, swiglu_chunk};
use rayon::prelude::*;

/// One expert's weights: W1 (H, C), b1 (H), W2 (C, H), b2 (C), and for SwiGLU the gate Wg (H, C),
/// bg (H); the biases empty when there are none, wg and bg empty for GELU.
#[derive(Clone, Copy)]
pub(super) struct Weights<'a, T> {
    pub w1: &'a [T],
    pub b1: &'a [T],
    pub w2: &'a [T],
    pub b2: &'a [T],
    pub wg: &'a [T],
    pub bg: &'a [T],
}

impl<T> Weights<'_, T> {
    /// SwiGLU (a gate) rather than GELU.
    fn gated(&self) -> bool {
        !self.wg.is_empty()
    }
}

/// One expert's gradients, shaped as its [`Weights`].
pub(super) struct Grads<'a, T> {
    pub w1: &'a mut [T],
    pub b1: &'a mut [T],
    pub w2: &'a mut [T],
    pub b2: &'a mut [T],
    pub wg: &'a mut [T],
    pub bg: &'a mut [T],
}

/// A matrix product: [`matmul`] (one thread: the experts of a call run in parallel) or, for a
/// call with one expert (a dense block), [`matmul_par`].
type MatMul<T> = fn(&mut [T], Mat<'_, T>, Mat<'_, T>, bool);

/// The product for a call with `experts` experts.
fn matmul_for<T: Normal>(experts: usize) -> MatMul<T> {
    if experts == 1 {
        matmul_par
    } else {
        matmul
    }
}

/// The experts whose hidden activations lie transposed, by their row count. Each product then
/// packs the expert's few rows for gemm's microkernel instead of its H x C weights, which so few
/// rows would re-read too rarely to repay the packing. `scripts/bench_sgemm.sh` times both layouts
/// (docs/performance.md): transposed was faster from 16 to 256 rows, slower at 3 rows (the
/// microkernel's 16 lanes then run along the rows) and at 2048 rows.
const TRANSPOSED_ROWS: std::ops::RangeInclusive<usize> = 16..=256;

/// How one expert's hidden activations (U, G, the activation A and their gradients: n rows of H
/// each) lie in memory: rows (n, H), or transposed (H, n) for the row counts of [`TRANSPOSED_ROWS`].
#[derive(Clone, Copy)]
struct Hidden {
    n: usize,
    h: usize,
    transposed: bool,
}

impl Hidden {
    fn new(n: usize, h: usize) -> Self {
        Self { n, h, transposed: TRANSPOSED_ROWS.contains(&n) }
    }

    /// A hidden buffer as the (n, H) matrix.
    fn m<'a, T>(&self, d: &'a [T]) -> Mat<'a, T> {
        self.mt(d).transposed()
    }

    /// A hidden buffer as the (H, n) matrix.
    fn mt<'a, T>(&self, d: &'a [T]) -> Mat<'a, T> {
        if self.transposed {
            Mat::rows(d, self.h, self.n)
        } else {
            Mat::t(d, self.h, self.n)
        }
    }

    /// The hidden buffer dst = a b^T + bias, from a (n, K) and b (H, K): a pre-activation
    /// (b = W1), or dA = dY W2 (b = W2^T, no bias).
    fn product<T: Normal>(&self, mm: MatMul<T>, dst: &mut [T], a: Mat<T>, b: Mat<T>, bias: &[T]) {
        if self.transposed {
            mm(dst, b, a.transposed(), false); // (H, n) = b a^T
            add_per_row(dst, bias);
        } else {
            mm(dst, a, b.transposed(), false); // (n, H)
            add_rows(dst, bias);
        }
    }

    /// The sums over the n rows (a bias gradient), with the bits of `col_sum` on the row layout.
    fn sums<T: Normal>(&self, d: &[T]) -> Vec<T> {
        if self.transposed {
            row_sums(d, self.h)
        } else {
            col_sum(d, self.h)
        }
    }
}

/// What the forward keeps per row of one expert, 2H: A then gelu'(U) for GELU, U then G for
/// SwiGLU.
fn kept_width(h: usize) -> usize {
    2 * h
}

/// Pre-activations of one expert's n rows into `pre`, laid out as `hid` says: U (n, H) =
/// x W1^T + b1, then for SwiGLU G (n, H) = x Wg^T + bg.
fn hidden_into<T: Normal>(mm: MatMul<T>, pre: &mut [T], x: &[T], w: &Weights<T>, hid: Hidden, c: usize) {
    let (n, h) = (hid.n, hid.h);
    let (u, g) = pre.split_at_mut(n * h);
    hid.product(mm, u, Mat::rows(x, n, c), Mat::rows(w.w1, h, c), w.b1);
    if w.gated() {
        hid.product(mm, g, Mat::rows(x, n, c), Mat::rows(w.wg, h, c), w.bg);
    }
}

/// What the backward needs of one expert's n rows, into `kept` (n x [`kept_width`], laid out as
/// `hid` says): for GELU A = gelu(U) then gelu'(U), for SwiGLU U then G.
fn kept_into<T: Normal>(mm: MatMul<T>, kept: &mut [T], x: &[T], w: &Weights<T>, hid: Hidden, c: usize) {
    hidden_into(mm, kept, x, w, hid, c);
    if !w.gated() {
        let (u, d) = kept.split_at_mut(hid.n * hid.h);
        gelu_act_and_deriv(u, d);
    }
}

/// y (n, C) = act W2^T + b2 of one expert's rows x (n, C), act = gelu(U) or silu(G) U, with what
/// the backward needs written to `kept` (n x [`kept_width`], [`kept_into`]).
fn forward<T: Normal>(mm: MatMul<T>, x: &[T], w: &Weights<T>, c: usize, h: usize, y: &mut [T], kept: &mut [T]) {
    let n = x.len() / c;
    if n == 0 {
        return;
    }
    let hid = Hidden::new(n, h);
    kept_into(mm, kept, x, w, hid, c);
    let (k1, k2) = kept.split_at(n * h);
    let swiglu_act;
    let act = if w.gated() {
        let mut a = out_vec::<T>(n * h);
        swiglu_chunk(&mut a, k2, k1);
        swiglu_act = a;
        &swiglu_act[..]
    } else {
        k1
    };
    if hid.transposed {
        // y^T (C, n) = W2 A^T, then y its transpose: a copy of n x C instead of packing W2.
        let mut yt = out_vec::<T>(c * n);
        mm(&mut yt, Mat::rows(w.w2, c, h), hid.mt(act), false);
        for (i, row) in y.chunks_mut(c).enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = yt[j * n + i];
            }
        }
    } else {
        mm(y, hid.m(act), Mat::t(w.w2, h, c), false);
    }
    add_rows(y, w.b2);
}

/// One expert's backward from its rows x (n, C), dy (n, C) and, when the forward kept it, what
/// [`kept_into`] gives: writes dx (n, C) and every gradient of `g` (the biases' only when they are
/// not empty).
#[allow(clippy::too_many_arguments)]
fn backward<T: Normal>(
    mm: MatMul<T>,
    x: &[T],
    dy: &[T],
    kept: Option<&[T]>,
    w: &Weights<T>,
    c: usize,
    h: usize,
    dx: &mut [T],
    g: Grads<T>,
) {
    let n = x.len() / c;
    if n == 0 {
        for v in [g.w1, g.b1, g.w2, g.b2, g.wg, g.bg] {
            v.fill(T::ZERO);
        }
        return;
    }
    let gated = w.gated();
    let hid = Hidden::new(n, h);
    let recomputed;
    let kept = match kept {
        Some(k) => k,
        None => {
            recomputed = {
                let mut k = out_vec::<T>(n * kept_width(h));
                kept_into(mm, &mut k, x, w, hid, c);
                k
            };
            &recomputed
        }
    };
    let (k1, k2) = kept.split_at(n * h);
    let mut du = out_vec::<T>(n * h);
    let mut dg = out_vec::<T>(if gated { n * h } else { 0 });
    // dA = dY W2, then through the activation: dU = dA gelu'(U), or dU = dA silu(G) and
    // dG = dA U silu'(G).
    hid.product(mm, &mut du, Mat::rows(dy, n, c), Mat::t(w.w2, h, c), &[]);
    let swiglu_act;
    let act = if gated {
        let mut a = out_vec::<T>(n * h);
        swiglu_act_and_grad(&mut du, &mut dg, &mut a, k2, k1);
        swiglu_act = a;
        &swiglu_act[..]
    } else {
        mul_into(&mut du, k2);
        k1
    };
    mm(g.w2, Mat::t(dy, c, n), hid.m(act), false); // dW2 = dY^T A
    mm(g.w1, hid.mt(&du), Mat::rows(x, n, c), false); // dW1 = dU^T X
    if !g.b1.is_empty() {
        g.b1.copy_from_slice(&hid.sums(&du));
    }
    if !g.b2.is_empty() {
        g.b2.copy_from_slice(&col_sum(dy, c));
    }
    mm(dx, hid.m(&du), Mat::rows(w.w1, h, c), false); // dX = dU W1
    if gated {
        mm(g.wg, hid.mt(&dg), Mat::rows(x, n, c), false); // dWg = dG^T X
        if !g.bg.is_empty() {
            g.bg.copy_from_slice(&hid.sums(&dg));
        }
        mm(dx, hid.m(&dg), Mat::rows(w.wg, h, c), true); // dX += dG Wg
    }
}

/// The rows [offsets[e], offsets[e + 1]) of x (N, C) through expert e, for every expert, in
/// parallel -> (y (N, C), with `keep` what the backward needs: each expert's block of
/// n_e x [`kept_width`] ([`kept_into`]), in expert order).
pub(super) fn forward_all<T: Normal>(
    x: &[T],
    ws: &[Weights<T>],
    offsets: &[u32],
    c: usize,
    h: usize,
    keep: bool,
) -> (Vec<T>, Option<Vec<T>>) {
    let rows = x.len() / c;
    let hp = kept_width(h);
    let (mut y, mut kept) = (out_vec::<T>(rows * c), out_vec::<T>(rows * hp));
    let mut pieces = Vec::with_capacity(ws.len());
    let (mut y_rest, mut kept_rest) = (&mut y[..], &mut kept[..]);
    for e in 0..ws.len() {
        let n = (offsets[e + 1] - offsets[e]) as usize;
        let (ye, r) = std::mem::take(&mut y_rest).split_at_mut(n * c);
        let (pe, rp) = std::mem::take(&mut kept_rest).split_at_mut(n * hp);
        (y_rest, kept_rest) = (r, rp);
        pieces.push((e, ye, pe));
    }
    let mm = matmul_for(ws.len());
    pieces.into_par_iter().for_each(|(e, ye, pe)| {
        forward(mm, &x[offsets[e] as usize * c..offsets[e + 1] as usize * c], &ws[e], c, h, ye, pe);
    });
    (y, keep.then_some(kept))
}

/// The backward of [`forward_all`]: writes dx (N, C), and expert e's gradients into `gs[e]`;
/// `kept`: what the forward kept, or None to recompute it.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward_all<T: Normal>(
    x: &[T],
    dy: &[T],
    kept: Option<&[T]>,
    ws: &[Weights<T>],
    offsets: &[u32],
    c: usize,
    h: usize,
    dx: &mut [T],
    gs: Vec<Grads<T>>,
) {
    assert_eq!(gs.len(), ws.len(), "expert_mlp: {} gradient sets for {} experts", gs.len(), ws.len());
    let hp = kept_width(h);
    let mut pieces = Vec::with_capacity(ws.len());
    let mut dx_rest = dx;
    for (e, g) in gs.into_iter().enumerate() {
        let n = (offsets[e + 1] - offsets[e]) as usize;
        let (dxe, r) = std::mem::take(&mut dx_rest).split_at_mut(n * c);
        dx_rest = r;
        pieces.push((e, dxe, g));
    }
    let mm = matmul_for(ws.len());
    pieces.into_par_iter().for_each(|(e, dxe, g)| {
        let (a, b) = (offsets[e] as usize, offsets[e + 1] as usize);
        let kept = kept.map(|p| &p[a * hp..b * hp]);
        backward(mm, &x[a * c..b * c], &dy[a * c..b * c], kept, &ws[e], c, h, dxe, g);
    });
}
