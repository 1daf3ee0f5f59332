//! The CUDA launches of the Gumbel router ops (`kernels/gumbel_router.cu`): one thread per row for
//! select and weights, one per output element for weights_bwd.

use super::GumbelKernelArgs;
use crate::ops::backend::cpu::Rows;
use crate::ops::backend::cuda::{by_value, launch, Module};
use crate::ops::backend::expect_dtype;
use candle_core::backend::BackendStorage;
use candle_core::{CudaStorage, DType, Result};

const MODULE: Module =
    Module { name: "gumbel_moe_router", ptx: include_str!(concat!(env!("OUT_DIR"), "/gumbel_router.ptx")), block: 128 };

by_value!(GumbelKernelArgs);

/// logits -> the (T, W) u32 select output, `n_out` elements.
pub fn select(s: &CudaStorage, r: Rows, gp: GumbelKernelArgs, n_out: usize) -> Result<CudaStorage> {
    expect_dtype("gumbel-select", "logits", s.dtype(), DType::F32)?;
    let dev = s.device();
    let out = dev.alloc_zeros::<u32>(n_out)?;
    let src = s.as_cuda_slice::<f32>()?.slice(r.offset..);
    launch(dev, &MODULE, "gumbel_select_f32", r.rows, &[&src, &out, &gp])?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// (logits, candidates) -> y (T, K) f32, `n_out` elements.
pub fn weights(
    (s1, rl): (&CudaStorage, Rows),
    (s2, rc): (&CudaStorage, Rows),
    gp: GumbelKernelArgs,
    n_out: usize,
) -> Result<CudaStorage> {
    expect_dtype("gumbel-weights", "logits", s1.dtype(), DType::F32)?;
    expect_dtype("gumbel-weights", "candidates", s2.dtype(), DType::U32)?;
    let dev = s1.device();
    let out = dev.alloc_zeros::<f32>(n_out)?;
    let lg = s1.as_cuda_slice::<f32>()?.slice(rl.offset..);
    let cand = s2.as_cuda_slice::<u32>()?.slice(rc.offset..);
    launch(dev, &MODULE, "gumbel_weights_f32", rl.rows, &[&lg, &cand, &out, &gp])?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// (y, dy, candidates) -> dlogits (T, E) f32, `n_out` elements.
pub fn weights_bwd(
    (s1, ry): (&CudaStorage, Rows),
    (s2, rd): (&CudaStorage, Rows),
    (s3, rc): (&CudaStorage, Rows),
    gp: GumbelKernelArgs,
    n_out: usize,
) -> Result<CudaStorage> {
    let op = "gumbel-weights-bwd";
    expect_dtype(op, "y", s1.dtype(), DType::F32)?;
    expect_dtype(op, "dy", s2.dtype(), DType::F32)?;
    expect_dtype(op, "candidates", s3.dtype(), DType::U32)?;
    let dev = s1.device();
    // SAFETY: one thread per element writes every element (zeros included) when rows > 0; the
    // buffer is empty otherwise.
    let out = unsafe { dev.alloc::<f32>(n_out.max(1))? };
    let y = s1.as_cuda_slice::<f32>()?.slice(ry.offset..);
    let dy = s2.as_cuda_slice::<f32>()?.slice(rd.offset..);
    let cand = s3.as_cuda_slice::<u32>()?.slice(rc.offset..);
    let threads = if ry.rows > 0 { n_out } else { 0 };
    launch(dev, &MODULE, "gumbel_weights_bwd_f32", threads, &[&y, &dy, &cand, &out, &gp])?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
