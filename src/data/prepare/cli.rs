//! The `gumbel-moe prepare` command line: options into [`PrepareOptions`], a summary out.

use super::run::{prepare, PrepareOptions};
use super::tokenizer_setup::TokenizerChoice;
use anyhow::Result;
use std::path::PathBuf;

/// Tokenize a corpus once into memory-mapped token shards (train with data.source = OUT).
#[derive(clap::Args, Debug)]
pub struct PrepareArgs {
    /// A text, JSON-lines or parquet file, a folder, a glob (quoted) or hf://OWNER/NAME/FILE
    /// (repeatable).
    #[arg(long = "source", required = true, value_name = "SPEC")]
    pub sources: Vec<String>,
    /// Validation documents from these sources instead of --val-fraction (repeatable).
    #[arg(long = "val-source", value_name = "SPEC")]
    pub val_sources: Vec<String>,
    /// The output folder (shards, tokenizer.json, manifest.json).
    #[arg(long)]
    pub out: PathBuf,
    /// `bpe:N` (byte-level BPE of N tokens), `char`, or a tokenizer.json / checkpoint folder to reuse.
    #[arg(long, default_value = "bpe:8192")]
    pub tokenizer: TokenizerChoice,
    /// MiB of training documents (the first ones, in reading order) the tokenizer is trained on.
    #[arg(long, default_value_t = 64)]
    pub tokenizer_sample_mib: u64,
    /// Share of the documents drawn for validation (by a fixed hash of each document's index).
    #[arg(long, default_value_t = 0.005)]
    pub val_fraction: f64,
    /// Document separator in text sources; "" makes each file one document.
    #[arg(long, default_value = "<|endoftext|>")]
    pub separator: String,
    /// The field of each JSON line (or the parquet column) that holds the text.
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// Tokens per shard (a shard closes at the first document end past it).
    #[arg(long, default_value_t = 100_000_000)]
    pub shard_tokens: u64,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl PrepareArgs {
    pub fn run(self) -> Result<()> {
        let mut o = PrepareOptions::new(self.sources, &self.out);
        o.val_sources = self.val_sources;
        o.tokenizer = self.tokenizer;
        o.sample_bytes = self.tokenizer_sample_mib << 20;
        o.val_fraction = self.val_fraction;
        o.separator = self.separator;
        o.text_field = self.text_field;
        o.shard_tokens = self.shard_tokens;
        o.progress = !self.quiet;
        let s = prepare(&o)?;
        let m = &s.manifest;
        if s.resumed {
            eprintln!("note: continued an interrupted prepare of {}", self.out.display());
        }
        eprintln!(
            "prepared {} -> {}: train {} tokens in {} shards ({} documents), val {} tokens in {} shards ({} \
             documents), vocabulary {} ({}), {:.1} s, {:.1} MB/s",
            m.sources.len(),
            self.out.display(),
            m.tokens("train"),
            m.train.len(),
            m.train_documents,
            m.tokens("val"),
            m.val.len(),
            m.val_documents,
            m.tokenizer.vocab_size,
            m.tokenizer.kind,
            s.wall_s,
            s.bytes as f64 / 1e6 / s.wall_s.max(1e-9)
        );
        println!(
            "{}",
            serde_json::json!({"event": "prepared", "out": self.out, "manifest_sha256": s.manifest_sha256,
                "train_tokens": m.tokens("train"), "val_tokens": m.tokens("val"), "wall_s": s.wall_s})
        );
        Ok(())
    }
}
