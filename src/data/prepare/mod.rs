//! `gumbel-moe prepare`: a corpus of any size tokenized once into the shards of [`super::store`].
//!
//! - [`inputs`]: source specs (files, folders, globs, `hf://`) expanded into input files.
//! - [`docs`]: documents read from them in bounded pieces (`parquet_docs`: parquet files, feature
//!   `parquet`).
//! - [`tokenizer_setup`]: the tokenizer saved beside the shards (trained on a sample, or a file).
//! - [`progress`]: the record that lets a killed run continue.
//! - [`run`]: the pipeline; [`cli`]: its command line.
pub mod cli;
pub mod docs;
pub mod inputs;
#[cfg(feature = "parquet")]
mod parquet_docs;
pub mod progress;
pub mod run;
pub mod tokenizer_setup;

pub use cli::PrepareArgs;
pub use run::{prepare, PrepareOptions, Summary};
pub use tokenizer_setup::TokenizerChoice;
