//! `manifest.json`: what a prepared folder holds. Written last, so a folder with a manifest is
//! complete; its SHA-256 is the dataset's identity (a checkpoint records it).

use super::atomic::write_atomic;
use super::format::{hex, sha256};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The manifest's file name inside a prepared folder.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The tokenizer's file name inside a prepared folder.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The `format` field of every manifest.
pub const FORMAT: &str = "gumbel-moe-token-shards";

/// One finished shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    pub file: String,
    pub tokens: u64,
}

/// The tokenizer the shards were made with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenizerInfo {
    pub file: String,
    pub sha256: String,
    /// "char", "bpe" or "hf": how `data::Tokenizer::load` reads it.
    pub kind: String,
    pub vocab_size: usize,
    pub eot_id: u32,
    pub eot_token: String,
}

/// One input file, as read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceInfo {
    pub name: String,
    pub bytes: u64,
    pub split: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub tokenizer: TokenizerInfo,
    pub token_width: u32,
    pub train: Vec<ShardInfo>,
    pub val: Vec<ShardInfo>,
    pub train_documents: u64,
    pub val_documents: u64,
    pub sources: Vec<SourceInfo>,
    /// How the corpus was split and tokenized, in words (for people, not checked).
    pub notes: Vec<String>,
}

impl Manifest {
    /// Writes `DIR/manifest.json` atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)? + "\n";
        write_atomic(&dir.join(MANIFEST_FILE), text.as_bytes())
    }

    /// Reads `DIR/manifest.json`; returns it with the hex SHA-256 of its bytes.
    pub fn read(dir: &Path) -> Result<(Self, String)> {
        let path = dir.join(MANIFEST_FILE);
        let bytes = std::fs::read(&path).with_context(|| {
            format!("cannot read {} (a folder made by `gumbel-moe prepare` has one)", path.display())
        })?;
        let m: Manifest =
            serde_json::from_slice(&bytes).with_context(|| format!("{} is not a valid manifest", path.display()))?;
        if m.format != FORMAT || m.version != super::format::VERSION {
            bail!(
                "{}: format {:?} version {}; this build reads {FORMAT:?} version {}",
                path.display(),
                m.format,
                m.version,
                super::format::VERSION
            );
        }
        Ok((m, hex(&sha256(&bytes))))
    }

    /// Tokens in a split ("train" or "val").
    pub fn tokens(&self, split: &str) -> u64 {
        self.shards(split).iter().map(|s| s.tokens).sum()
    }

    /// The shards of a split ("train" or "val").
    pub fn shards(&self, split: &str) -> &[ShardInfo] {
        if split == "val" {
            &self.val
        } else {
            &self.train
        }
    }
}

/// Whether `dir` is a prepared folder (holds a manifest).
pub fn is_prepared(dir: &Path) -> bool {
    dir.is_dir() && dir.join(MANIFEST_FILE).is_file()
}
