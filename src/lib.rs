//! gumbel-moe: train sparse mixture-of-experts language models with a Gumbel-Softmax router,
//! on Candle, from Rust.
//!
//! Layout: [`config`] (the run configuration), [`nn`] (differentiable layers), [`moe`] (routers,
//! dispatch, the MoE layer), [`model`] (the decoder), [`data`] (text sources, tokenizers, batches),
//! [`train`] (optimizer, schedules, checkpoints, the training loop), [`generate`] (sampling),
//! [`rng`] (the Philox generator every backend shares), [`ops`] (the custom ops and their kernels),
//! [`report`] (`compare` and `plot`: router comparisons, report tables, PNG charts), [`hf`]
//! (Mixtral / Qwen2-MoE checkpoints to and from transformers), [`dist`] (the communicator of
//! multi-process training).
pub mod config;
pub mod data;
pub mod dist;
pub mod generate;
pub mod hf;
pub mod model;
pub mod moe;
pub mod nn;
pub mod ops;
pub mod report;
pub mod rng;
pub mod train;

pub use config::Config;
pub use model::Gpt;
