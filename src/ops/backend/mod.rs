//! What every custom op shares to reach a backend: the CPU kernels' element type and row layouts
//! ([`cpu`]), one CUDA launch ([`cuda`], feature `cuda`), one Metal dispatch ([`metal`], feature
//! `metal`), and the checks the three share (input dtypes, sizes the kernels index with u32).

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(feature = "metal")]
pub(crate) mod metal;
pub(crate) mod simd;

use candle_core::Result;

/// Fails unless input `what` of op `op` has dtype `want` (the GPU kernels take one dtype each).
#[cfg(any(feature = "cuda", feature = "metal"))]
pub(crate) fn expect_dtype(op: &str, what: &str, got: candle_core::DType, want: candle_core::DType) -> Result<()> {
    if got != want {
        candle_core::bail!("{op}: {what} must be {want:?} on this device, got {got:?}");
    }
    Ok(())
}

/// `v` as u32, or an error naming it and the op (the kernels index with 32-bit integers).
pub(crate) fn fits(v: usize, what: &str, op: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{op}: {what} = {v} exceeds u32")))
}
