//! The data a run trains on: a text file (split by characters, tokenized in memory at every start,
//! as nanoGPT) or a folder made by `gumbel-moe prepare` (memory-mapped shards, its own tokenizer).
//! Either way the windows come from the same [`Batcher`], keyed by (seed, step, micro-batch, row).

use super::checkpoint;
use crate::config::{Config, TokenizerType};
use crate::data::{load_text, split_text, Batcher, Prepared, Tokenizer, TokenizerKind};
use anyhow::{bail, Context, Result};

pub(super) enum RunData {
    /// The whole text and the byte where validation starts.
    Text {
        source: String,
        text: String,
        cut: usize,
    },
    Prepared(Box<Prepared>),
}

impl RunData {
    /// Opens `source`: a prepared folder (its manifest read, its tokenizer checked) or a text.
    pub fn open(source: &str, train_fraction: f64) -> Result<Self> {
        if let Some(p) = Prepared::open_if_prepared(source)? {
            return Ok(Self::Prepared(Box::new(p)));
        }
        let text = load_text(source)?;
        let cut = split_text(&text, train_fraction).0.len();
        Ok(Self::Text { source: source.to_string(), text, cut })
    }

    /// The run's tokenizer: `tok` (a checkpoint's) when given; else trained on the training text, or
    /// the prepared folder's, whose kind and size then go into `cfg.data`.
    pub fn tokenizer(&self, tok: Option<Tokenizer>, cfg: &mut Config) -> Result<Tokenizer> {
        match (self, tok) {
            (Self::Prepared(p), Some(t)) => {
                let n = p.manifest.tokenizer.vocab_size;
                if t.vocab_size() != n {
                    bail!(
                        "the checkpoint's tokenizer has {} tokens, but the prepared data {} was made with one of {n}",
                        t.vocab_size(),
                        p.dir.display()
                    );
                }
                Ok(t)
            }
            (_, Some(t)) => Ok(t),
            (Self::Text { source, text, cut }, None) => {
                Tokenizer::train(&checkpoint::tokenizer_kind(cfg), &text[..*cut])
                    .with_context(|| format!("training the tokenizer on {source}"))
            }
            (Self::Prepared(p), None) => {
                let t = p.tokenizer.clone();
                cfg.data.tokenizer = match t.kind() {
                    TokenizerKind::Char => TokenizerType::Char,
                    TokenizerKind::Bpe { vocab_size } => {
                        cfg.data.bpe_vocab_size = vocab_size;
                        TokenizerType::Bpe
                    }
                    TokenizerKind::Hf => TokenizerType::Hf,
                };
                Ok(t)
            }
        }
    }

    /// The training (`train`) or validation batcher.
    pub fn batcher(&self, train: bool, tok: &Tokenizer, block: usize, batch: usize, seed: u64) -> Result<Batcher> {
        match self {
            Self::Text { text, cut, .. } => {
                let (part, what) = if train { (&text[..*cut], "training") } else { (&text[*cut..], "validation") };
                Batcher::new(tok.encode(part)?, block, batch, seed).with_context(|| format!("{what} split too small"))
            }
            Self::Prepared(p) => p.batcher(if train { "train" } else { "val" }, block, batch, seed),
        }
    }

    /// What identifies the data across ranks: the prepared dataset's manifest hash, or the text's
    /// SHA-256 (16 hex digits).
    pub fn identity(&self) -> String {
        match self {
            Self::Text { text, .. } => format!("text sha256 {}", super::data_parallel::short_hash(text.as_bytes())),
            Self::Prepared(p) => format!("prepared dataset {}", p.hash),
        }
    }

    /// The prepared dataset's identity (its manifest's SHA-256); None for a text.
    pub fn dataset(&self) -> Option<String> {
        match self {
            Self::Text { .. } => None,
            Self::Prepared(p) => Some(p.hash.clone()),
        }
    }
}
