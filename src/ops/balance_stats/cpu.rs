//! The CPU kernels of the balance statistics: the Rust twins of `bs_row_stats` + `bs_partial_cell`
//! (per chunk), `bs_finish_col` and `bs_bwd_row` in `kernels/balance_stats.cuh`, summing in the
//! same order (libm `exp`, as the kernels' `expf`).

use super::chunk_rows;
use crate::ops::backend::cpu::{Float, Rows};
use candle_core::Result;
use rayon::prelude::*;

/// Rows per rayon task of the backward.
const ROWS_PER_TASK: usize = 256;

/// Writes exp(l - max) of one row into `ex` and returns their sum (j order).
#[inline]
fn row_exp<T: Float>(lg: &[T], ex: &mut [T]) -> T {
    let mut mx = lg[0];
    for &v in &lg[1..] {
        if v > mx {
            mx = v;
        }
    }
    let mut sum = T::ZERO;
    for (o, &v) in ex.iter_mut().zip(lg) {
        *o = (v - mx).exp_std();
        sum = sum + *o;
    }
    sum
}

/// Chunk c: the sums over its rows (in row order) of p_tj into `acc` (E), and the counts of each
/// expert among the rows' indices into `counts` (E). Err((token, slot, index)) on an index >= E.
fn partial_chunk<T: Float>(
    (lg, rl): (&[T], Rows),
    (idx, ri): (&[u32], Rows),
    rows: std::ops::Range<usize>,
    acc: &mut [T],
    counts: &mut [u64],
) -> std::result::Result<(), (usize, usize, u32)> {
    let mut ex = vec![T::ZERO; rl.cols]; // one scratch row per chunk, not per element
    for t in rows {
        let sum = row_exp(rl.row(lg, t), &mut ex);
        for (a, &v) in acc.iter_mut().zip(&ex) {
            *a = *a + v / sum;
        }
        for (s, &i) in ri.row(idx, t).iter().enumerate() {
            let Some(c) = counts.get_mut(i as usize) else { return Err((t, s, i)) };
            *c += 1;
        }
    }
    Ok(())
}

/// out (2, E): row 0 = f, row 1 = P.
pub(super) fn forward_cpu<T: Float>(lg: &[T], rl: Rows, idx: &[u32], ri: Rows) -> Result<Vec<T>> {
    let (t, e, m) = (rl.rows, rl.cols, ri.cols);
    let chunk = chunk_rows(t);
    let parts = (0..t.div_ceil(chunk))
        .into_par_iter()
        .map(|c| {
            let (mut acc, mut counts) = (vec![T::ZERO; e], vec![0u64; e]);
            partial_chunk((lg, rl), (idx, ri), c * chunk..((c + 1) * chunk).min(t), &mut acc, &mut counts).map_err(
                |(tok, s, i)| {
                    candle_core::Error::Msg(format!(
                        "balance-stats: expert index {i} of token {tok} (slot {s}) is out of range (E = {e})"
                    ))
                },
            )?;
            Ok((acc, counts))
        })
        .collect::<Result<Vec<_>>>()?; // in chunk order
    let mut out = vec![T::ZERO; 2 * e];
    let mut counts = vec![0u64; e];
    for (acc, cn) in &parts {
        for j in 0..e {
            out[e + j] = out[e + j] + acc[j];
            counts[j] += cn[j];
        }
    }
    // The same rounding steps as the reference: f in f64 then cast, P = sum * (1/T) (candle's mean).
    let inv_rows = T::from_f64(1.0 / t as f64);
    for j in 0..e {
        out[j] = if t * m == 0 { T::ZERO } else { T::from_f64(counts[j] as f64 / (t * m) as f64) };
        out[e + j] = out[e + j] * inv_rows;
    }
    Ok(out)
}

/// One row of the backward: dl = p * (g - <p, g>) / T.
#[inline]
fn bwd_row<T: Float>(lg: &[T], g: &[T], dl: &mut [T], inv_rows: T) {
    let sum = row_exp(lg, dl);
    let mut dot = T::ZERO;
    for (q, &gj) in dl.iter_mut().zip(g) {
        *q = *q / sum;
        dot = dot + *q * gj;
    }
    for (q, &gj) in dl.iter_mut().zip(g) {
        *q = *q * (gj - dot) * inv_rows;
    }
}

pub(super) fn backward_cpu<T: Float>(lg: &[T], rl: Rows, g: &[T]) -> Vec<T> {
    let (t, e) = (rl.rows, rl.cols);
    let inv_rows = T::from_f64(1.0 / t as f64);
    let mut dl = vec![T::ZERO; t * e];
    dl.par_chunks_mut(e)
        .with_min_len(ROWS_PER_TASK)
        .enumerate()
        .for_each(|(r, o)| bwd_row(rl.row(lg, r), g, o, inv_rows));
    dl
}
