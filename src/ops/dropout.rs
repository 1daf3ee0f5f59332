//! Inverted dropout as a custom op whose keep-mask is drawn on the device itself from Philox.
//!
//! Element i of the (contiguous) input uses word i % 4 of
//! `rng::draw(seed, Stream::Dropout, site, hi, i / 4)` and is dropped when that word's top 23 bits k
//! give (k + 0.5) / 2^23 < p, tested in integers as k < ceil(p * 2^23 - 0.5), so CPU, CUDA and Metal
//! drop exactly the same elements. Kept elements are multiplied by 1 / (1 - p) (f32), dropped ones
//! by 0. Nothing is stored for the backward: dropout is linear with a mask that is a pure function of
//! the key, so `bwd` applies the same op to the gradient (the backward op is the op itself, with its
//! kernels on every backend). No mask ever travels from the host, which matters on a GPU: a
//! (B, nh, T, T) attention mask of the GPU recipe is 25 M elements per layer.
//!
//! Kernels: `kernels/dropout.cuh` (the body, shared), `kernels/dropout.cu` (PTX, feature `cuda`),
//! `kernels/dropout.metal` (compiled at run time). The plain-tensor twin is [`dropout_reference`]:
//! the host-built mask times x.

use super::backend::cpu::{contiguous, Float};
use crate::rng::{draw, Stream};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Elements per rayon task (a multiple of 4).
const CHUNK: usize = 1 << 14;

/// The key and the rate of one dropout site.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PhiloxDropout {
    /// Drop probability, in [0, 1).
    pub p: f64,
    pub seed: u64,
    /// Which dropout in the model (counter word 0).
    pub site: u32,
    /// Counter word 1: `(step & 0xffff) << 16 | (micro & 0xffff)`.
    pub hi: u32,
}

/// The scalar arguments of the kernels: the `#[repr(C)]` twin of `DropoutKernelArgs` in
/// `kernels/dropout.cuh` (8 four-byte fields, same order).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub(crate) struct DropoutKernelArgs {
    pub n: u32,
    pub site: u32,
    pub hi: u32,
    pub threshold: u32,
    pub seed_lo: u32,
    pub seed_hi: u32,
    pub scale: f32,
    pub pad: u32,
}

impl PhiloxDropout {
    /// The counter word `hi` for a training step and micro-batch.
    pub fn hi(step: u64, micro: u32) -> u32 {
        ((step as u32) & 0xffff) << 16 | (micro & 0xffff)
    }

    /// Drop when the top 23 bits of the word are below this.
    pub fn threshold(&self) -> u32 {
        (self.p * 8_388_608.0 - 0.5).ceil().clamp(0.0, 8_388_608.0) as u32
    }

    pub fn scale(&self) -> f32 {
        (1.0 / (1.0 - self.p)) as f32
    }

    fn params(&self, n: usize) -> Result<DropoutKernelArgs> {
        if !(0.0..1.0).contains(&self.p) {
            candle_core::bail!("dropout: p = {} must be in [0, 1)", self.p);
        }
        let n = super::backend::fits(n, "elements", "dropout")?;
        Ok(DropoutKernelArgs {
            n,
            site: self.site,
            hi: self.hi,
            threshold: self.threshold(),
            seed_lo: self.seed as u32,
            seed_hi: (self.seed >> 32) as u32,
            scale: self.scale(),
            pad: 0,
        })
    }

    /// The mask values (0 or scale) of elements 4g .. 4g + 3.
    #[inline]
    fn group(&self, thr: u32, scale: f32, g: usize) -> [f32; 4] {
        draw(self.seed, Stream::Dropout, self.site, self.hi, g as u32).map(|w| if (w >> 9) < thr { 0.0 } else { scale })
    }

    fn cpu<T: Float>(&self, x: &[T]) -> Vec<T> {
        let (thr, scale) = (self.threshold(), self.scale());
        let mut y: Vec<T> = x.to_vec();
        y.par_chunks_mut(CHUNK).enumerate().for_each(|(c, ys)| {
            for (j, quad) in ys.chunks_mut(4).enumerate() {
                let m = self.group(thr, scale, (c * CHUNK) / 4 + j);
                for (v, &mk) in quad.iter_mut().zip(&m) {
                    *v = *v * T::from_f32(mk);
                }
            }
        });
        y
    }
}

impl CustomOp1 for PhiloxDropout {
    fn name(&self) -> &'static str {
        "philox-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (a, b) = contiguous(l, "input", "dropout")?;
        self.params(b - a)?;
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(self.cpu(&v[a..b])),
            CpuStorage::F64(v) => CpuStorage::F64(self.cpu(&v[a..b])),
            other => candle_core::bail!("dropout: f32 or f64 input required, got {:?}", other.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::backend::cuda::{launch, Module};
        const MODULE: Module = Module {
            name: "gumbel_moe_dropout",
            ptx: include_str!(concat!(env!("OUT_DIR"), "/dropout.ptx")),
            block: 256,
        };
        let (a, b) = contiguous(l, "input", "dropout")?;
        let p = self.params(b - a)?;
        super::backend::expect_dtype(self.name(), "input", s.dtype(), candle_core::DType::F32)?;
        let dev = s.device();
        // SAFETY: every element is written by the kernel below (one thread per group of 4).
        let out = unsafe { dev.alloc::<f32>((b - a).max(1))? };
        let x = s.as_cuda_slice::<f32>()?.slice(a..b);
        launch(dev, &MODULE, "philox_dropout_f32", (b - a).div_ceil(4), &[&x, &out, &p])?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()), l.shape().clone()))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(&self, s: &candle_core::MetalStorage, l: &Layout) -> Result<(candle_core::MetalStorage, Shape)> {
        use super::backend::metal::{dispatch, inline_source, output, Arg, Library};
        use candle_core::DType;
        fn source() -> String {
            let body =
                format!("{}\n{}", include_str!("../../kernels/philox.h"), include_str!("../../kernels/dropout.cuh"));
            inline_source(include_str!("../../kernels/dropout.metal"), &[("dropout.cuh", &body)])
        }
        const LIBRARY: Library = Library { name: "gumbel_moe_dropout", source, block: None };
        let (a, b) = contiguous(l, "input", "dropout")?;
        let p = self.params(b - a)?;
        super::backend::expect_dtype(self.name(), "input", s.dtype(), DType::F32)?;
        let (out, buf) = output(s.device(), b - a, DType::F32, self.name())?;
        let args = [Arg::input(s, a), Arg::Out(&buf, 0), Arg::value(&p)];
        dispatch(s.device(), &LIBRARY, "philox_dropout_f32", &args, (b - a).div_ceil(4))?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

#[cfg(feature = "cuda")]
super::backend::cuda::by_value!(DropoutKernelArgs);

/// y = dropout(x) through the op (its backward is the op on the gradient).
pub fn philox_dropout(x: &Tensor, d: &PhiloxDropout) -> Result<Tensor> {
    x.contiguous()?.apply_op1(*d)
}

/// The plain-tensor twin: the mask built on the host, then `x * mask`.
pub fn dropout_reference(x: &Tensor, d: &PhiloxDropout) -> Result<Tensor> {
    let n = x.elem_count();
    let (thr, scale) = (d.threshold(), d.scale());
    let mut mask = Vec::with_capacity(n + 3);
    for g in 0..n.div_ceil(4) {
        mask.extend_from_slice(&d.group(thr, scale, g));
    }
    mask.truncate(n);
    let mask = Tensor::from_vec(mask, x.shape(), &candle_core::Device::Cpu)?.to_device(x.device())?;
    x.mul(&mask.to_dtype(x.dtype())?)
}
