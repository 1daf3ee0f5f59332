//! The CUDA launch of every custom op: a PTX module (compiled from `kernels/NAME.cu` by
//! `build.rs`, loaded once per device and cached by candle), and [`launch`], which runs one of its
//! entry points over a 1-D grid with the arguments in order.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchArgs, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, Result};

/// A PTX module: its cache name, its text and the threads per block of its launches.
pub(crate) struct Module {
    pub name: &'static str,
    pub ptx: &'static str,
    pub block: u32,
}

/// One kernel argument, pushed in order: a device buffer (slice or view) or a value (the
/// `#[repr(C)]` kernel-args structs, a u32 count).
pub(crate) trait Arg {
    fn push<'a>(&'a self, b: &mut LaunchArgs<'a>);
}

impl<T> Arg for CudaSlice<T> {
    fn push<'a>(&'a self, b: &mut LaunchArgs<'a>) {
        b.arg(self);
    }
}

impl<T> Arg for CudaView<'_, T> {
    fn push<'a>(&'a self, b: &mut LaunchArgs<'a>) {
        b.arg(self);
    }
}

impl Arg for u32 {
    fn push<'a>(&'a self, b: &mut LaunchArgs<'a>) {
        b.arg(self);
    }
}

/// Makes a `#[repr(C)]` kernel-args struct a kernel argument passed by value.
macro_rules! by_value {
    ($t:ty) => {
        // SAFETY: #[repr(C)] plain old data (u32 / f32 fields), laid out as the C struct of the same
        // name in kernels/ that the entry points take by value.
        unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for $t {}
        impl $crate::ops::backend::cuda::Arg for $t {
            fn push<'a>(&'a self, b: &mut candle_core::cuda_backend::cudarc::driver::LaunchArgs<'a>) {
                use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
                b.arg(self);
            }
        }
    };
}
pub(crate) use by_value;

/// Runs entry point `func` of `module` over `threads` threads (nothing when 0), with `args` in
/// the order of the kernel's parameters.
///
/// Every entry point bounds its thread index by a count in its arguments and reads and writes
/// only within the layouts the op checked on the host (see the kernels' headers).
pub(crate) fn launch(dev: &CudaDevice, module: &Module, func: &str, threads: usize, args: &[&dyn Arg]) -> Result<()> {
    if threads == 0 {
        return Ok(());
    }
    let threads = super::fits(threads, "threads", func)?;
    let f = dev.get_or_load_custom_func(func, module.name, module.ptx)?;
    let mut b = f.builder();
    for a in args {
        a.push(&mut b);
    }
    let cfg = LaunchConfig {
        grid_dim: (threads.div_ceil(module.block), 1, 1),
        block_dim: (module.block, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match the entry point's parameters (the callers mirror the kernel
    // signatures), and the kernels stay within the buffers as documented above.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}
