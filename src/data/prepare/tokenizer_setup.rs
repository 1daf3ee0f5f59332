//! The tokenizer `prepare` writes beside the shards, with an end-of-text token to separate
//! documents: trained on a sample (char, or byte-level BPE of N tokens) or taken from a file.
//!
//! - char: the sorted set of the sample's characters plus the end-of-text token, saved as a
//!   WordLevel `tokenizer.json` and read back as kind "hf" (any tokenizer.json).
//! - bpe: the byte-level BPE of `data::Tokenizer`, with the end-of-text token as a special token
//!   (id 0), trained on the sample.
//! - a file (a `tokenizer.json`, or a checkpoint folder holding one): copied; if it lacks the
//!   end-of-text token, the token is added at the end of its vocabulary. A byte-level BPE is read as
//!   kind "bpe", anything else as "hf".

use crate::data::tokenizer::{Tokenizer, TokenizerKind};
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

/// Which tokenizer to write.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum TokenizerChoice {
    Char,
    Bpe { vocab_size: usize },
    File(PathBuf),
}

impl std::str::FromStr for TokenizerChoice {
    type Err = anyhow::Error;
    /// `char`, `bpe:N`, or a path (a tokenizer.json or a checkpoint folder).
    fn from_str(s: &str) -> Result<Self> {
        if s == "char" {
            return Ok(Self::Char);
        }
        if let Some(n) = s.strip_prefix("bpe:") {
            let vocab_size = n.parse().map_err(|_| anyhow!("--tokenizer bpe:N needs a number, got {s:?}"))?;
            return Ok(Self::Bpe { vocab_size });
        }
        let path = PathBuf::from(s);
        let file = if path.is_dir() { path.join("tokenizer.json") } else { path };
        if !file.is_file() {
            bail!("--tokenizer {s}: expected `char`, `bpe:N`, a tokenizer.json or a checkpoint folder holding one");
        }
        Ok(Self::File(file))
    }
}

impl TokenizerChoice {
    /// Whether the tokenizer is trained on a sample of the corpus.
    pub fn needs_sample(&self) -> bool {
        !matches!(self, Self::File(_))
    }
}

/// Writes the tokenizer to `path` (not atomically: the caller renames it) and returns its
/// end-of-text id. `sample` holds the training documents (ignored for a file).
pub fn build(choice: &TokenizerChoice, sample: &[String], eot: &str, path: &Path) -> Result<u32> {
    let eot_token = || AddedToken::from(eot.to_string(), true);
    let mut hf = match choice {
        TokenizerChoice::Char => {
            let chars: std::collections::BTreeSet<char> = sample.iter().flat_map(|d| d.chars()).collect();
            let end = std::iter::once((eot.to_string(), chars.len() as u32));
            let vocab = chars.iter().enumerate().map(|(i, c)| (c.to_string(), i as u32)).chain(end).collect();
            let model = WordLevel::builder()
                .vocab(vocab)
                .unk_token("<unk>".into())
                .build()
                .map_err(|e| anyhow!("cannot build the char vocabulary: {e}"))?;
            let split = tokenizers::pre_tokenizers::split::Split::new(
                tokenizers::pre_tokenizers::split::SplitPattern::Regex(r"[\s\S]".into()),
                tokenizers::SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| anyhow!("cannot build the char-splitting pre-tokenizer: {e}"))?;
            let mut hf = tokenizers::Tokenizer::new(model);
            hf.with_pre_tokenizer(Some(split));
            hf.with_decoder(Some(tokenizers::decoders::fuse::Fuse::new()));
            hf
        }
        TokenizerChoice::Bpe { vocab_size } => {
            if *vocab_size < 257 {
                bail!("--tokenizer bpe:{vocab_size}: a byte-level BPE needs at least 257 tokens (256 bytes + end-of-text)");
            }
            let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
                .show_progress(false)
                .vocab_size(*vocab_size)
                .min_frequency(0)
                .special_tokens(vec![eot_token()])
                .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
                .build()
                .into();
            let mut hf = tokenizers::Tokenizer::new(BPE::default());
            let byte_level = ByteLevel::new(false, false, true);
            hf.with_pre_tokenizer(Some(byte_level));
            hf.with_decoder(Some(byte_level));
            hf.train(&mut trainer, sample.iter().map(String::as_str))
                .map_err(|e| anyhow!("BPE training (vocab_size {vocab_size}) failed: {e}"))?;
            hf
        }
        TokenizerChoice::File(file) => tokenizers::Tokenizer::from_file(file)
            .map_err(|e| anyhow!("cannot load tokenizer file {}: {e}", file.display()))?,
    };
    hf.add_special_tokens([eot_token()]).map_err(|e| anyhow!("cannot add the end-of-text token {eot:?}: {e}"))?;
    let id = hf.token_to_id(eot).context("the end-of-text token has no id after it was added")?;
    hf.save(path, true).map_err(|e| anyhow!("cannot write tokenizer file {}: {e}", path.display()))?;
    Ok(id)
}

/// Loads the tokenizer `build` wrote, as kind "bpe" when it is a byte-level BPE, else "hf".
pub fn load(path: &Path) -> Result<Tokenizer> {
    let hf = tokenizers::Tokenizer::from_file(path)
        .map_err(|e| anyhow!("cannot load tokenizer file {}: {e}", path.display()))?;
    let n = hf.get_vocab_size(true);
    Tokenizer::load(path, &TokenizerKind::Bpe { vocab_size: n }).or_else(|_| Tokenizer::load(path, &TokenizerKind::Hf))
}
