//! The GPU glue of the norm ops: f32 kernels `norm_f32`, `norm_bwd_rows_f32` and
//! `norm_bwd_params_f32` of `kernels/layers.{cu,metal}` (bodies in `kernels/layers.cuh`), with
//! the layouts checked as on the CPU.

use super::{shape, Norm};
use crate::ops::backend::cpu::contiguous;
use crate::ops::backend::{expect_dtype, fits};
use candle_core::{DType, Layout, Result};

/// The kernels' scalar arguments (`NormKernelArgs` in kernels/layers.cuh).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(super) struct NormKernelArgs {
    rows: u32,
    c: u32,
    rms: u32,
    has_beta: u32,
    eps: f32,
    inv_c: f32,
    pad: [u32; 2],
}

#[cfg(feature = "cuda")]
crate::ops::backend::cuda::by_value!(NormKernelArgs);

/// Element ranges of x (rows, C), of each (C) parameter, and the kernel arguments; every input f32.
pub(super) struct Plan {
    pub x: (usize, usize),
    pub params: Vec<usize>,
    pub rows: usize,
    pub c: usize,
    pub args: NormKernelArgs,
}

impl Plan {
    /// `params`: (dtype, layout, name) of gamma and beta (forward) or gamma (backward).
    pub fn new(
        op: Norm,
        name: &str,
        x: (DType, &Layout),
        params: &[(DType, &Layout, &str)],
        beta: bool,
    ) -> Result<Self> {
        let (rows, c) = shape(x.1, "x")?;
        expect_dtype(name, "x", x.0, DType::F32)?;
        let mut starts = Vec::with_capacity(params.len());
        for &(dt, l, what) in params {
            expect_dtype(name, what, dt, DType::F32)?;
            let (a, b) = contiguous(l, what, name)?;
            if b - a != c || l.dims().len() != 1 {
                candle_core::bail!("{name}: {what} must have shape ({c}), got {:?}", l.shape());
            }
            starts.push(a);
        }
        let args = NormKernelArgs {
            rows: fits(rows, "rows", name)?,
            c: fits(c, "C", name)?,
            rms: op.rms as u32,
            has_beta: beta as u32,
            eps: op.eps as f32,
            inv_c: (1.0 / c as f64) as f32,
            pad: [0; 2],
        };
        Ok(Self { x: contiguous(x.1, "x", name)?, params: starts, rows, c, args })
    }
}

#[cfg(feature = "cuda")]
pub(super) mod cuda {
    use super::Plan;
    use crate::ops::backend::cuda::launch;
    use crate::ops::layer_kernels::MODULE;
    use candle_core::backend::BackendStorage;
    use candle_core::{CudaStorage, Result};

    /// y = norm(x) gamma (+ beta): one thread per row. Without beta, gamma is bound in its place.
    pub fn fwd(p: &Plan, x: &CudaStorage, g: &CudaStorage, b: Option<&CudaStorage>) -> Result<CudaStorage> {
        let dev = x.device();
        let (a, z) = p.x;
        // SAFETY: one thread per row writes all C elements of its row.
        let y = unsafe { dev.alloc::<f32>((z - a).max(1))? };
        let xv = x.as_cuda_slice::<f32>()?.slice(a..z);
        let gv = g.as_cuda_slice::<f32>()?.slice(p.params[0]..p.params[0] + p.c);
        let bv = match b {
            Some(b) => b.as_cuda_slice::<f32>()?.slice(p.params[1]..p.params[1] + p.c),
            None => g.as_cuda_slice::<f32>()?.slice(p.params[0]..p.params[0] + p.c),
        };
        launch(dev, &MODULE, "norm_f32", p.rows, &[&xv, &gv, &bv, &y, &p.args])?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }

    /// (rows + 2, C): dx, dgamma, dbeta; row statistics in a scratch buffer between the launches.
    pub fn bwd(
        p: &Plan,
        x: &CudaStorage,
        g: &CudaStorage,
        dy: &CudaStorage,
        dy_at: (usize, usize),
    ) -> Result<CudaStorage> {
        let dev = x.device();
        let (a, z) = p.x;
        // SAFETY: the rows kernel writes rows 0..R (dx) and the statistics, the params kernel rows R, R + 1.
        let out = unsafe { dev.alloc::<f32>((p.rows + 2) * p.c)? };
        let stats = unsafe { dev.alloc::<f32>(2 * p.rows)? };
        let xv = x.as_cuda_slice::<f32>()?.slice(a..z);
        let gv = g.as_cuda_slice::<f32>()?.slice(p.params[0]..p.params[0] + p.c);
        let dyv = dy.as_cuda_slice::<f32>()?.slice(dy_at.0..dy_at.1);
        launch(dev, &MODULE, "norm_bwd_rows_f32", p.rows, &[&xv, &gv, &dyv, &out, &stats, &p.args])?;
        launch(dev, &MODULE, "norm_bwd_params_f32", p.c, &[&xv, &dyv, &stats, &out, &p.args])?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

#[cfg(feature = "metal")]
pub(super) mod metal {
    use super::Plan;
    use crate::ops::backend::metal::{buffer, dispatch, output, Arg};
    use crate::ops::layer_kernels::LIBRARY;
    use candle_core::backend::BackendStorage;
    use candle_core::{DType, MetalStorage, Result};

    /// y = norm(x) gamma (+ beta): one thread per row. Without beta, gamma is bound in its place.
    pub fn fwd(p: &Plan, x: &MetalStorage, g: &MetalStorage, b: Option<&MetalStorage>) -> Result<MetalStorage> {
        let (y, buf) = output(x.device(), p.x.1 - p.x.0, DType::F32, "norm")?;
        let beta = match b {
            Some(b) => Arg::input(b, p.params[1]),
            None => Arg::input(g, p.params[0]),
        };
        let args = [Arg::input(x, p.x.0), Arg::input(g, p.params[0]), beta, Arg::Out(&buf, 0), Arg::value(&p.args)];
        dispatch(x.device(), &LIBRARY, "norm_f32", &args, p.rows)?;
        Ok(y)
    }

    /// (rows + 2, C): dx, dgamma, dbeta; row statistics in a scratch buffer between the dispatches.
    pub fn bwd(p: &Plan, x: &MetalStorage, g: &MetalStorage, dy: &MetalStorage, dy_at: usize) -> Result<MetalStorage> {
        let dev = x.device();
        let (out, buf) = output(dev, (p.rows + 2) * p.c, DType::F32, "norm-bwd")?;
        let stats = buffer(dev, 2 * p.rows, DType::F32, "norm-bwd stats")?;
        let (xa, ga) = (Arg::input(x, p.x.0), Arg::input(g, p.params[0]));
        let rows = [xa, ga, Arg::input(dy, dy_at), Arg::Out(&buf, 0), Arg::Out(&stats, 0), Arg::value(&p.args)];
        dispatch(dev, &LIBRARY, "norm_bwd_rows_f32", &rows, p.rows)?;
        let params = [xa, Arg::input(dy, dy_at), Arg::In(&stats, 0), Arg::Out(&buf, 0), Arg::value(&p.args)];
        dispatch(dev, &LIBRARY, "norm_bwd_params_f32", &params, p.c)?;
        Ok(out)
    }
}
