//! The Metal dispatches of the balance statistics (`kernels/balance_stats.metal`, compiled at run
//! time with `balance_stats.cuh` pasted in): the forward's three dispatches share their
//! intermediate buffers, ordered by the encoder's barriers on written buffers.

use super::BalanceKernelArgs;
use crate::ops::backend::expect_dtype;
use crate::ops::backend::metal::{buffer, dispatch, inline_source, output, Arg, Library};
use candle_core::backend::BackendStorage;
use candle_core::{DType, MetalStorage, Result};

fn source() -> String {
    inline_source(
        include_str!("../../../kernels/balance_stats.metal"),
        &[("balance_stats.cuh", include_str!("../../../kernels/balance_stats.cuh"))],
    )
}

const LIBRARY: Library = Library { name: "balance_stats", source, block: None };

/// (logits, element offset), (indices, element offset) -> (2, E) f32.
pub fn forward(
    (s1, o1): (&MetalStorage, usize),
    (s2, o2): (&MetalStorage, usize),
    bp: BalanceKernelArgs,
) -> Result<MetalStorage> {
    expect_dtype("balance-stats", "logits", s1.dtype(), DType::F32)?;
    expect_dtype("balance-stats", "indices", s2.dtype(), DType::U32)?;
    let dev = s1.device();
    let (t, e, c) = (bp.rows as usize, bp.e as usize, bp.n_chunks as usize);
    let stats = buffer(dev, t * 2, DType::F32, "balance_stats_rows")?;
    let part_p = buffer(dev, c * e, DType::F32, "balance_stats_part_p")?;
    let part_n = buffer(dev, c * (e + 1), DType::U32, "balance_stats_part_n")?;
    let (out, buf) = output(dev, 2 * e, DType::F32, "balance_stats")?;
    let (lg, idx, bpa) = (Arg::input(s1, o1), Arg::input(s2, o2), Arg::value(&bp));
    dispatch(dev, &LIBRARY, "balance_stats_rows_f32", &[lg, Arg::Out(&stats, 0), bpa], t)?;
    let partial = [lg, Arg::In(&stats, 0), idx, Arg::Out(&part_p, 0), Arg::Out(&part_n, 0), bpa];
    dispatch(dev, &LIBRARY, "balance_stats_partial_f32", &partial, c * e)?;
    let finish = [Arg::In(&part_p, 0), Arg::In(&part_n, 0), Arg::Out(&buf, 0), bpa];
    dispatch(dev, &LIBRARY, "balance_stats_finish_f32", &finish, e)?;
    Ok(out)
}

/// (logits, element offset), (grad, element offset of its row 1) -> dlogits (T, E) f32.
pub fn backward(
    (s1, o1): (&MetalStorage, usize),
    (s2, o2): (&MetalStorage, usize),
    bp: BalanceKernelArgs,
) -> Result<MetalStorage> {
    expect_dtype("balance-stats-bwd", "logits", s1.dtype(), DType::F32)?;
    expect_dtype("balance-stats-bwd", "grad", s2.dtype(), DType::F32)?;
    let (t, e) = (bp.rows as usize, bp.e as usize);
    let (dl, buf) = output(s1.device(), t * e, DType::F32, "balance_stats_bwd")?;
    let args = [Arg::input(s1, o1), Arg::input(s2, o2), Arg::Out(&buf, 0), Arg::value(&bp)];
    dispatch(s1.device(), &LIBRARY, "balance_stats_bwd_f32", &args, t)?;
    Ok(dl)
}
