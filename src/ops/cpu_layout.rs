//! Host-side layout helpers shared by the custom ops' CPU kernels and launch glue: a 2-D tensor
//! read row by row (rows may be strided, elements within a row contiguous), and the u32 view of a
//! CPU storage.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result};

/// A 2-D layout read row by row: (rows, cols, row stride, start offset). Rows may be strided (a
/// `narrow` of a wider tensor); within a row the elements must be contiguous.
#[derive(Clone, Copy, Debug)]
pub struct Rows {
    pub rows: usize,
    pub cols: usize,
    pub stride: usize,
    pub offset: usize,
}

impl Rows {
    /// The rows of `l`; `what` and `op` name the tensor and the op in errors.
    pub fn of(l: &Layout, what: &str, op: &str) -> Result<Self> {
        let dims = l.dims();
        if dims.len() != 2 {
            candle_core::bail!("{op}: {what} must be 2-D (T, _), got shape {:?}", l.shape());
        }
        let (rows, cols) = (dims[0], dims[1]);
        let st = l.stride();
        if cols > 1 && st[1] != 1 {
            candle_core::bail!("{op}: {what} rows must be contiguous (stride {st:?}); call .contiguous()");
        }
        let stride = if rows > 1 { st[0] } else { cols };
        Ok(Self { rows, cols, stride, offset: l.start_offset() })
    }

    /// The `r`-th row of `data` (the slice the storage holds).
    #[inline]
    pub fn row<'a, T>(&self, data: &'a [T], r: usize) -> &'a [T] {
        let s = self.offset + r * self.stride;
        &data[s..s + self.cols]
    }

    /// Also checks the shape is (rows, cols) and that the layout fits in `len` elements.
    pub fn expect(self, rows: usize, cols: usize, len: usize, what: &str, op: &str) -> Result<Self> {
        if self.rows != rows || self.cols != cols {
            candle_core::bail!("{op}: {what} must be ({rows}, {cols}), got ({}, {})", self.rows, self.cols);
        }
        self.check_len(len, what, op)?;
        Ok(self)
    }

    /// Fails when the layout reaches past a storage of `len` elements.
    pub fn check_len(&self, len: usize, what: &str, op: &str) -> Result<()> {
        let need = if self.rows == 0 { 0 } else { self.offset + (self.rows - 1) * self.stride + self.cols };
        if need > len {
            candle_core::bail!("{op}: {what} layout reaches element {need} of a storage of {len}");
        }
        Ok(())
    }
}

/// The u32 elements of a CPU storage, or an error naming the tensor and the op.
pub fn u32_slice<'a>(s: &'a CpuStorage, what: &str, op: &str) -> Result<&'a [u32]> {
    match s {
        CpuStorage::U32(v) => Ok(v),
        other => candle_core::bail!("{op}: {what} must be u32, got {:?}", other.dtype()),
    }
}

/// An output buffer of `n` elements that the caller's kernel writes in full before anything reads
/// it: left uninitialized in release builds (as Candle's own `alloc_uninit`; a zero fill of the
/// router's 6.5 MB output was a serial memset before the parallel rows), filled with `poison` in
/// debug builds so that a kernel that skips an element fails the tests that compare it (choose a
/// poison no kernel writes: NaN, u32::MAX).
pub fn output_vec<T: Copy>(n: usize, poison: T) -> Vec<T> {
    if cfg!(debug_assertions) {
        return vec![poison; n];
    }
    let mut v = Vec::with_capacity(n);
    // SAFETY: T is Copy plain data (f32, f64, u32 here); every caller's kernel writes all n elements
    // before the vector is read or returned (debug builds check that through the poison).
    #[allow(clippy::uninit_vec)]
    unsafe {
        v.set_len(n)
    };
    v
}
