//! The tokenizers: nanoGPT's character-level vocabulary and a byte-level BPE.
//!
//! Both are saved as a Hugging Face `tokenizer.json`, so any `tokenizers` user can load them:
//! - Char: a `WordLevel` model whose vocabulary is the character set (ids in sorted char order, as
//!   nanoGPT), a `Split` pre-tokenizer that isolates every character and a `Fuse` decoder. Our own
//!   encode uses a lookup table instead of that pipeline (it is much faster).
//! - Bpe: a `BPE` model trained by the `tokenizers` crate's `BpeTrainer` over the 256 byte-level
//!   symbols, with a `ByteLevel` pre-tokenizer (GPT-2 regex, no prefix space) and decoder.
//! - Hf: any `tokenizer.json` (that of an imported Hugging Face model), used as it is; never trained.
//!
//! BPE text is encoded in chunks, in parallel. Chunks end only after a `'\n'` that has a
//! non-whitespace character on both sides: the GPT-2 regex always makes such a newline a
//! pre-token of its own, and BPE never merges across pre-tokens, so the ids are exactly those of
//! encoding the whole text at once (a test checks this).

use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashMap;
use std::path::Path;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::models::{ModelWrapper, TrainerWrapper};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::split::Split;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::SplitDelimiterBehavior;

/// Bytes of text per BPE chunk (chunks are cut at the next safe newline after this).
const BPE_CHUNK_BYTES: usize = 16 * 1024;

/// The number of byte-level symbols, the smallest BPE vocabulary.
const BYTE_SYMBOLS: usize = 256;

/// Which tokenizer to build.
#[derive(Clone, Debug, PartialEq)]
pub enum TokenizerKind {
    /// One token per distinct character of the training text (nanoGPT's shakespeare_char).
    Char,
    /// Byte-level BPE with at most `vocab_size` tokens (at least 256, the byte symbols).
    Bpe { vocab_size: usize },
    /// A `tokenizer.json` of any kind, loaded (`data.tokenizer = "hf"`).
    Hf,
}

/// A trained tokenizer: text to token ids and back.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    Char(Box<CharVocab>),
    Bpe { hf: Box<tokenizers::Tokenizer>, requested: usize },
    Hf(Box<tokenizers::Tokenizer>),
}

/// A character vocabulary: id to char, and char to id through a table for ASCII and a map above.
#[derive(Clone)]
struct CharVocab {
    chars: Vec<char>,
    ascii: [u32; 128],
    other: HashMap<char, u32>,
}

/// Marks an ASCII char that is not in the vocabulary.
const NONE: u32 = u32::MAX;

impl CharVocab {
    /// Builds the lookup tables for `chars` (id = index); the chars must be distinct.
    fn new(chars: Vec<char>) -> Self {
        let mut ascii = [NONE; 128];
        let mut other = HashMap::new();
        for (id, &c) in chars.iter().enumerate() {
            match ascii.get_mut(c as usize) {
                Some(slot) => *slot = id as u32,
                None => {
                    other.insert(c, id as u32);
                }
            }
        }
        Self { chars, ascii, other }
    }

    fn id(&self, c: char) -> Option<u32> {
        match self.ascii.get(c as usize) {
            Some(&id) => (id != NONE).then_some(id),
            None => self.other.get(&c).copied(),
        }
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(text.len());
        for (pos, (byte, c)) in text.char_indices().enumerate() {
            match self.id(c) {
                Some(id) => ids.push(id),
                None => bail!(
                    "character {c:?} (U+{:04X}) at char position {pos} (byte offset {byte}) is not in the \
                     char vocabulary of {} characters",
                    c as u32,
                    self.chars.len()
                ),
            }
        }
        Ok(ids)
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut text = String::with_capacity(ids.len());
        for (pos, &id) in ids.iter().enumerate() {
            match self.chars.get(id as usize) {
                Some(&c) => text.push(c),
                None => bail!(
                    "token id {id} at position {pos} is out of range for a char vocabulary of {}",
                    self.chars.len()
                ),
            }
        }
        Ok(text)
    }

    /// The Hugging Face form: WordLevel over the chars, every char its own pre-token, Fuse decoder.
    fn to_hf(&self) -> Result<tokenizers::Tokenizer> {
        let vocab = self.chars.iter().enumerate().map(|(id, c)| (c.to_string(), id as u32)).collect();
        // No unknown token: the HF pipeline errors on an unknown char, as `encode` does.
        let model = WordLevel::builder()
            .vocab(vocab)
            .unk_token("<unk>".to_string())
            .build()
            .map_err(|e| anyhow!("cannot build the WordLevel model of the char vocabulary: {e}"))?;
        // `[\s\S]` (not `.`) so newlines are matched in every regex dialect.
        let split = Split::new(
            tokenizers::pre_tokenizers::split::SplitPattern::Regex(r"[\s\S]".into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| anyhow!("cannot build the char-splitting pre-tokenizer: {e}"))?;
        let mut hf = tokenizers::Tokenizer::new(model);
        hf.with_pre_tokenizer(Some(split));
        hf.with_decoder(Some(Fuse::new()));
        Ok(hf)
    }
}

/// The byte-level pre-tokenizer and decoder: GPT-2 regex, no prefix space, offsets untrimmed.
fn byte_level() -> ByteLevel {
    ByteLevel::new(false, false, true)
}

/// Cuts `text` into chunks of about `BPE_CHUNK_BYTES` that the byte-level pre-tokenizer splits at
/// anyway: each chunk but the last ends with a `'\n'` that has non-whitespace on both sides.
fn bpe_chunks(text: &str) -> Vec<&str> {
    let bytes = text.as_bytes();
    let mut chunks = Vec::with_capacity(text.len() / BPE_CHUNK_BYTES + 1);
    let mut start = 0;
    let mut i = BPE_CHUNK_BYTES;
    while i < bytes.len() {
        // A cut after the newline at i: char before it and char after it are not whitespace.
        // Both neighbours of '\n' are char boundaries; only ASCII whitespace needs a byte check,
        // other whitespace is found by decoding the neighbouring chars.
        if bytes[i] == b'\n' && i > 0 && i + 1 < bytes.len() {
            let before = text[..i].chars().next_back();
            let after = text[i + 1..].chars().next();
            if before.is_some_and(|c| !c.is_whitespace()) && after.is_some_and(|c| !c.is_whitespace()) {
                chunks.push(&text[start..=i]);
                start = i + 1;
                i = start + BPE_CHUNK_BYTES;
                continue;
            }
        }
        i += 1;
    }
    if start < text.len() {
        chunks.push(&text[start..]);
    }
    chunks
}

impl Tokenizer {
    /// Builds the vocabulary from `text` (the training split). Char: the sorted set of distinct
    /// chars (as nanoGPT). Bpe: byte-level BPE trained with the `tokenizers` crate (ByteLevel
    /// pre-tokenizer and decoder, `BpeTrainer` with the given vocab_size and all 256 byte symbols
    /// in the alphabet so any text can be encoded); the trainer is deterministic (ties between
    /// equally frequent pairs go to the lower pair of ids).
    pub fn train(kind: &TokenizerKind, text: &str) -> Result<Self> {
        if text.is_empty() {
            bail!("cannot train a {kind:?} tokenizer on empty text");
        }
        let inner = match *kind {
            TokenizerKind::Char => {
                let mut chars: Vec<char> =
                    text.chars().collect::<std::collections::BTreeSet<_>>().into_iter().collect();
                chars.shrink_to_fit();
                Inner::Char(Box::new(CharVocab::new(chars)))
            }
            TokenizerKind::Bpe { vocab_size } => {
                if vocab_size < BYTE_SYMBOLS {
                    bail!("BPE vocab_size {vocab_size} is below the {BYTE_SYMBOLS} byte-level symbols it must hold");
                }
                let alphabet = ByteLevel::alphabet().into_iter().collect();
                let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
                    .show_progress(false)
                    .vocab_size(vocab_size)
                    .min_frequency(0)
                    .initial_alphabet(alphabet)
                    .build()
                    .into();
                let mut hf = tokenizers::Tokenizer::new(BPE::default());
                hf.with_pre_tokenizer(Some(byte_level()));
                hf.with_decoder(Some(byte_level()));
                hf.train(&mut trainer, bpe_chunks(text).into_iter())
                    .map_err(|e| anyhow!("BPE training (vocab_size {vocab_size}) failed: {e}"))?;
                Inner::Bpe { hf: Box::new(hf), requested: vocab_size }
            }
            TokenizerKind::Hf => bail!(
                "data.tokenizer = \"hf\" is a tokenizer.json loaded with its model (gumbel-moe import-hf), not \
                 one trained on the text: start from such a checkpoint (--init-from or --resume)"
            ),
        };
        Ok(Self { inner })
    }

    /// Token ids of `text`. Char: errors naming the first unknown char and its position.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.inner {
            Inner::Char(v) => v.encode(text),
            Inner::Hf(hf) => {
                let e =
                    hf.encode_fast(text, false).map_err(|e| anyhow!("encoding {} bytes failed: {e}", text.len()))?;
                Ok(e.get_ids().to_vec())
            }
            Inner::Bpe { hf, .. } => {
                let encodings = hf
                    .encode_batch_fast(bpe_chunks(text), false)
                    .map_err(|e| anyhow!("BPE encoding of {} bytes failed: {e}", text.len()))?;
                let mut ids = Vec::with_capacity(text.len() / 2);
                for e in &encodings {
                    ids.extend_from_slice(e.get_ids());
                }
                Ok(ids)
            }
        }
    }

    /// The text of `ids`; errors naming an out-of-range id. BPE ids that split a multi-byte char
    /// decode to U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match &self.inner {
            Inner::Char(v) => v.decode(ids),
            Inner::Bpe { hf, .. } | Inner::Hf(hf) => {
                let n = hf.get_vocab_size(true);
                if let Some((pos, id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= n) {
                    bail!("token id {id} at position {pos} is out of range for a BPE vocabulary of {n}");
                }
                hf.decode(ids, false).map_err(|e| anyhow!("BPE decoding of {} ids failed: {e}", ids.len()))
            }
        }
    }

    /// The number of token ids (ids are `0..vocab_size()`).
    pub fn vocab_size(&self) -> usize {
        match &self.inner {
            Inner::Char(v) => v.chars.len(),
            Inner::Bpe { hf, .. } | Inner::Hf(hf) => hf.get_vocab_size(true),
        }
    }

    /// The kind this tokenizer was trained or loaded as (Bpe keeps the requested vocab_size).
    pub fn kind(&self) -> TokenizerKind {
        match &self.inner {
            Inner::Char(_) => TokenizerKind::Char,
            Inner::Bpe { requested, .. } => TokenizerKind::Bpe { vocab_size: *requested },
            Inner::Hf(_) => TokenizerKind::Hf,
        }
    }

    /// Writes `tokenizer.json` in the Hugging Face tokenizers format, so
    /// `tokenizers::Tokenizer::from_file` loads it and gives the same ids (see the module docs).
    pub fn save(&self, path: &Path) -> Result<()> {
        let hf = match &self.inner {
            Inner::Char(v) => v.to_hf()?,
            Inner::Bpe { hf, .. } | Inner::Hf(hf) => (**hf).clone(),
        };
        hf.save(path, true).map_err(|e| anyhow!("cannot write tokenizer file {}: {e}", path.display()))
    }

    /// Loads a file written by `save`; `kind` (stored in our config too) says whether it is Char
    /// or Bpe, and must agree with the model in the file. Errors name the file.
    pub fn load(path: &Path, kind: &TokenizerKind) -> Result<Self> {
        let name = path.display();
        let hf = tokenizers::Tokenizer::from_file(path).map_err(|e| not_a_tokenizer(path, e))?;
        let inner = match (kind, hf.get_model()) {
            (TokenizerKind::Hf, _) => Inner::Hf(Box::new(hf)),
            (TokenizerKind::Char, ModelWrapper::WordLevel(_)) => {
                Inner::Char(Box::new(char_vocab_of(&hf).with_context(|| format!("tokenizer file {name}"))?))
            }
            (TokenizerKind::Bpe { vocab_size }, ModelWrapper::BPE(_)) => {
                check_byte_level(&hf).with_context(|| format!("tokenizer file {name}"))?;
                let n = hf.get_vocab_size(true);
                if n > *vocab_size {
                    bail!(
                        "tokenizer file {name} holds {n} tokens, more than the configured BPE vocab_size {vocab_size}"
                    );
                }
                Inner::Bpe { hf: Box::new(hf), requested: *vocab_size }
            }
            (kind, model) => bail!(
                "tokenizer file {name} holds a {} model, but the config says {kind:?} (expected {})",
                model_name(model),
                match kind {
                    TokenizerKind::Char => "WordLevel",
                    TokenizerKind::Bpe { .. } => "BPE",
                    TokenizerKind::Hf => "any model",
                }
            ),
        };
        Ok(Self { inner })
    }
}

/// Why `tokenizers` could not read `path`, first-line clear: a file that is valid JSON but not a
/// tokenizer is said to be one (serde's own message points at a column as if the JSON were broken).
fn not_a_tokenizer(path: &Path, e: impl std::fmt::Display) -> anyhow::Error {
    let name = path.display();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(io) if io.kind() == std::io::ErrorKind::PermissionDenied => {
            return anyhow!("permission denied: cannot read tokenizer file {name}")
        }
        Err(io) => return anyhow!("cannot read tokenizer file {name}: {io}"),
    };
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(v) => {
            let keys = v.as_object().map(|o| o.keys().take(8).cloned().collect::<Vec<_>>().join(", "));
            anyhow!(
                "tokenizer file {name} is valid JSON but not a Hugging Face tokenizer.json (top-level keys: {}; \
                 expected `model`, `normalizer`, `pre_tokenizer`, ...): {e}",
                keys.unwrap_or_else(|| "none, not an object".into())
            )
        }
        Err(_) => anyhow!("cannot load tokenizer file {name}: {e}"),
    }
}

/// The char vocabulary of a saved char tokenizer: every token one char, ids `0..n` each once.
fn char_vocab_of(hf: &tokenizers::Tokenizer) -> Result<CharVocab> {
    let vocab = hf.get_vocab(true);
    let n = vocab.len();
    let mut chars = vec![None; n];
    for (token, &id) in &vocab {
        let mut it = token.chars();
        let (Some(c), None) = (it.next(), it.next()) else {
            bail!("char vocabulary token {token:?} (id {id}) is not a single character");
        };
        match chars.get_mut(id as usize) {
            Some(slot @ None) => *slot = Some(c),
            Some(Some(_)) => bail!("char vocabulary id {id} is used twice"),
            None => bail!("char vocabulary id {id} is out of range for {n} tokens"),
        }
    }
    if n == 0 {
        bail!("char vocabulary is empty");
    }
    // n distinct ids below n: every slot is filled.
    Ok(CharVocab::new(chars.into_iter().flatten().collect()))
}

/// Checks that a BPE file is byte-level as `save` writes it: no normalizer, ByteLevel
/// pre-tokenizer with the GPT-2 regex and no prefix space (chunked encoding relies on this).
fn check_byte_level(hf: &tokenizers::Tokenizer) -> Result<()> {
    if hf.get_normalizer().is_some() {
        bail!("BPE tokenizer has a normalizer; expected a byte-level BPE as written by save");
    }
    match hf.get_pre_tokenizer() {
        Some(PreTokenizerWrapper::ByteLevel(b)) if b.use_regex && !b.add_prefix_space => Ok(()),
        other => bail!(
            "BPE pre-tokenizer is {other:?}; expected ByteLevel with use_regex=true and add_prefix_space=false \
             (as written by save)"
        ),
    }
}

fn model_name(model: &ModelWrapper) -> &'static str {
    match model {
        ModelWrapper::BPE(_) => "BPE",
        ModelWrapper::WordPiece(_) => "WordPiece",
        ModelWrapper::WordLevel(_) => "WordLevel",
        ModelWrapper::Unigram(_) => "Unigram",
    }
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").field("kind", &self.kind()).field("vocab_size", &self.vocab_size()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cut_only_at_isolated_newlines() {
        let line = "word word\n".repeat(BPE_CHUNK_BYTES / 5);
        let text = format!("{line}  \n\n x\n{line}");
        let chunks = bpe_chunks(&text);
        assert!(chunks.len() > 2);
        assert_eq!(chunks.concat(), text);
        for c in &chunks[..chunks.len() - 1] {
            let b = c.as_bytes();
            assert!(
                b.len() >= BPE_CHUNK_BYTES
                    && b[b.len() - 1] == b'\n'
                    && b[b.len() - 2] != b'\n'
                    && b[b.len() - 2] != b' '
            );
        }
        assert_eq!(bpe_chunks("short"), vec!["short"]);
        assert!(bpe_chunks("").is_empty());
    }

    #[test]
    fn char_vocab_is_sorted_and_errors_name_the_char() {
        let t = Tokenizer::train(&TokenizerKind::Char, "baé\nab").unwrap();
        assert_eq!(t.vocab_size(), 4);
        assert_eq!(t.encode("\nabé").unwrap(), vec![0, 1, 2, 3]);
        let err = t.encode("abz").unwrap_err().to_string();
        assert!(err.contains("'z'") && err.contains("position 2"), "{err}");
        let err = t.decode(&[0, 7]).unwrap_err().to_string();
        assert!(err.contains("token id 7"), "{err}");
    }
}
