//! A bounds-checked matrix product over slices for the CPU kernels of the fused ops, on the same
//! `gemm` crate (and microkernels) as Candle's own matmul. [`matmul`] is single-threaded (for ops
//! that parallelise over their own pieces: experts, heads); [`matmul_par`] threads as Candle's
//! matmul does (`RAYON_NUM_THREADS`).

/// A matrix view: element (i, j) at `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// Row-major (rows, cols).
    pub fn rows(data: &'a [T], rows: usize, cols: usize) -> Self {
        Mat { data, rows, cols, rs: cols, cs: 1 }
    }

    /// The transpose of row-major (cols, rows) data: (rows, cols) of it without a copy.
    pub fn t(data: &'a [T], rows: usize, cols: usize) -> Self {
        Mat { data, rows, cols, rs: 1, cs: rows }
    }

    /// The transpose of this view, without a copy.
    pub fn transposed(self) -> Self {
        Mat { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }

    fn fits(&self) -> bool {
        self.rows == 0 || self.cols == 0 || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// dst (m, n) row-major = a (m, k) b (k, n), or dst += a b with `accumulate`; one thread.
pub fn matmul<T: 'static + super::backend::cpu::Float>(dst: &mut [T], a: Mat<T>, b: Mat<T>, accumulate: bool) {
    product(dst, a, b, accumulate, gemm::Parallelism::None)
}

/// [`matmul`] into rows of `dst` that lie `dst_rs` >= n apart (a block of a wider matrix); the
/// elements between the rows are left as they are.
pub fn matmul_strided<T: 'static + super::backend::cpu::Float>(
    dst: &mut [T],
    dst_rs: usize,
    a: Mat<T>,
    b: Mat<T>,
    accumulate: bool,
) {
    product_strided(dst, dst_rs, a, b, accumulate, gemm::Parallelism::None)
}

/// [`matmul`] on Candle's thread count.
pub fn matmul_par<T: 'static + super::backend::cpu::Float>(dst: &mut [T], a: Mat<T>, b: Mat<T>, accumulate: bool) {
    let n = candle_core::utils::get_num_threads();
    let par = if n > 1 { gemm::Parallelism::Rayon(n) } else { gemm::Parallelism::None };
    product(dst, a, b, accumulate, par)
}

fn product<T: 'static + super::backend::cpu::Float>(
    dst: &mut [T],
    a: Mat<T>,
    b: Mat<T>,
    accumulate: bool,
    par: gemm::Parallelism,
) {
    assert!(dst.len() == a.rows * b.cols, "matmul: ({}, {}) into {}", a.rows, b.cols, dst.len());
    product_strided(dst, b.cols, a, b, accumulate, par)
}

fn product_strided<T: 'static + super::backend::cpu::Float>(
    dst: &mut [T],
    dst_rs: usize,
    a: Mat<T>,
    b: Mat<T>,
    accumulate: bool,
    par: gemm::Parallelism,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let dst_fits = m == 0 || n == 0 || (dst_rs >= n && (m - 1) * dst_rs + n <= dst.len());
    assert!(
        b.rows == k && dst_fits && a.fits() && b.fits(),
        "matmul: shapes ({m}, {k}) x ({}, {n}) into {}",
        b.rows,
        dst.len()
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.chunks_mut(dst_rs).take(m).for_each(|row| row[..n].fill(T::ZERO));
        }
        return;
    }
    // SAFETY: the asserts above keep every index of the three views inside their slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            par,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_rows_land_in_their_block_and_leave_the_rest() {
        let (m, k, n, rs) = (3, 4, 2, 5);
        let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.3).cos()).collect();
        let b: Vec<f64> = (0..k * n).map(|i| (i as f64 * 0.7).sin()).collect();
        let mut dst = vec![9.0; (m - 1) * rs + n];
        matmul_strided(&mut dst, rs, Mat::rows(&a, m, k), Mat::rows(&b, k, n), false);
        for (at, &got) in dst.iter().enumerate() {
            let (i, j) = (at / rs, at % rs);
            let want = if j < n { (0..k).map(|l| a[i * k + l] * b[l * n + j]).sum::<f64>() } else { 9.0 };
            assert!((got - want).abs() < 1e-12, "({i}, {j}): {got} vs {want}");
        }
    }

    #[test]
    fn matches_triple_loop_with_transposes_and_accumulate() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
        let bt: Vec<f64> = (0..n * k).map(|i| (i as f64 * 0.91).cos()).collect(); // (n, k)
        let mut dst = vec![1.0; m * n];
        matmul(&mut dst, Mat::rows(&a, m, k), Mat::t(&bt, k, n), true);
        for i in 0..m {
            for j in 0..n {
                let want = 1.0 + (0..k).map(|l| a[i * k + l] * bt[j * k + l]).sum::<f64>();
                assert!((dst[i * n + j] - want).abs() < 1e-12, "({i}, {j}): {} vs {want}", dst[i * n + j]);
            }
        }
    }
}
