//! The element type of the fused layer ops' CPU kernels (f32 and f64) and the few things they need
//! from it: conversions, `sqrt`, a vectorizable `exp` and `erf`, and the storage they live in.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Result};
use std::ops::{Add, Div, Mul, Neg, Sub};

pub trait Float:
    Copy
    + Send
    + Sync
    + PartialOrd
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
{
    const ZERO: Self;
    const ONE: Self;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn sqrt(self) -> Self;
    /// e^x; for f32 a polynomial without a libm call (so loops over it vectorize), ~1 ulp.
    fn exp(self) -> Self;
    fn max(self, o: Self) -> Self;
    /// The elements of a CPU storage of this type, or an error naming the op and the tensor.
    fn slice<'a>(s: &'a CpuStorage, what: &str, op: &str) -> Result<&'a [Self]>;
    fn storage(v: Vec<Self>) -> CpuStorage;
}

impl Float for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    #[inline(always)]
    fn exp(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn max(self, o: Self) -> Self {
        if self > o {
            self
        } else {
            o
        }
    }
    fn slice<'a>(s: &'a CpuStorage, what: &str, op: &str) -> Result<&'a [Self]> {
        match s {
            CpuStorage::F32(v) => Ok(v),
            other => candle_core::bail!("{op}: {what} must be f32, got {:?}", other.dtype()),
        }
    }
    fn storage(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(v)
    }
}

impl Float for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn max(self, o: Self) -> Self {
        f64::max(self, o)
    }
    fn slice<'a>(s: &'a CpuStorage, what: &str, op: &str) -> Result<&'a [Self]> {
        match s {
            CpuStorage::F64(v) => Ok(v),
            other => candle_core::bail!("{op}: {what} must be f64, got {:?}", other.dtype()),
        }
    }
    fn storage(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F64(v)
    }
}

/// Cephes `expf` (x = n ln2 + r, a degree-5 polynomial for e^r, scaled by 2^n): no branches but
/// clamps, so a loop over it vectorizes. Clamped to [-87.3, 88.4]: below, e^x < 2^-126 comes out as
/// 2^-126 (no subnormals); above, ~2^127.5. Relative error about 1 ulp. NaN stays NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LO: f32 = -87.336_55;
    const HI: f32 = 88.376_26;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    #[allow(clippy::excessive_precision)]
    const P: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5.000_000_1e-1];
    let x = x.clamp(LO, HI);
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t.to_bits().wrapping_sub(MAGIC.to_bits()) as i32;
    let fx = t - MAGIC;
    let r = x - fx * C1 - fx * C2;
    let y = ((((P[0] * r + P[1]) * r + P[2]) * r + P[3]) * r + P[4]) * r + P[5];
    let y = y * (r * r) + r + 1.0;
    y * f32::from_bits(((n + 127) as u32) << 23)
}

/// A buffer of `n` elements that the caller writes in full before reading (see
/// [`super::cpu_layout::output_vec`]; NaN-poisoned in debug builds).
pub fn out_vec<T: Float>(n: usize) -> Vec<T> {
    super::cpu_layout::output_vec(n, T::from_f64(f64::NAN))
}

/// Contiguous `[start, end)` of a layout, or an error naming the op and tensor.
pub fn contiguous(l: &candle_core::Layout, what: &str, op: &str) -> Result<(usize, usize)> {
    match l.contiguous_offsets() {
        Some(o) => Ok(o),
        None => candle_core::bail!("{op}: {what} must be contiguous, got stride {:?}", l.stride()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_matches_f64_exp() {
        let mut worst = 0f64;
        for i in 0..20_000 {
            let x = (-87.0 + i as f64 * (175.0 / 20_000.0)) as f32;
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert!(exp_f32(f32::NAN).is_nan());
    }
}
