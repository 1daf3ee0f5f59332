//! Text sources, tokenizers and batches.
//!
//! - [`source`]: reads a training text from a local file or a Hugging Face dataset repo.
//! - [`tokenizer`]: the char-level and byte-level BPE tokenizers, saved as `tokenizer.json`.
//! - [`batches`]: the train/validation split and the deterministic batch sampler.
pub mod batches;
pub mod source;
pub mod tokenizer;

pub use batches::{split_text, Batcher};
pub use source::load_text;
pub use tokenizer::{Tokenizer, TokenizerKind};
