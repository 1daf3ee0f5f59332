//! Token dispatch: group the (token, slot) pairs of a routing by expert, applying an optional expert
//! capacity, so each expert runs one dense matmul over its tokens and the results are summed back.
//!
//! Order is deterministic: slot-major (every token's first choice before any second choice, as in
//! GShard), tokens in order within a slot, so with a capacity the first choices are kept first.

pub use crate::ops::dispatch_plan::{capacity, plan, Plan};
