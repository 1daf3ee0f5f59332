//! What the three MoE dispatch ops ([`expert_sort`](super::expert_sort),
//! [`gather_rows`](super::gather_rows), [`combine`](super::combine)) share: the packed expert-order
//! layout, the kernel arguments, and the one kernel source of the three,
//! `kernels/moe_dispatch.{cu,metal}` (per-thread bodies in `kernels/moe_dispatch.cuh`).
//!
//! The order tensor, u32 (E + 1 + 2 T m), for T tokens with m slots over E experts:
//!
//! | range                  | what                                                               |
//! |------------------------|--------------------------------------------------------------------|
//! | `[0, E]`               | offsets: expert e owns sorted rows `offsets[e]..offsets[e + 1]`     |
//! | `E + 1 ..` (T m)       | row_slot: flat slot `t * m + s` of each sorted row (u32::MAX past N) |
//! | `E + 1 + T m ..` (T m) | slot_row: sorted row of each flat slot, u32::MAX when dropped       |
//!
//! N = offsets[E] rows are kept. A fixed size lets the GPU sort run without a host round trip; the
//! host then copies only the E + 1 offsets (N, tokens per expert) before the float ops.

use candle_core::{Layout, Result};

/// Marks a dropped slot or an unused row (`MD_NONE` in the kernels).
pub(crate) const NONE: u32 = u32::MAX;

/// Partial sums per slot of the combine weight gradient (`MD_LANES`): the CPU adds in the same
/// order as the GPU.
pub(crate) const LANES: usize = 32;

/// Rows per rayon task of the float ops.
pub(crate) const ROWS_PER_TASK: usize = 64;

/// (T, m, E): the shape of a routing, which fixes the order tensor's layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrderDims {
    pub t: usize,
    pub m: usize,
    pub e: usize,
}

impl OrderDims {
    /// Length of the order tensor: E + 1 + 2 T m.
    pub fn len(&self) -> usize {
        self.e + 1 + 2 * self.t * self.m
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// Start of row_slot.
    pub fn row_slot(&self) -> usize {
        self.e + 1
    }

    /// Start of slot_row.
    pub fn slot_row(&self) -> usize {
        self.e + 1 + self.t * self.m
    }

    /// Checks that `l` is a contiguous 1-D order tensor of this shape; returns its start offset.
    pub fn check(&self, l: &Layout, op: &str) -> Result<usize> {
        if l.dims() != [self.len()] || !l.is_contiguous() {
            candle_core::bail!(
                "{op}: order must be the contiguous 1-D ({}) u32 output of expert_sort for T = {}, m = {}, E = {}, got {:?} strides {:?}",
                self.len(),
                self.t,
                self.m,
                self.e,
                l.shape(),
                l.stride()
            );
        }
        Ok(l.start_offset())
    }
}

/// The scalar arguments of every kernel entry point: the `#[repr(C)]` twin of `DispatchKernelArgs`
/// in `kernels/moe_dispatch.cuh` (12 four-byte fields, same order). Every entry point also takes
/// its thread count `total` (u32) as its last argument.
#[cfg(any(feature = "cuda", feature = "metal"))]
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub(crate) struct DispatchKernelArgs {
    pub t: u32,
    pub m: u32,
    pub e: u32,
    pub n: u32,
    pub c: u32,
    pub cap: u32,
    pub chunk: u32,
    pub n_chunks: u32,
    pub a_stride: u32,
    pub b_stride: u32,
    pub w_stride: u32,
    pub pad: u32,
}

#[cfg(any(feature = "cuda", feature = "metal"))]
impl DispatchKernelArgs {
    /// The parameters for `d` with N = `n` kept rows of width `c`; strides left for the caller.
    pub(crate) fn new(d: OrderDims, n: usize, c: usize, op: &str) -> Result<Self> {
        super::backend::fits(d.len(), "order length E + 1 + 2 T m", op)?;
        super::backend::fits(n.max(d.t) * c.max(1), "rows * C", op)?;
        Ok(Self { t: d.t as u32, m: d.m as u32, e: d.e as u32, n: n as u32, c: c as u32, ..Default::default() })
    }
}

/// The whole (T, m) slot_row section and the kept row count N of a host order slice.
pub(crate) fn host_order(order: &[u32], start: usize, d: OrderDims) -> (&[u32], &[u32], usize) {
    let o = &order[start..start + d.len()];
    let n = o[d.e] as usize;
    (&o[d.row_slot()..d.slot_row()], &o[d.slot_row()..], n)
}

/// The PTX of `kernels/moe_dispatch.cu` (256 threads per block).
#[cfg(feature = "cuda")]
pub(crate) const CUDA: crate::ops::backend::cuda::Module = crate::ops::backend::cuda::Module {
    name: "gumbel_moe_dispatch",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/moe_dispatch.ptx")),
    block: 256,
};

#[cfg(feature = "cuda")]
crate::ops::backend::cuda::by_value!(DispatchKernelArgs);

/// `kernels/moe_dispatch.metal` with its `#include "moe_dispatch.cuh"` replaced by the header's text.
#[cfg(feature = "metal")]
fn metal_source() -> String {
    crate::ops::backend::metal::inline_source(
        include_str!("../../kernels/moe_dispatch.metal"),
        &[("moe_dispatch.cuh", include_str!("../../kernels/moe_dispatch.cuh"))],
    )
}

/// The Metal library of the dispatch ops (256 threads per group).
#[cfg(feature = "metal")]
pub(crate) const METAL: crate::ops::backend::metal::Library =
    crate::ops::backend::metal::Library { name: "moe_dispatch", source: metal_source, block: Some(256) };

/// Launches dispatch entry point `func` over `total` threads with `args`, then `total` itself.
#[cfg(feature = "cuda")]
pub(crate) fn cuda_launch(
    dev: &candle_core::CudaDevice,
    func: &str,
    total: u32,
    args: &[&dyn crate::ops::backend::cuda::Arg],
) -> Result<()> {
    let mut all = args.to_vec();
    all.push(&total);
    crate::ops::backend::cuda::launch(dev, &CUDA, func, total as usize, &all)
}

/// Encodes dispatch entry point `func` over `total` threads with `args`, then `total` itself.
#[cfg(feature = "metal")]
pub(crate) fn metal_dispatch(
    dev: &candle_core::MetalDevice,
    func: &'static str,
    total: u32,
    args: &[crate::ops::backend::metal::Arg],
) -> Result<()> {
    use crate::ops::backend::metal::{dispatch, Arg};
    let mut all = args.to_vec();
    all.push(Arg::value(&total));
    dispatch(dev, &METAL, func, &all, total as usize)
}
