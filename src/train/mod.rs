//! Training: the optimizer with named state, LR and temperature schedules, checkpoints, metrics,
//! router telemetry and the loop that ties them together.
pub mod alloc;
pub mod checkpoint;
pub mod metrics;
pub mod optim;
pub mod parallel;
pub mod schedule;
pub mod telemetry;
pub mod trainer;

pub use optim::AdamW;
pub use trainer::{device_from_str, Trainer};
