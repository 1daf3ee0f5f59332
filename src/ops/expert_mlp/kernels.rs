//! The CPU kernels of the expert MLP ops, over each expert's own weight slices: one expert's
//! forward and backward, and every expert of a call in parallel (deterministic: each expert
//! writes only its own rows and its own gradients). The forward can keep the pre-activations
//! H = x W1^T + b1 for the backward, which otherwise recomputes them (one matmul of the seven).

use super::super::backend::cpu::out_vec;
use super::super::float::{add_rows, col_sum};
use super::super::gelu::{gelu_act_and_grad, gelu_chunk, Normal};
use super::super::gemm::{matmul, Mat};
use rayon::prelude::*;

/// One expert's weights: W1 (H, C), b1 (H), W2 (C, H), b2 (C); the biases empty when there are none.
#[derive(Clone, Copy)]
pub(super) struct Weights<'a, T> {
    pub w1: &'a [T],
    pub b1: &'a [T],
    pub w2: &'a [T],
    pub b2: &'a [T],
}

/// One expert's gradients, shaped as its [`Weights`].
pub(super) struct Grads<'a, T> {
    pub w1: &'a mut [T],
    pub b1: &'a mut [T],
    pub w2: &'a mut [T],
    pub b2: &'a mut [T],
}

/// Pre-activation pre (n, H) = x W1^T + b1 of one expert.
fn hidden_into<T: Normal>(pre: &mut [T], x: &[T], w: &Weights<T>, n: usize, c: usize, h: usize) {
    matmul(pre, Mat::rows(x, n, c), Mat::t(w.w1, c, h), false);
    add_rows(pre, w.b1);
}

/// y (n, C) = gelu(H) W2^T + b2 of one expert's rows x (n, C), with H = x W1^T + b1 (n, H)
/// written to `pre`.
fn forward<T: Normal>(x: &[T], w: &Weights<T>, c: usize, h: usize, y: &mut [T], pre: &mut [T]) {
    let n = x.len() / c;
    hidden_into(pre, x, w, n, c, h);
    let mut act = out_vec::<T>(n * h);
    gelu_chunk(&mut act, pre);
    matmul(y, Mat::rows(&act, n, h), Mat::t(w.w2, h, c), false);
    add_rows(y, w.b2);
}

/// One expert's backward from its rows x (n, C), dy (n, C) and, when the forward kept them, its
/// pre-activations (n, H): writes dx (n, C) and every gradient of `g` (the biases' only when they
/// are not empty).
#[allow(clippy::too_many_arguments)]
fn backward<T: Normal>(
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
        for v in [g.w1, g.b1, g.w2, g.b2] {
            v.fill(T::ZERO);
        }
        return;
    }
    let recomputed;
    let pre = match pre {
        Some(p) => p,
        None => {
            recomputed = {
                let mut p = out_vec::<T>(n * h);
                hidden_into(&mut p, x, w, n, c, h);
                p
            };
            &recomputed
        }
    };
    let mut act = out_vec::<T>(n * h);
    let mut dpre = out_vec::<T>(n * h);
    // dA = dY W2, then through GELU: dH = dA * gelu'(H).
    matmul(&mut dpre, Mat::rows(dy, n, c), Mat::rows(w.w2, c, h), false);
    gelu_act_and_grad(&mut dpre, &mut act, pre);
    matmul(g.w2, Mat::t(dy, c, n), Mat::rows(&act, n, h), false); // dW2 = dY^T A
    matmul(g.w1, Mat::t(&dpre, h, n), Mat::rows(x, n, c), false); // dW1 = dH^T X
    if !g.b1.is_empty() {
        g.b1.copy_from_slice(&col_sum(&dpre, h));
    }
    if !g.b2.is_empty() {
        g.b2.copy_from_slice(&col_sum(dy, c));
    }
    matmul(dx, Mat::rows(&dpre, n, h), Mat::rows(w.w1, h, c), false); // dX = dH W1
}

/// The rows [offsets[e], offsets[e + 1]) of x (N, C) through expert e, for every expert, in
/// parallel -> (y (N, C), with `keep` the pre-activations (N, H) in the same row order).
pub(super) fn forward_all<T: Normal>(
    x: &[T],
    ws: &[Weights<T>],
    offsets: &[u32],
    c: usize,
    h: usize,
    keep: bool,
) -> (Vec<T>, Option<Vec<T>>) {
    let rows = x.len() / c;
    let (mut y, mut pre) = (out_vec::<T>(rows * c), out_vec::<T>(rows * h));
    let mut pieces = Vec::with_capacity(ws.len());
    let (mut y_rest, mut pre_rest) = (&mut y[..], &mut pre[..]);
    for e in 0..ws.len() {
        let n = (offsets[e + 1] - offsets[e]) as usize;
        let (ye, r) = std::mem::take(&mut y_rest).split_at_mut(n * c);
        let (pe, rp) = std::mem::take(&mut pre_rest).split_at_mut(n * h);
        (y_rest, pre_rest) = (r, rp);
        pieces.push((e, ye, pe));
    }
    pieces.into_par_iter().for_each(|(e, ye, pe)| {
        forward(&x[offsets[e] as usize * c..offsets[e + 1] as usize * c], &ws[e], c, h, ye, pe);
    });
    (y, keep.then_some(pre))
}

/// The backward of [`forward_all`]: writes dx (N, C), and expert e's gradients into `gs[e]`;
/// `pre`: the forward's pre-activations (N, H), or None to recompute them.
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
    let mut pieces = Vec::with_capacity(ws.len());
    let mut dx_rest = dx;
    for (e, g) in gs.into_iter().enumerate() {
        let n = (offsets[e + 1] - offsets[e]) as usize;
        let (dxe, r) = std::mem::take(&mut dx_rest).split_at_mut(n * c);
        dx_rest = r;
        pieces.push((e, dxe, g));
    }
    pieces.into_par_iter().for_each(|(e, dxe, g)| {
        let (a, b) = (offsets[e] as usize, offsets[e + 1] as usize);
        let pre = pre.map(|p| &p[a * h..b * h]);
        backward(&x[a * c..b * c], &dy[a * c..b * c], pre, &ws[e], c, h, dxe, g);
    });
}
