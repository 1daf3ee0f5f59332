//! The CPU kernels of the expert MLP ops, over each expert's own weight slices: one expert's
//! forward and backward, and every expert of a call in parallel (deterministic: each expert
//! writes only its own rows and its own gradients). GELU experts: y = gelu(x W1^T + b1) W2^T + b2;
//! SwiGLU experts (a gate Wg): y = (silu(x Wg^T + bg) (x W1^T + b1)) W2^T + b2. The forward can
//! keep the pre-activations (U = x W1^T + b1, and G = x Wg^T + bg) for the backward, which
//! otherwise recomputes them. An expert with tens of rows keeps its hidden activations transposed
//! ([`Hidden`]).

use super::super::backend::cpu::out_vec;
use super::super::float::{add_per_row, add_rows, col_sum, row_sums};
use super::super::gelu::{gelu_act_and_grad, gelu_chunk, Normal};
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

/// Pre-activations per row of one expert: H (GELU) or 2H (SwiGLU: U then G).
fn pre_width(h: usize, gated: bool) -> usize {
    if gated {
        2 * h
    } else {
        h
    }
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

/// y (n, C) = act W2^T + b2 of one expert's rows x (n, C), act = gelu(U) or silu(G) U, with the
/// pre-activations written to `pre` (n x [`pre_width`]).
fn forward<T: Normal>(mm: MatMul<T>, x: &[T], w: &Weights<T>, c: usize, h: usize, y: &mut [T], pre: &mut [T]) {
    let n = x.len() / c;
    if n == 0 {
        return;
    }
    let hid = Hidden::new(n, h);
    hidden_into(mm, pre, x, w, hid, c);
    let mut act = out_vec::<T>(n * h);
    let (u, g) = pre.split_at(n * h);
    if w.gated() {
        swiglu_chunk(&mut act, g, u);
    } else {
        gelu_chunk(&mut act, u);
    }
    if hid.transposed {
        // y^T (C, n) = W2 A^T, then y its transpose: a copy of n x C instead of packing W2.
        let mut yt = out_vec::<T>(c * n);
        mm(&mut yt, Mat::rows(w.w2, c, h), hid.mt(&act), false);
        for (i, row) in y.chunks_mut(c).enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = yt[j * n + i];
            }
        }
    } else {
        mm(y, hid.m(&act), Mat::t(w.w2, h, c), false);
    }
    add_rows(y, w.b2);
}

/// One expert's backward from its rows x (n, C), dy (n, C) and, when the forward kept them, its
/// pre-activations (n, H): writes dx (n, C) and every gradient of `g` (the biases' only when they
/// are not empty).
#[allow(clippy::too_many_arguments)]
fn backward<T: Normal>(
    mm: MatMul<T>,
    x: &[T],
    dy: &[T],
    pre: Option<&[T]>,
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
    let pre = match pre {
        Some(p) => p,
        None => {
            recomputed = {
                let mut p = out_vec::<T>(n * pre_width(h, gated));
                hidden_into(mm, &mut p, x, w, hid, c);
                p
            };
            &recomputed
        }
    };
    let (u, gp) = pre.split_at(n * h);
    let mut act = out_vec::<T>(n * h);
    let mut du = out_vec::<T>(n * h);
    let mut dg = out_vec::<T>(if gated { n * h } else { 0 });
    // dA = dY W2, then through the activation: dU = dA gelu'(U), or dU = dA silu(G) and
    // dG = dA U silu'(G).
    hid.product(mm, &mut du, Mat::rows(dy, n, c), Mat::t(w.w2, h, c), &[]);
    if gated {
        swiglu_act_and_grad(&mut du, &mut dg, &mut act, gp, u);
    } else {
        gelu_act_and_grad(&mut du, &mut act, u);
    }
    mm(g.w2, Mat::t(dy, c, n), hid.m(&act), false); // dW2 = dY^T A
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
/// parallel -> (y (N, C), with `keep` the pre-activations: each expert's block of
/// n_e x [`pre_width`], in expert order).
pub(super) fn forward_all<T: Normal>(
    x: &[T],
    ws: &[Weights<T>],
    offsets: &[u32],
    c: usize,
    h: usize,
    keep: bool,
) -> (Vec<T>, Option<Vec<T>>) {
    let rows = x.len() / c;
    let hp = pre_width(h, ws.first().is_some_and(|w| w.gated()));
    let (mut y, mut pre) = (out_vec::<T>(rows * c), out_vec::<T>(rows * hp));
    let mut pieces = Vec::with_capacity(ws.len());
    let (mut y_rest, mut pre_rest) = (&mut y[..], &mut pre[..]);
    for e in 0..ws.len() {
        let n = (offsets[e + 1] - offsets[e]) as usize;
        let (ye, r) = std::mem::take(&mut y_rest).split_at_mut(n * c);
        let (pe, rp) = std::mem::take(&mut pre_rest).split_at_mut(n * hp);
        (y_rest, pre_rest) = (r, rp);
        pieces.push((e, ye, pe));
    }
    let mm = matmul_for(ws.len());
    pieces.into_par_iter().for_each(|(e, ye, pe)| {
        forward(mm, &x[offsets[e] as usize * c..offsets[e + 1] as usize * c], &ws[e], c, h, ye, pe);
    });
    (y, keep.then_some(pre))
}

/// The backward of [`forward_all`]: writes dx (N, C), and expert e's gradients into `gs[e]`;
/// `pre`: the forward's pre-activations, or None to recompute them.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward_all<T: Normal>(
    x: &[T],
    dy: &[T],
    pre: Option<&[T]>,
    ws: &[Weights<T>],
    offsets: &[u32],
    c: usize,
    h: usize,
    dx: &mut [T],
    gs: Vec<Grads<T>>,
) {
    assert_eq!(gs.len(), ws.len(), "expert_mlp: {} gradient sets for {} experts", gs.len(), ws.len());
    let hp = pre_width(h, ws.first().is_some_and(|w| w.gated()));
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
        let pre = pre.map(|p| &p[a * hp..b * hp]);
        backward(mm, &x[a * c..b * c], &dy[a * c..b * c], pre, &ws[e], c, h, dxe, g);
    });
}
