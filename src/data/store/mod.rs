//! The corpus store: token shards on disk, written once by `gumbel-moe prepare` and read by
//! training through memory maps, so memory and start-up do not grow with the corpus.
//!
//! - [`format`](mod@format): the 1,024-byte shard header (magic, version, token width,
//!   vocabulary, end-of-text id, token count, tokenizer hash).
//! - [`writer`]: a split's tokens streamed into numbered shards, each published whole.
//! - [`reader`]: a split's shards memory-mapped and read as one token sequence.
//! - [`manifest`]: `manifest.json`, written last; its hash names the dataset.
//! - [`atomic`]: write to a temporary name, sync, rename.
pub mod atomic;
pub mod format;
pub mod manifest;
pub mod reader;
pub mod writer;

pub use manifest::{is_prepared, Manifest, ShardInfo, SourceInfo, TokenizerInfo, MANIFEST_FILE, TOKENIZER_FILE};
pub use reader::ShardSet;
pub use writer::{shard_name, ShardSpec, ShardWriter};
