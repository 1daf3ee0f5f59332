//! Counter-based random numbers shared by every backend (see `philox`).
pub mod philox;
pub use philox::*;
