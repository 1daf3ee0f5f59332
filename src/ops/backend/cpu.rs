//! What the CPU kernels of the custom ops share: their element type [`Float`] (f32 as on a GPU,
//! f64 for finite-difference gradient checks), a 2-D tensor read row by row, the typed views of a
//! CPU storage, and output buffers that the kernels write in full.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result};
use std::ops::{Add, Div, Mul, Neg, Sub};

/// The element types of the CPU kernels: f32 and f64.
pub(crate) trait Float:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::fmt::Display
    + std::fmt::Debug
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
{
    const ZERO: Self;
    const ONE: Self;
    /// f32, whose values can travel as u32 bits (the router's saved weights).
    const IS_F32: bool;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
    fn sqrt(self) -> Self;
    /// e^x; for f32 the polynomial [`exp_f32`](crate::ops::float::exp_f32) (no libm call, so loops
    /// over it vectorize; about 1 ulp), for f64 libm.
    fn exp(self) -> Self;
    /// e^x from libm for both types (the kernels whose GPU twins call `expf`).
    fn exp_std(self) -> Self;
    fn max(self, o: Self) -> Self;
    fn is_finite(self) -> bool;
    /// The elements of a CPU storage of this type, or an error naming the op and the tensor.
    fn slice<'a>(s: &'a CpuStorage, what: &str, op: &str) -> Result<&'a [Self]>;
    /// [`Float::slice`] for writing (in-place ops).
    fn slice_mut<'a>(s: &'a mut CpuStorage, what: &str, op: &str) -> Result<&'a mut [Self]>;
    fn storage(v: Vec<Self>) -> CpuStorage;
}

macro_rules! float {
    ($t:ty, $v:ident, $is_f32:expr, $exp:expr, $max:expr) => {
        impl Float for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const IS_F32: bool = $is_f32;
            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn from_f32(v: f32) -> Self {
                v as $t
            }
            #[inline(always)]
            fn to_f32(self) -> f32 {
                self as f32
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn exp(self) -> Self {
                $exp(self)
            }
            #[inline(always)]
            fn exp_std(self) -> Self {
                <$t>::exp(self)
            }
            #[inline(always)]
            fn max(self, o: Self) -> Self {
                $max(self, o)
            }
            #[inline(always)]
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
            fn slice<'a>(s: &'a CpuStorage, what: &str, op: &str) -> Result<&'a [Self]> {
                match s {
                    CpuStorage::$v(v) => Ok(v),
                    other => candle_core::bail!("{op}: {what} must be {}, got {:?}", stringify!($t), other.dtype()),
                }
            }
            fn slice_mut<'a>(s: &'a mut CpuStorage, what: &str, op: &str) -> Result<&'a mut [Self]> {
                match s {
                    CpuStorage::$v(v) => Ok(v),
                    other => candle_core::bail!("{op}: {what} must be {}, got {:?}", stringify!($t), other.dtype()),
                }
            }
            fn storage(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$v(v)
            }
        }
    };
}
float!(f32, F32, true, crate::ops::float::exp_f32, |a: f32, b: f32| if a > b { a } else { b });
float!(f64, F64, false, f64::exp, f64::max);

/// A 2-D layout read row by row: (rows, cols, row stride, start offset). Rows may be strided (a
/// `narrow` of a wider tensor); within a row the elements must be contiguous.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rows {
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
pub(crate) fn u32_slice<'a>(s: &'a CpuStorage, what: &str, op: &str) -> Result<&'a [u32]> {
    match s {
        CpuStorage::U32(v) => Ok(v),
        other => candle_core::bail!("{op}: {what} must be u32, got {:?}", other.dtype()),
    }
}

/// Contiguous `[start, end)` of a layout, or an error naming the op and tensor.
pub(crate) fn contiguous(l: &Layout, what: &str, op: &str) -> Result<(usize, usize)> {
    match l.contiguous_offsets() {
        Some(o) => Ok(o),
        None => candle_core::bail!("{op}: {what} must be contiguous, got stride {:?}", l.stride()),
    }
}

/// An output buffer of `n` elements that the caller's kernel writes in full before anything reads
/// it: left uninitialized in release builds (as Candle's own `alloc_uninit`), filled with `poison`
/// in debug builds so that a kernel that skips an element fails the tests that compare it (choose a
/// poison no kernel writes: NaN, u32::MAX).
pub(crate) fn output_vec<T: Copy>(n: usize, poison: T) -> Vec<T> {
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

/// [`output_vec`] of floats, NaN-poisoned in debug builds.
pub(crate) fn out_vec<T: Float>(n: usize) -> Vec<T> {
    output_vec(n, T::from_f64(f64::NAN))
}
