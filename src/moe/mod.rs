//! The sparse mixture-of-experts feed-forward: routers (swappable through the [`Router`] trait),
//! auxiliary losses, token dispatch and the MoE layer that ties them together.
pub mod dispatch;
pub mod layer;
pub mod losses;
pub mod router;
pub mod routers;

pub use crate::config::EXPERT_CHOICE_REFUSAL;
pub use layer::{MoeLayer, MoeOutput};
pub use router::{build_router, RouteCtx, Router, RouterFactory, Routing};
