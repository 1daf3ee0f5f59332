//! Candle custom ops with their own CPU, CUDA and Metal kernels.
//!
//! [`gumbel_router`]: the Gumbel-Softmax router's math (top-K pre-filter, Philox noise, relaxed
//! softmax, Gumbel-top-m selection) and its backward, fused per token row. Kernel sources live in
//! `kernels/` (one row body in `gumbel_router.cuh`, shared by the `.cu` and the `.metal` files).
//!
//! [`balance_stats`]: the two factors of the load-balance loss (tokens per expert f, mean softmax
//! probability P) in one op over (logits, indices), with a backward op for P; fixed-order sums.
//!
//! [`expert_sort`], [`gather_rows`], [`combine`]: MoE dispatch / combine. Sort the token-slots by
//! expert (GShard slot-major order with capacity drops), gather the rows to that order, and the
//! weighted sum back to tokens, each with a backward op; deterministic (no float atomics). Shared
//! layout and launch glue in [`dispatch_common`], kernels in `kernels/moe_dispatch.{cuh,cu,metal}`.
//!
//! [`straight_through`]: the hard router's straight-through weights (exactly 1/m forward, the soft
//! gradient of the chosen experts backward) as one op.
//!
//! [`dropout`]: inverted dropout whose mask is drawn from Philox on the device (same elements
//! dropped on every backend; the backward is the same op on the gradient).
pub mod adamw;
pub mod balance_stats;
pub mod combine;
pub mod cpu_layout;
pub mod dispatch_common;
pub mod dropout;
pub mod expert_sort;
pub mod gather_rows;
pub mod gumbel_router;
#[cfg(feature = "metal")]
pub mod metal_glue;
pub mod straight_through;

pub use balance_stats::{balance_stats, balance_stats_reference, BalanceStats, BalanceStatsBwd};
pub use combine::{combine, combine_reference, Combine, CombineBwdOut, CombineBwdW};
pub use dropout::{dropout_reference, philox_dropout, PhiloxDropout};
pub use expert_sort::{expert_sort, expert_sort_reference, ExpertOrder, ExpertSort};
pub use gather_rows::{gather_rows, gather_rows_reference, split_rows, GatherRows, GatherRowsBwd};
pub use gumbel_router::{
    gumbel_route, gumbel_select, gumbel_weights, FusedRouting, GumbelParams, GumbelSelect, GumbelWeights,
    GumbelWeightsBwd,
};
pub use straight_through::{straight_through, StraightThrough};
