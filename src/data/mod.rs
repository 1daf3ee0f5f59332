//! Text sources, tokenizers and batches.
//!
//! - [`source`]: reads a training text from a local file or a Hugging Face dataset repo.
//! - [`hub`]: `hf://OWNER/NAME/FILE` specs and the hub cache.
//! - [`tokenizer`]: the char-level and byte-level BPE tokenizers, saved as `tokenizer.json`.
//! - [`batches`]: the train/validation split and the deterministic batch sampler.
pub mod batches;
pub mod hub;
pub mod source;
pub mod tokenizer;

pub use batches::{split_text, Batcher};
pub use hub::HubOptions;
pub use source::{load_text, load_text_with};
pub use tokenizer::{Tokenizer, TokenizerKind};
