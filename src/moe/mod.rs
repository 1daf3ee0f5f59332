//! The sparse mixture-of-experts feed-forward: routers (swappable through the [`Router`] trait),
//! auxiliary losses, token dispatch and the MoE layer that ties them together; its experts split
//! over ranks in [`expert_parallel`].
pub mod dispatch;
pub mod expert_parallel;
pub mod finite;
pub mod layer;
pub mod losses;
pub mod router;
pub mod routers;

pub use crate::config::EXPERT_CHOICE_REFUSAL;
pub use expert_parallel::ExpertGroup;
pub use layer::{MoeLayer, MoeOutput};
pub use router::{build_router, RouteCtx, Router, RouterFactory, Routing};
