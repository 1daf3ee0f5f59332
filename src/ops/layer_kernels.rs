//! The GPU kernels of the fused layer ops ([`gelu`](super::gelu), [`norm`](super::layer_norm),
//! [`causal_softmax`](super::causal_softmax)): one PTX module and one Metal library built from
//! `kernels/layers.{cu,metal}`, whose bodies are shared in `kernels/layers.cuh`.

/// kernels/layers.cu as PTX (built by build.rs, feature `cuda`).
#[cfg(feature = "cuda")]
pub(crate) const MODULE: super::backend::cuda::Module = super::backend::cuda::Module {
    name: "gumbel_moe_layers",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/layers.ptx")),
    block: 256,
};

#[cfg(feature = "metal")]
fn source() -> String {
    super::backend::metal::inline_source(
        include_str!("../../kernels/layers.metal"),
        &[("layers.cuh", include_str!("../../kernels/layers.cuh"))],
    )
}

/// kernels/layers.metal with layers.cuh pasted in (compiled at run time, feature `metal`).
#[cfg(feature = "metal")]
pub(crate) const LIBRARY: super::backend::metal::Library =
    super::backend::metal::Library { name: "gumbel_moe_layers", source, block: None };

/// Whether `x` runs the op's own kernel: on the CPU (f32 and f64) and on GPUs in f32; GPU tensors of
/// other dtypes run the plain-tensor twin.
pub(crate) fn has_kernel(x: &candle_core::Tensor) -> bool {
    x.device().is_cpu() || x.dtype() == candle_core::DType::F32
}
