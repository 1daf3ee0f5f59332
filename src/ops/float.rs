//! Float math the CPU kernels share: a vectorizable f32 `exp` (with the constants of its AVX2
//! twin), eight-lane reductions in a fixed order, and deterministic column sums.

use super::backend::cpu::Float;
use super::backend::simd::widest;
use rayon::prelude::*;

/// exp(x) for f32 without a libm call, so that loops over it (the router's softmax over K lanes,
/// the layer ops) vectorize: Cephes `expf`
/// (x = n ln2 + r, degree-5 polynomial for e^r, scale by 2^n), error about 1 ulp. Below -87.3
/// (e^x < 2^-126) it returns 2^-126 instead of a subnormal, which no softmax weight can tell apart
/// from 0. NaN stays NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    let x = x.clamp(EXP_LO, EXP_HI); // NaN stays NaN
    let t = x * std::f32::consts::LOG2_E + EXP_MAGIC;
    let n = t.to_bits().wrapping_sub(EXP_MAGIC.to_bits()) as i32; // round(x log2 e)
    let fx = t - EXP_MAGIC;
    let r = x - fx * EXP_C1;
    let r = r - fx * EXP_C2;
    let z = r * r;
    let [p0, p1, p2, p3, p4, p5] = EXP_P;
    let y = ((((p0 * r + p1) * r + p2) * r + p3) * r + p4) * r + p5;
    let y = y * z + r + 1.0;
    y * f32::from_bits(((n + 127) as u32) << 23)
}

// The constants of `exp_f32` and of its 8-lane twin `exp8_avx2`.
pub(crate) const EXP_LO: f32 = -87.336_55; // ln(2^-126)
pub(crate) const EXP_HI: f32 = 88.376_26;
pub(crate) const EXP_C1: f32 = 0.693_359_4; // 0.693359375, ln2 split in two
pub(crate) const EXP_C2: f32 = -2.121_944_4e-4;
pub(crate) const EXP_MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
/// The degree-5 polynomial for e^r, highest power first.
#[allow(clippy::excessive_precision)]
pub(crate) const EXP_P: [f32; 6] =
    [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5.000_000_1e-1];

widest! {
    /// Adds `b[i]` to every element of row i of `y` (b.len() rows; a bias over a transposed
    /// activation).
    pub(crate) fn add_per_row<T: Float>(y: &mut [T], b: &[T]) {
        if b.is_empty() || y.is_empty() {
            return;
        }
        for (row, &bb) in y.chunks_mut(y.len() / b.len()).zip(b) {
            for v in row.iter_mut() {
                *v = *v + bb;
            }
        }
    }
}

widest! {
    /// acc *= x, element by element.
    pub(crate) fn mul_into<T: Float>(acc: &mut [T], x: &[T]) {
        for (a, &v) in acc.iter_mut().zip(x) {
            *a = *a * v;
        }
    }
}

widest! {
    /// acc += x, element by element.
    pub(crate) fn add_into<T: Float>(acc: &mut [T], x: &[T]) {
        for (a, &v) in acc.iter_mut().zip(x) {
            *a = *a + v;
        }
    }
}

widest! {
    /// Adds `b` to every row of `y` (rows of b.len(); a bias).
    pub(crate) fn add_rows<T: Float>(y: &mut [T], b: &[T]) {
        if b.is_empty() {
            return;
        }
        for row in y.chunks_mut(b.len()) {
            for (v, &bb) in row.iter_mut().zip(b) {
                *v = *v + bb;
            }
        }
    }
}

/// sum_i a_i b_i with 8 independent accumulators (so it vectorizes), added in a fixed order.
#[inline(always)]
pub(crate) fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::ZERO; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] = acc[l] + x[l] * y[l];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (&x, &y) in ra.iter().zip(rb) {
        s = s + x * y;
    }
    s
}

/// max of a non-empty slice, 8 lanes at a time.
#[inline(always)]
pub(crate) fn max_of<T: Float>(a: &[T]) -> T {
    let mut acc = [a[0]; 8];
    let chunks = a.chunks_exact(8);
    let rest = chunks.remainder();
    for x in chunks {
        for l in 0..8 {
            acc[l] = if x[l] > acc[l] { x[l] } else { acc[l] };
        }
    }
    rest.iter().fold(acc.into_iter().fold(a[0], T::max), |m, &v| m.max(v))
}

/// sum of a slice with 8 accumulators, added in a fixed order.
#[inline(always)]
pub(crate) fn sum_of<T: Float>(a: &[T]) -> T {
    let mut acc = [T::ZERO; 8];
    let chunks = a.chunks_exact(8);
    let rest = chunks.remainder();
    for x in chunks {
        for l in 0..8 {
            acc[l] = acc[l] + x[l];
        }
    }
    let s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    rest.iter().fold(s, |s, &v| s + v)
}

/// sum_j f(row_j) in f64 with eight lanes (element j into lane j % 8), added in a fixed order, so
/// it vectorizes and does not depend on the vector width.
#[inline(always)]
pub(crate) fn sum8_f64<T: Float>(row: &[T], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0.0f64; 8];
    let chunks = row.chunks_exact(8);
    let rest = chunks.remainder();
    for x in chunks {
        for l in 0..8 {
            acc[l] += f(x[l].to_f64());
        }
    }
    let mut s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for &v in rest {
        s += f(v.to_f64());
    }
    s
}

/// Rows per block of [`col_sum`].
const COL_SUM_BLOCK: usize = 64;

/// The column sums of `x` viewed as rows of `c` (bias gradients): blocks of rows in parallel, then
/// the blocks' partial sums in order, so the result does not depend on the thread count.
pub(crate) fn col_sum<T: Float>(x: &[T], c: usize) -> Vec<T> {
    let partials: Vec<Vec<T>> = x
        .par_chunks(c * COL_SUM_BLOCK)
        .map(|xs| {
            let mut p = vec![T::ZERO; c];
            for xr in xs.chunks(c) {
                add_into(&mut p, xr);
            }
            p
        })
        .collect();
    let mut out = vec![T::ZERO; c];
    for p in &partials {
        for (o, &v) in out.iter_mut().zip(p) {
            *o = *o + v;
        }
    }
    out
}

/// The sums of the `rows` rows of `x`, each added as [`col_sum`] adds a column of the transpose
/// (blocks of rows, then the blocks in order): the same bits for the transposed layout.
pub(crate) fn row_sums<T: Float>(x: &[T], rows: usize) -> Vec<T> {
    let n = x.len() / rows.max(1);
    if n == 0 {
        return vec![T::ZERO; rows];
    }
    x.chunks(n)
        .map(|row| {
            row.chunks(COL_SUM_BLOCK).fold(T::ZERO, |out, block| out + block.iter().fold(T::ZERO, |p, &v| p + v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_sums_of_the_transpose_have_the_bits_of_col_sum() {
        for (rows, c) in [(1, 3), (64, 5), (150, 7), (300, 2)] {
            let x: Vec<f32> = (0..rows * c).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
            let xt: Vec<f32> = (0..c * rows).map(|k| x[(k % rows) * c + k / rows]).collect(); // (c, rows)
            let want = col_sum(&x, c);
            assert_eq!(row_sums(&xt, c), want, "{rows} rows of {c}");
            let f64_sums: Vec<f64> = (0..c).map(|j| (0..rows).map(|i| x[i * c + j] as f64).sum::<f64>()).collect();
            for (g, w) in want.iter().zip(&f64_sums) {
                assert!((*g as f64 - w).abs() < 1e-4, "{g} vs {w}");
            }
        }
        assert_eq!(row_sums::<f32>(&[], 3), vec![0.0; 3]);
    }

    #[test]
    fn add_per_row_adds_one_number_to_each_row() {
        let mut y = vec![1.0f32; 6];
        add_per_row(&mut y, &[0.5, -2.0]);
        assert_eq!(y, [1.5, 1.5, 1.5, -1.0, -1.0, -1.0]);
    }
}
