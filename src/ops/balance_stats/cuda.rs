//! The CUDA launches of the balance statistics (`kernels/balance_stats.cu`): the forward is three
//! launches (row max and denominator, (chunk, expert) partial sums, per-expert finish), the
//! backward one thread per row.

use super::BalanceKernelArgs;
use crate::ops::backend::cuda::{by_value, launch, Module};
use crate::ops::backend::expect_dtype;
use candle_core::backend::BackendStorage;
use candle_core::{CudaStorage, DType, Result};

const MODULE: Module = Module {
    name: "gumbel_moe_balance_stats",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/balance_stats.ptx")),
    block: 128,
};

by_value!(BalanceKernelArgs);

/// (logits, element offset), (indices, element offset) -> (2, E) f32.
pub fn forward(
    (s1, o1): (&CudaStorage, usize),
    (s2, o2): (&CudaStorage, usize),
    bp: BalanceKernelArgs,
) -> Result<CudaStorage> {
    expect_dtype("balance-stats", "logits", s1.dtype(), DType::F32)?;
    expect_dtype("balance-stats", "indices", s2.dtype(), DType::U32)?;
    let dev = s1.device();
    let (t, e, c) = (bp.rows as usize, bp.e as usize, bp.n_chunks as usize);
    let lg = s1.as_cuda_slice::<f32>()?.slice(o1..);
    let idx = s2.as_cuda_slice::<u32>()?.slice(o2..);
    // SAFETY (all four): every element is written by the kernels below before it is read.
    let stats = unsafe { dev.alloc::<f32>(t * 2)? };
    let part_p = unsafe { dev.alloc::<f32>(c * e)? };
    let part_n = unsafe { dev.alloc::<u32>(c * (e + 1))? };
    let out = unsafe { dev.alloc::<f32>(2 * e)? };
    launch(dev, &MODULE, "balance_stats_rows_f32", t, &[&lg, &stats, &bp])?;
    launch(dev, &MODULE, "balance_stats_partial_f32", c * e, &[&lg, &stats, &idx, &part_p, &part_n, &bp])?;
    launch(dev, &MODULE, "balance_stats_finish_f32", e, &[&part_p, &part_n, &out, &bp])?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// (logits, element offset), (grad, element offset of its row 1) -> dlogits (T, E) f32.
pub fn backward(
    (s1, o1): (&CudaStorage, usize),
    (s2, o2): (&CudaStorage, usize),
    bp: BalanceKernelArgs,
) -> Result<CudaStorage> {
    expect_dtype("balance-stats-bwd", "logits", s1.dtype(), DType::F32)?;
    expect_dtype("balance-stats-bwd", "grad", s2.dtype(), DType::F32)?;
    let dev = s1.device();
    let (t, e) = (bp.rows as usize, bp.e as usize);
    let lg = s1.as_cuda_slice::<f32>()?.slice(o1..);
    let g = s2.as_cuda_slice::<f32>()?.slice(o2..o2 + e);
    // SAFETY: every element is written by the kernel (one thread per row writes its E values).
    let dl = unsafe { dev.alloc::<f32>(t * e)? };
    launch(dev, &MODULE, "balance_stats_bwd_f32", t, &[&lg, &g, &dl, &bp])?;
    Ok(CudaStorage::wrap_cuda_slice(dl, dev.clone()))
}
