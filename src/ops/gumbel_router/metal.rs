//! The Metal dispatches of the Gumbel router ops (`kernels/gumbel_router.metal`, compiled at run
//! time with `philox.h` and `gumbel_router.cuh` pasted in).

use super::GumbelKernelArgs;
use crate::ops::backend::cpu::Rows;
use crate::ops::backend::expect_dtype;
use crate::ops::backend::metal::{dispatch, inline_source, output, Arg, Library};
use candle_core::backend::BackendStorage;
use candle_core::{DType, MetalStorage, Result};

fn source() -> String {
    let body = format!(
        "{}\n{}",
        include_str!("../../../kernels/philox.h"),
        include_str!("../../../kernels/gumbel_router.cuh")
    );
    inline_source(include_str!("../../../kernels/gumbel_router.metal"), &[("gumbel_router.cuh", &body)])
}

const LIBRARY: Library = Library { name: "gumbel_router", source, block: None };

/// logits -> the (T, W) u32 select output, `n_out` elements.
pub fn select(s: &MetalStorage, r: Rows, gp: GumbelKernelArgs, n_out: usize) -> Result<MetalStorage> {
    expect_dtype("gumbel-select", "logits", s.dtype(), DType::F32)?;
    let (out, buf) = output(s.device(), n_out, DType::U32, "gumbel_select")?;
    let args = [Arg::input(s, r.offset), Arg::Out(&buf, 0), Arg::value(&gp)];
    dispatch(s.device(), &LIBRARY, "gumbel_select_f32", &args, r.rows)?;
    Ok(out)
}

/// (logits, candidates) -> y (T, K) f32, `n_out` elements.
pub fn weights(
    (s1, rl): (&MetalStorage, Rows),
    (s2, rc): (&MetalStorage, Rows),
    gp: GumbelKernelArgs,
    n_out: usize,
) -> Result<MetalStorage> {
    expect_dtype("gumbel-weights", "logits", s1.dtype(), DType::F32)?;
    expect_dtype("gumbel-weights", "candidates", s2.dtype(), DType::U32)?;
    let (out, buf) = output(s1.device(), n_out, DType::F32, "gumbel_weights")?;
    let args = [Arg::input(s1, rl.offset), Arg::input(s2, rc.offset), Arg::Out(&buf, 0), Arg::value(&gp)];
    dispatch(s1.device(), &LIBRARY, "gumbel_weights_f32", &args, rl.rows)?;
    Ok(out)
}

/// (y, dy, candidates) -> dlogits (T, E) f32, `n_out` elements (one thread each).
pub fn weights_bwd(
    (s1, ry): (&MetalStorage, Rows),
    (s2, rd): (&MetalStorage, Rows),
    (s3, rc): (&MetalStorage, Rows),
    gp: GumbelKernelArgs,
    n_out: usize,
) -> Result<MetalStorage> {
    let op = "gumbel-weights-bwd";
    expect_dtype(op, "y", s1.dtype(), DType::F32)?;
    expect_dtype(op, "dy", s2.dtype(), DType::F32)?;
    expect_dtype(op, "candidates", s3.dtype(), DType::U32)?;
    let (out, buf) = output(s1.device(), n_out, DType::F32, "gumbel_weights_bwd")?;
    let args = [
        Arg::input(s1, ry.offset),
        Arg::input(s2, rd.offset),
        Arg::input(s3, rc.offset),
        Arg::Out(&buf, 0),
        Arg::value(&gp),
    ];
    dispatch(s1.device(), &LIBRARY, "gumbel_weights_bwd_f32", &args, n_out)?;
    Ok(out)
}
