//! Training: the optimizer with named state, LR and temperature schedules, checkpoints, metrics,
//! router telemetry and the loop that ties them together.
//!
//! - [`run_dir`]: a run's files, refusing to overwrite one, recovery after a cut-short save, pruning.
//! - [`fs_steps`]: every file-system step of a save, counted (and, for the crash tests, stoppable).
//! - [`finite`]: NaN / infinity checks before a save and after a load; [`file_mode`]: the weights'
//!   permissions, and "permission denied" said first.
//! - [`resume`]: continuing a run from a checkpoint, in place or as a branch.
//! - [`resume_check`]: which `--set` changes a resume refuses, and why.
//! - [`run_data`]: a run's data: a text tokenized in memory, or a prepared folder's shards.
//! - [`init_from`]: a new run from another checkpoint's weights (fresh optimizer and schedule).
//! - [`memory`]: the parameter count and estimated training memory, said first; too large is refused.
//! - [`data_parallel`]: a step shared by ranks (processes or threads), with the bits of one process;
//!   [`sharded`]: the optimizer step itself shared by the ranks (ZeRO stage 1).
//! - [`parallel`]: a step's micro-batches side by side on worker threads; [`alloc`]: allocator
//!   thresholds for the loop.
pub mod alloc;
pub mod checkpoint;
pub mod data_parallel;
pub mod file_mode;
pub mod finite;
pub mod fs_steps;
pub mod grad_sum;
pub mod in_place;
pub mod init_from;
pub mod memory;
pub mod metrics;
pub mod optim;
pub mod parallel;
pub mod resume;
pub mod resume_check;
pub mod run_data;
pub mod run_dir;
pub mod schedule;
pub mod sharded;
pub mod step;
pub mod telemetry;
pub mod trainer;

pub use fs_steps::FsSteps;
pub use optim::AdamW;
pub use run_dir::IfRunExists;
pub use trainer::{device_from_str, Trainer};
