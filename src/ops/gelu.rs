//! Exact (erf) GELU, y = x Phi(x), as one op each way: the forward and its backward
//! ([`GeluBwd`], itself an op: dx = dy (Phi(x) + x phi(x))) are single passes, where Candle's
//! `gelu_erf` backward is a chain of about 12 tensor ops with scalar `erff`/`expf`.
//!
//! f32: a Chebyshev fit of erfc (relative error < 1.2e-7) on the same e^(-x^2/2) that phi needs,
//! from a polynomial exp: two exps per element, no libm call, so the loops vectorize. f64:
//! Candle's erf and libm's exp. CPU kernel here; the f32 GPU kernels (the same fit) are in
//! `kernels/layers.cuh`; the plain-tensor twin is [`gelu_reference`].

use super::backend::cpu::{contiguous, out_vec, Float};
use super::backend::simd::widest;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Elements per rayon task.
const CHUNK: usize = 1 << 14;

/// The GPU kernels' scalar arguments (`GeluKernelArgs` in kernels/layers.cuh).
#[cfg(any(feature = "cuda", feature = "metal"))]
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct GeluKernelArgs {
    n: u32,
    pad: [u32; 3],
}

#[cfg(feature = "cuda")]
super::backend::cuda::by_value!(GeluKernelArgs);

/// The kernel arguments of `n` elements, after the dtype check.
#[cfg(any(feature = "cuda", feature = "metal"))]
fn gpu_args(op: &str, dtype: candle_core::DType, n: usize) -> Result<GeluKernelArgs> {
    super::backend::expect_dtype(op, "x", dtype, candle_core::DType::F32)?;
    Ok(GeluKernelArgs { n: super::backend::fits(n, "elements", op)?, pad: [0; 3] })
}

/// GELU with the exact (erf) form, as PyTorch's `nn.GELU()`.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if !super::layer_kernels::has_kernel(x) {
        return gelu_reference(x);
    }
    x.contiguous()?.apply_op1(Gelu)
}

/// The plain-tensor twin of [`gelu`]: x (1 + erf(x / sqrt 2)) / 2 from Candle's `erf`, whose
/// backward is exact (Candle's own `gelu_erf` backward rounds 1/sqrt(2 pi) to 0.398942, a 7e-7
/// relative error).
pub fn gelu_reference(x: &Tensor) -> Result<Tensor> {
    ((x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)?.mul(&(x * 0.5)?)
}

/// (Phi(x), phi(x)): the standard normal CDF and density.
pub(crate) trait Normal: Float {
    fn cdf_pdf(self) -> (Self, Self);
}

impl Normal for f32 {
    #[inline(always)]
    fn cdf_pdf(self) -> (f32, f32) {
        // erfc(z) = t exp(-z^2 + P(t)), t = 1 / (1 + z / 2) (Numerical Recipes' erfcc, Chebyshev
        // fit): relative error below 1.2e-7 for every z >= 0, so the lower tail of Phi keeps its
        // relative accuracy.
        const C: [f32; 10] = [
            -1.265_512_2,
            1.000_023_7,
            0.374_091_96,
            0.096_784_18,
            -0.186_288_06,
            0.278_868_07,
            -1.135_204,
            1.488_515_9,
            -0.822_152_2,
            0.170_872_77,
        ];
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        let z = self.abs() * std::f32::consts::FRAC_1_SQRT_2;
        let e = super::float::exp_f32(-0.5 * self * self); // e^(-z^2) = e^(-x^2/2)
        let t = 1.0 / (1.0 + 0.5 * z);
        let p = C[0]
            + t * (C[1]
                + t * (C[2] + t * (C[3] + t * (C[4] + t * (C[5] + t * (C[6] + t * (C[7] + t * (C[8] + t * C[9]))))))));
        let erfc = t * e * super::float::exp_f32(p);
        // Phi(x) = erfc(-x / sqrt 2) / 2: for x < 0 straight from the tail, no cancellation.
        let cdf = if self < 0.0 { 0.5 * erfc } else { 1.0 - 0.5 * erfc };
        (cdf, INV_SQRT_2PI * e)
    }
}

impl Normal for f64 {
    #[inline(always)]
    fn cdf_pdf(self) -> (f64, f64) {
        let cdf = 0.5 * (1.0 + candle_core::cpu::erf::erf_f64(self * std::f64::consts::FRAC_1_SQRT_2));
        (cdf, (-0.5 * self * self).exp() / (2.0 * std::f64::consts::PI).sqrt())
    }
}

/// The forward op.
#[derive(Clone, Copy, Debug)]
pub struct Gelu;

/// The backward op: (x, dy) -> dx.
#[derive(Clone, Copy, Debug)]
pub struct GeluBwd;

/// (gelu(x), gelu'(x)) = (x Phi(x), Phi(x) + x phi(x)): written once, so that the op, its backward
/// and the MLP kernels' kept derivative have the same bits.
#[inline(always)]
fn act_and_deriv<T: Normal>(x: T) -> (T, T) {
    let (cdf, pdf) = x.cdf_pdf();
    (x * cdf, cdf + x * pdf)
}

widest! {
    /// y = x Phi(x), element by element.
    fn gelu_chunk<T: Normal>(y: &mut [T], x: &[T]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = act_and_deriv(x).0;
        }
    }
}

widest! {
    /// dx = dy (Phi(x) + x phi(x)), element by element.
    fn gelu_bwd_chunk<T: Normal>(dx: &mut [T], x: &[T], dy: &[T]) {
        for ((d, &x), &g) in dx.iter_mut().zip(x).zip(dy) {
            *d = g * act_and_deriv(x).1;
        }
    }
}

widest! {
    /// In place over the pre-activation z: a = gelu(z), and d = gelu'(z), for an MLP whose
    /// backward then needs no activation of its own.
    pub(crate) fn gelu_act_and_deriv<T: Normal>(a: &mut [T], d: &mut [T]) {
        for (a, d) in a.iter_mut().zip(d.iter_mut()) {
            (*a, *d) = act_and_deriv(*a);
        }
    }
}

fn fwd_cpu<T: Normal>(x: &[T]) -> Vec<T> {
    let mut y = out_vec::<T>(x.len());
    y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(ys, xs)| gelu_chunk(ys, xs));
    y
}

fn bwd_cpu<T: Normal>(x: &[T], dy: &[T]) -> Vec<T> {
    let mut dx = out_vec::<T>(x.len());
    dx.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .zip(dy.par_chunks(CHUNK))
        .for_each(|((ds, xs), gs)| gelu_bwd_chunk(ds, xs, gs));
    dx
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (a, z) = contiguous(l, "x", "gelu")?;
        let out = match s {
            CpuStorage::F32(v) => f32::storage(fwd_cpu(&v[a..z])),
            CpuStorage::F64(v) => f64::storage(fwd_cpu(&v[a..z])),
            other => candle_core::bail!("gelu: f32 or f64 input required, got {:?}", other.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let (a, z) = contiguous(l, "x", self.name())?;
        let p = gpu_args(self.name(), s.dtype(), z - a)?;
        let dev = s.device();
        // SAFETY: the kernel writes every one of the z - a elements.
        let y = unsafe { dev.alloc::<f32>((z - a).max(1))? };
        let x = s.as_cuda_slice::<f32>()?.slice(a..z);
        super::backend::cuda::launch(dev, &super::layer_kernels::MODULE, "gelu_f32", z - a, &[&x, &y, &p])?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(y, dev.clone()), l.shape().clone()))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(&self, s: &candle_core::MetalStorage, l: &Layout) -> Result<(candle_core::MetalStorage, Shape)> {
        use super::backend::metal::{dispatch, output, Arg};
        let (a, z) = contiguous(l, "x", self.name())?;
        let p = gpu_args(self.name(), s.dtype(), z - a)?;
        let (y, buf) = output(s.device(), z - a, candle_core::DType::F32, self.name())?;
        let args = [Arg::input(s, a), Arg::Out(&buf, 0), Arg::value(&p)];
        dispatch(s.device(), &super::layer_kernels::LIBRARY, "gelu_f32", &args, z - a)?;
        Ok((y, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &GeluBwd)?))
    }
}

impl CustomOp2 for GeluBwd {
    fn name(&self) -> &'static str {
        "gelu-bwd"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sg: &CpuStorage, lg: &Layout) -> Result<(CpuStorage, Shape)> {
        let ((a, z), (ga, gz)) = bwd_layouts(lx, lg)?;
        let out = match sx {
            CpuStorage::F32(v) => f32::storage(bwd_cpu(&v[a..z], &f32::slice(sg, "dy", "gelu-bwd")?[ga..gz])),
            CpuStorage::F64(v) => f64::storage(bwd_cpu(&v[a..z], &f64::slice(sg, "dy", "gelu-bwd")?[ga..gz])),
            other => candle_core::bail!("gelu-bwd: f32 or f64 input required, got {:?}", other.dtype()),
        };
        Ok((out, lx.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sg: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let ((a, z), (ga, gz)) = bwd_layouts(lx, lg)?;
        let p = gpu_args(self.name(), sx.dtype(), z - a)?;
        super::backend::expect_dtype(self.name(), "dy", sg.dtype(), candle_core::DType::F32)?;
        let dev = sx.device();
        // SAFETY: the kernel writes every one of the z - a elements.
        let dx = unsafe { dev.alloc::<f32>((z - a).max(1))? };
        let x = sx.as_cuda_slice::<f32>()?.slice(a..z);
        let dy = sg.as_cuda_slice::<f32>()?.slice(ga..gz);
        let m = &super::layer_kernels::MODULE;
        super::backend::cuda::launch(dev, m, "gelu_bwd_f32", z - a, &[&x, &dy, &dx, &p])?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(dx, dev.clone()), lx.shape().clone()))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        sx: &candle_core::MetalStorage,
        lx: &Layout,
        sg: &candle_core::MetalStorage,
        lg: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        use super::backend::metal::{dispatch, output, Arg};
        let ((a, z), (ga, _)) = bwd_layouts(lx, lg)?;
        let p = gpu_args(self.name(), sx.dtype(), z - a)?;
        super::backend::expect_dtype(self.name(), "dy", sg.dtype(), candle_core::DType::F32)?;
        let (dx, buf) = output(sx.device(), z - a, candle_core::DType::F32, self.name())?;
        let args = [Arg::input(sx, a), Arg::input(sg, ga), Arg::Out(&buf, 0), Arg::value(&p)];
        dispatch(sx.device(), &super::layer_kernels::LIBRARY, "gelu_bwd_f32", &args, z - a)?;
        Ok((dx, lx.shape().clone()))
    }
}

/// The contiguous ranges of x and dy, which must have one shape.
fn bwd_layouts(lx: &Layout, lg: &Layout) -> Result<((usize, usize), (usize, usize))> {
    if lx.shape() != lg.shape() {
        candle_core::bail!("gelu-bwd: dy has shape {:?}, x has {:?}", lg.shape(), lx.shape());
    }
    Ok((contiguous(lx, "x", "gelu-bwd")?, contiguous(lg, "dy", "gelu-bwd")?))
}
