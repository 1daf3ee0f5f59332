//! Comparing runs: plan the runs of `gumbel-moe compare` and decide which can be reused
//! ([`plan`]), run each with several seeds ([`seeds`]), keep every earlier generation of a changed
//! run ([`prev`]), boil each run's metrics.jsonl down to curves and a table row ([`summary`]), say
//! how far the seeds spread ([`stats`]), write report.md / report.json ([`table`], [`table_seeds`]),
//! draw the PNG plots ([`plot`], [`bands`], coloured by [`colours`]), and drive it all from the
//! command line ([`compare`](mod@compare)).
pub mod bands;
pub mod colours;
pub mod compare;
pub mod plan;
pub mod plot;
pub mod prev;
pub mod seeds;
pub mod stats;
pub mod summary;
pub mod table;
pub mod table_seeds;

pub use compare::{compare, plot_run, CompareArgs};
pub use plan::{plan_runs, run_state, RunPlan, RunState};
pub use summary::{RunMetrics, RunSummary};
pub use table::Report;
