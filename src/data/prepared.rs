//! A folder made by `gumbel-moe prepare`, opened for training: the manifest, the tokenizer beside
//! it (checked against the manifest's hash) and each split's memory-mapped shards.

use super::batches::Batcher;
use super::source::resolve_local;
use super::store::format::{hex, sha256};
use super::store::{is_prepared, Manifest, ShardSet};
use super::tokenizer::{Tokenizer, TokenizerKind};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// An opened prepared folder.
pub struct Prepared {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// Hex SHA-256 of `manifest.json`: the dataset's identity.
    pub hash: String,
    pub tokenizer: Tokenizer,
}

/// The tokenizer kind a manifest names ("char", "bpe" with its vocabulary, or "hf").
pub fn kind_of(manifest: &Manifest) -> Result<TokenizerKind> {
    Ok(match manifest.tokenizer.kind.as_str() {
        "char" => TokenizerKind::Char,
        "bpe" => TokenizerKind::Bpe { vocab_size: manifest.tokenizer.vocab_size },
        "hf" => TokenizerKind::Hf,
        other => bail!("manifest names tokenizer kind {other:?}; expected \"char\", \"bpe\" or \"hf\""),
    })
}

/// The name a tokenizer kind has in a manifest.
pub fn kind_name(kind: &TokenizerKind) -> &'static str {
    match kind {
        TokenizerKind::Char => "char",
        TokenizerKind::Bpe { .. } => "bpe",
        TokenizerKind::Hf => "hf",
    }
}

/// Hex SHA-256 of a file's bytes.
pub fn file_sha256(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(hex(&sha256(&bytes)))
}

impl Prepared {
    /// The prepared folder `source` names (a path, resolved as text sources are), or None when it
    /// is not one (a text file or a hub spec).
    pub fn open_if_prepared(source: &str) -> Result<Option<Self>> {
        if source.starts_with("hf:") {
            return Ok(None);
        }
        let dir = resolve_local(source);
        if !dir.is_dir() {
            return Ok(None);
        }
        if !is_prepared(&dir) {
            bail!(
                "data.source {source} is a folder without a manifest.json: give a text file, or a folder made by \
                 `gumbel-moe prepare` (an interrupted prepare has no manifest yet: run it again to finish)"
            );
        }
        Self::open(&dir).map(Some)
    }

    /// Opens a prepared folder: reads the manifest and loads the tokenizer after checking its hash.
    pub fn open(dir: &Path) -> Result<Self> {
        let (manifest, hash) = Manifest::read(dir)?;
        let tok_path = dir.join(&manifest.tokenizer.file);
        let found = file_sha256(&tok_path)?;
        if found != manifest.tokenizer.sha256 {
            bail!(
                "tokenizer {} has sha256 {found}, but the manifest (and the shards) were made with sha256 {}: the \
                 tokens would be decoded with another vocabulary; put back the tokenizer.json prepare wrote",
                tok_path.display(),
                manifest.tokenizer.sha256
            );
        }
        let tokenizer = Tokenizer::load(&tok_path, &kind_of(&manifest)?)?;
        if tokenizer.vocab_size() != manifest.tokenizer.vocab_size {
            bail!(
                "tokenizer {} holds {} tokens, the manifest says {}",
                tok_path.display(),
                tokenizer.vocab_size(),
                manifest.tokenizer.vocab_size
            );
        }
        Ok(Self { dir: dir.to_path_buf(), manifest, hash, tokenizer })
    }

    /// A batcher over split `split` ("train" or "val"): its shards memory-mapped and checked.
    pub fn batcher(&self, split: &str, block_size: usize, batch_size: usize, seed: u64) -> Result<Batcher> {
        let set = ShardSet::open(&self.dir, &self.manifest, split)?;
        let (n, shards) = (set.len(), self.manifest.shards(split).len());
        let what = if split == "val" { "validation" } else { "training" };
        Batcher::from_shards(set, block_size, batch_size, seed).with_context(|| {
            format!(
                "the {what} split of {} ({n} tokens in {shards} shards, {split}-*.bin) is shorter than one window \
                 of block_size {block_size} + 2 tokens",
                self.dir.display()
            )
        })
    }
}
