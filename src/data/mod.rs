//! Text sources, tokenizers and batches.
//!
//! - [`source`]: reads a training text from a local file or a Hugging Face dataset repo.
//! - [`hub`]: `hf://OWNER/NAME/FILE` specs and the hub cache.
//! - [`tokenizer`]: the char-level and byte-level BPE tokenizers, saved as `tokenizer.json`.
//! - [`batches`]: the train/validation split and the deterministic batch sampler.
//! - [`store`]: token shards on disk (format, writer, memory-mapped reader, manifest).
//! - [`prepared`]: a folder made by `gumbel-moe prepare`, opened for training.
pub mod batches;
pub mod hub;
pub mod prepare;
pub mod prepared;
pub mod source;
pub mod store;
pub mod tokenizer;

pub use batches::{split_text, Batcher};
pub use hub::HubOptions;
pub use prepared::Prepared;
pub use source::{load_text, load_text_with};
pub use tokenizer::{Tokenizer, TokenizerKind};
