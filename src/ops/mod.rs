//! Candle custom ops with their own CPU, CUDA and Metal kernels.
//!
//! [`gumbel_router`]: the Gumbel-Softmax router's math (top-K pre-filter, Philox noise, relaxed
//! softmax, Gumbel-top-m selection) and its backward, fused per token row. Kernel sources live in
//! `kernels/` (one row body in `gumbel_router.cuh`, shared by the `.cu` and the `.metal` files).
//!
//! [`balance_stats`](mod@balance_stats): the two factors of the load-balance loss (tokens per expert f, mean softmax
//! probability P) in one op over (logits, indices), with a backward op for P; fixed-order sums.
//!
//! [`expert_sort`](mod@expert_sort), [`gather_rows`](mod@gather_rows), [`combine`](mod@combine): MoE dispatch / combine. Sort the token-slots by
//! expert (GShard slot-major order with capacity drops), gather the rows to that order, and the
//! weighted sum back to tokens, each with a backward op; deterministic (no float atomics). Their
//! shared order layout and kernel arguments are in `dispatch_common`, kernels in
//! `kernels/moe_dispatch.{cuh,cu,metal}`, the host plan they are checked against in
//! [`dispatch_plan`].
//!
//! [`straight_through`](mod@straight_through): the hard router's straight-through weights (exactly 1/m forward, the soft
//! gradient of the chosen experts backward) as one op.
//!
//! Layer ops, fused each way (CPU kernels; other devices run their plain-tensor twins):
//! [`linear`](mod@linear) (x W^T + b: dx, dW and db, a row sum, from one backward op), [`layer_norm`]
//! (LayerNorm/RMSNorm with dx, dgamma, dbeta in one backward pass), [`gelu`](mod@gelu) (exact GELU, one pass
//! each way), [`swiglu`](mod@swiglu) (silu(g) u, one pass each way, CPU only), [`causal_softmax`](mod@causal_softmax) (softmax of attention scores with the causal mask inside, where
//! the fully fused attention does not run), [`attention`] (the causal attention core from the (B, T, 3C) projection, rotary and
//! mask inside, flash-style backward), [`expert_mlp`](mod@expert_mlp) (every expert's GELU or SwiGLU MLP over its
//! block of sorted rows, one op each way).
//!
//! [`dropout`]: inverted dropout whose mask is drawn from Philox on the device (same elements
//! dropped on every backend; the backward is the same op on the gradient). [`adamw`]: the fused
//! in-place CPU optimizer step.
//!
//! Shared by all: `backend` (the CPU element type and row layouts, the one CUDA launch and the one
//! Metal dispatch, the dtype check), `float` (`exp_f32`, column sums), `gemm`.
pub mod adamw;
pub mod attention;
pub(crate) mod backend;
pub mod balance_stats;
pub mod causal_softmax;
pub mod combine;
pub(crate) mod dispatch_common;
pub mod dispatch_plan;
pub mod dropout;
pub mod expert_mlp;
pub mod expert_sort;
pub(crate) mod float;
pub mod gather_rows;
pub mod gelu;
pub(crate) mod gemm;
pub mod gumbel_router;
mod layer_kernels;
pub mod layer_norm;
pub mod linear;
pub mod straight_through;
pub mod swiglu;

pub use attention::{causal_attention, causal_attention_reference, AttentionBwd, CausalAttention, RopeTables};
pub use balance_stats::{balance_stats, balance_stats_reference, expert_fractions, BalanceStats, BalanceStatsBwd};
pub use causal_softmax::{causal_softmax, causal_softmax_reference, CausalSoftmax, CausalSoftmaxBwd};
pub use combine::{combine, combine_reference, Combine, CombineBwdOut, CombineBwdW};
pub use dispatch_common::OrderDims;
pub use dispatch_plan::{capacity, plan, Plan};
pub use dropout::{dropout_reference, philox_dropout, PhiloxDropout};
pub use expert_mlp::{
    expert_mlp, expert_mlp_reference, expert_mlp_train, ExpertGrads, ExpertMlp, ExpertMlpBwd, ExpertMlpInPlace,
    ExpertParams,
};
pub use expert_sort::{expert_sort, expert_sort_reference, ExpertOrder, ExpertSort};
pub use gather_rows::{gather_rows, gather_rows_reference, split_rows, GatherRows, GatherRowsBwd};
pub use gelu::{gelu, gelu_reference, Gelu, GeluBwd};
pub use gumbel_router::{
    gumbel_route, gumbel_select, gumbel_weights, FusedRouting, GumbelParams, GumbelSelect, GumbelWeights,
    GumbelWeightsBwd,
};
pub use layer_norm::{norm, norm_reference, Norm as NormOp, NormBwd};
pub use linear::{linear, linear_reference, Linear as LinearOp, LinearBwd};
pub use straight_through::{straight_through, StraightThrough};
pub use swiglu::{swiglu, swiglu_reference, Swiglu, SwigluBwd};
