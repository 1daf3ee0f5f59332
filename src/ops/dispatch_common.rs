//! What the three MoE dispatch ops ([`expert_sort`](super::expert_sort),
//! [`gather_rows`](super::gather_rows), [`combine`](super::combine)) share: the packed expert-order
//! layout, the kernel parameter struct, a 2-D row layout reader, and the CUDA / Metal launch glue
//! for `kernels/moe_dispatch.{cu,metal}` (one kernel source for the three ops; its per-thread bodies
//! live once in `kernels/moe_dispatch.cuh`).
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
pub const NONE: u32 = u32::MAX;

/// Partial sums per slot of the combine weight gradient (`MD_LANES`): the CPU adds in the same
/// order as the GPU.
pub const LANES: usize = 32;

/// Rows per rayon task of the float ops.
pub const ROWS_PER_TASK: usize = 64;

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

/// The scalar arguments of every kernel entry point: the `#[repr(C)]` twin of `MdParams` in
/// `kernels/moe_dispatch.cuh` (12 four-byte fields).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct MdParams {
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

/// `v` as u32, or an error naming it (the kernels index with 32-bit integers).
pub fn fits(v: usize, what: &str, op: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{op}: {what} = {v} exceeds u32")))
}

impl MdParams {
    /// The parameters for `d` with N = `n` kept rows of width `c`; strides left for the caller.
    pub fn new(d: OrderDims, n: usize, c: usize, op: &str) -> Result<Self> {
        fits(d.len(), "order length E + 1 + 2 T m", op)?;
        fits(n.max(d.t) * c.max(1), "rows * C", op)?;
        Ok(Self { t: d.t as u32, m: d.m as u32, e: d.e as u32, n: n as u32, c: c as u32, ..Default::default() })
    }
}

/// The float types the CPU kernels run in (f32 as the GPU does; f64 for gradient checks).
pub trait Real: Copy + Send + Sync + std::ops::Add<Output = Self> + std::ops::Mul<Output = Self> + 'static {
    const ZERO: Self;
}
impl Real for f32 {
    const ZERO: Self = 0.0;
}
impl Real for f64 {
    const ZERO: Self = 0.0;
}

pub use super::cpu_layout::{u32_slice, Rows};

/// The whole (T, m) slot_row section and the kept row count N of a host order slice.
pub fn host_order<'a>(order: &'a [u32], start: usize, d: OrderDims) -> (&'a [u32], &'a [u32], usize) {
    let o = &order[start..start + d.len()];
    let n = o[d.e] as usize;
    (&o[d.row_slot()..d.slot_row()], &o[d.slot_row()..], n)
}

/// Elements per thread group / block of the 1-D grids.
pub const BLOCK: u32 = 256;

// ---------------------------------------------------------------------------------------------
// CUDA launch glue.

#[cfg(feature = "cuda")]
pub mod cuda {
    use super::{MdParams, BLOCK};
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig};
    use candle_core::{CudaStorage, DType, Result};

    /// PTX of kernels/moe_dispatch.cu, compiled by build.rs.
    pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/moe_dispatch.ptx"));
    pub const MODULE: &str = "gumbel_moe_dispatch";

    // SAFETY: #[repr(C)] plain old data, laid out as the C struct MdParams the kernels take by value.
    unsafe impl DeviceRepr for MdParams {}

    /// A 1-D grid of `total` threads.
    pub fn cfg(total: u32) -> LaunchConfig {
        LaunchConfig { grid_dim: (total.div_ceil(BLOCK).max(1), 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
    }

    pub fn want(s: &CudaStorage, dt: DType, what: &str, op: &str) -> Result<()> {
        use candle_core::backend::BackendStorage;
        if s.dtype() != dt {
            candle_core::bail!("{op} on CUDA: {what} must be {dt:?}, got {:?}", s.dtype());
        }
        Ok(())
    }

    /// Launches entry point `$name` over `$total` threads with the given kernel arguments, then
    /// `total` itself (every entry point's last argument).
    macro_rules! launch {
        ($dev:expr, $name:expr, $total:expr, $($arg:expr),* $(,)?) => {{
            use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
            use candle_core::cuda_backend::WrapErr;
            let total: u32 = $total;
            if total > 0 {
                let func = $dev.get_or_load_custom_func($name, $crate::ops::dispatch_common::cuda::MODULE,
                    $crate::ops::dispatch_common::cuda::PTX)?;
                let mut b = func.builder();
                $(b.arg($arg);)*
                b.arg(&total);
                // SAFETY: every kernel bounds its reads by the layouts checked on the host and
                // writes only within the buffers allocated for it (see kernels/moe_dispatch.cuh).
                unsafe { b.launch($crate::ops::dispatch_common::cuda::cfg(total)) }.w()?;
            }
        }};
    }
    pub(crate) use launch;
}

// ---------------------------------------------------------------------------------------------
// Metal launch glue: the library and pipeline cache of `ops::metal_glue`, and a launch that binds
// several read / written buffers (the sort runs five dependent kernels on shared scratch).

#[cfg(feature = "metal")]
pub mod metal {
    use super::{MdParams, BLOCK};
    use candle_core::{DType, MetalDevice, MetalStorage, Result};
    use candle_metal_kernels::metal::{Buffer, ComputeCommandEncoder};
    use objc2_metal::MTLSize;
    use std::sync::Arc;

    const CUH: &str = include_str!("../../kernels/moe_dispatch.cuh");
    const METAL: &str = include_str!("../../kernels/moe_dispatch.metal");

    /// The .metal file with its `#include "moe_dispatch.cuh"` replaced by the header's text.
    fn source() -> String {
        crate::ops::metal_glue::inline_source(METAL, &[("moe_dispatch.cuh", CUH)])
    }

    /// Checks the dtypes of Metal inputs: `floats` f32, `ints` u32.
    pub fn f32_u32(floats: &[&MetalStorage], ints: &[&MetalStorage], op: &str) -> Result<()> {
        use candle_core::backend::BackendStorage;
        for s in floats {
            if s.dtype() != DType::F32 {
                candle_core::bail!("{op} on Metal: float inputs must be f32, got {:?}", s.dtype());
            }
        }
        for s in ints {
            if s.dtype() != DType::U32 {
                candle_core::bail!("{op} on Metal: the order must be u32, got {:?}", s.dtype());
            }
        }
        Ok(())
    }

    /// A new f32 output of `n` elements on the device of `like`, and its buffer for binding.
    pub fn output(like: &MetalStorage, n: usize) -> Result<(MetalStorage, Arc<Buffer>)> {
        use candle_core::backend::BackendStorage;
        let dev = like.device();
        let buf = dev.new_buffer_builder().with_size_for(n.max(1), DType::F32).with_label("moe-dispatch").build()?;
        Ok((MetalStorage::new(buf.clone(), dev.clone(), n, DType::F32), buf))
    }

    /// A buffer argument: (buffer, byte offset, written by the kernel). Written buffers are bound as
    /// outputs so candle's encoder puts a barrier between dependent dispatches.
    pub type Arg<'a> = (&'a Buffer, usize, bool);

    /// Encodes `name` over `total` threads: `args` at buffer indices 0.., then the params, then `total`.
    pub fn launch(dev: &MetalDevice, name: &'static str, args: &[Arg], p: MdParams, total: u32) -> Result<()> {
        if total == 0 {
            return Ok(());
        }
        let pipe = crate::ops::metal_glue::pipeline(dev, "moe_dispatch", source, name)?;
        let guard = dev.command_encoder()?;
        let enc: &ComputeCommandEncoder = guard.as_ref();
        enc.set_compute_pipeline_state(&pipe);
        for (i, &(buf, off, out)) in args.iter().enumerate() {
            if out {
                enc.set_output_buffer(i, Some(buf), off);
            } else {
                enc.set_input_buffer(i, Some(buf), off);
            }
        }
        enc.set_bytes(args.len(), &p);
        enc.set_bytes(args.len() + 1, &total);
        let width = (BLOCK as usize).min(pipe.max_total_threads_per_threadgroup()).max(1);
        enc.dispatch_thread_groups(
            MTLSize { width: (total as usize).div_ceil(width), height: 1, depth: 1 },
            MTLSize { width, height: 1, depth: 1 },
        );
        Ok(())
    }
}
