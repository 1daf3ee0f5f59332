//! Candle custom ops with their own CPU, CUDA and Metal kernels.
//!
//! [`gumbel_router`]: the Gumbel-Softmax router's math (top-K pre-filter, Philox noise, relaxed
//! softmax, Gumbel-top-m selection) and its backward, fused per token row. Kernel sources live in
//! `kernels/` (one row body in `gumbel_router.cuh`, shared by the `.cu` and the `.metal` files).
//!
//! [`dropout`]: inverted dropout whose mask is drawn from Philox on the device (same elements
//! dropped on every backend; the backward is the same op on the gradient).
pub mod dropout;
pub mod gumbel_router;
#[cfg(feature = "metal")]
pub mod metal_glue;

pub use gumbel_router::{
    gumbel_route, gumbel_select, gumbel_weights, FusedRouting, GumbelParams, GumbelSelect, GumbelWeights,
    GumbelWeightsBwd,
};
pub use dropout::{dropout_reference, philox_dropout, PhiloxDropout};
