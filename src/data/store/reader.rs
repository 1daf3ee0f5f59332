//! Reads a prepared split through memory maps: every shard's header and size are checked once at
//! open (against the manifest), tokens are read only where a window falls.

use super::format::{hex, Header, HEADER_BYTES};
use super::manifest::Manifest;
use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use std::path::{Path, PathBuf};

/// One memory-mapped shard.
struct Shard {
    path: PathBuf,
    map: Mmap,
    width: usize,
    tokens: u64,
}

/// The shards of one split, read as one sequence of tokens (shard after shard, manifest order).
pub struct ShardSet {
    shards: Vec<Shard>,
    /// The global index of each shard's first token.
    starts: Vec<u64>,
    len: u64,
    vocab_size: u32,
}

impl ShardSet {
    /// Opens and checks the shards of `split` ("train" or "val") listed in `manifest`, in `dir`.
    /// Errors name the file and what disagrees: a truncated or foreign file, a header that
    /// disagrees with the manifest.
    pub fn open(dir: &Path, manifest: &Manifest, split: &str) -> Result<Self> {
        let tok = &manifest.tokenizer;
        let mut shards = Vec::new();
        let mut starts = Vec::new();
        let mut len = 0u64;
        for info in manifest.shards(split) {
            let path = dir.join(&info.file);
            let name = path.display().to_string();
            let file = std::fs::File::open(&path).with_context(|| format!("cannot open shard {name}"))?;
            let size = file.metadata().with_context(|| format!("cannot stat shard {name}"))?.len();
            if size < HEADER_BYTES as u64 {
                bail!("shard {name} is truncated: {size} bytes, shorter than its {HEADER_BYTES}-byte header");
            }
            // SAFETY: a published shard is never written again (prepare writes a temporary file and
            // renames it), so the mapped bytes do not change under us. A file truncated by someone
            // else while mapped would fault; its size is checked against the header here.
            let map = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot memory-map shard {name}"))?;
            let h = Header::decode(&map[..HEADER_BYTES], &name)?;
            let disagree = |what: &str, header: String, manifest: String| {
                anyhow::anyhow!(
                    "shard {name}: its header says {what} {header}, but {} says {manifest}",
                    dir.join(super::manifest::MANIFEST_FILE).display()
                )
            };
            if h.token_count != info.tokens {
                return Err(disagree("token count", h.token_count.to_string(), info.tokens.to_string()));
            }
            if h.vocab_size as usize != tok.vocab_size {
                return Err(disagree("vocabulary size", h.vocab_size.to_string(), tok.vocab_size.to_string()));
            }
            if h.eot_id != tok.eot_id {
                return Err(disagree("end-of-text id", h.eot_id.to_string(), tok.eot_id.to_string()));
            }
            if hex(&h.tokenizer_sha256) != tok.sha256 {
                return Err(disagree("tokenizer sha256", hex(&h.tokenizer_sha256), tok.sha256.clone()));
            }
            if h.token_width != manifest.token_width {
                return Err(disagree("token width", h.token_width.to_string(), manifest.token_width.to_string()));
            }
            if size != h.file_bytes() {
                bail!(
                    "shard {name} is truncated or overlong: {size} bytes, but its header promises {} tokens of {} \
                     bytes = {} bytes",
                    h.token_count,
                    h.token_width,
                    h.file_bytes()
                );
            }
            starts.push(len);
            len += h.token_count;
            shards.push(Shard { path, map, width: h.token_width as usize, tokens: h.token_count });
        }
        Ok(Self { shards, starts, len, vocab_size: tok.vocab_size as u32 })
    }

    /// Tokens in the split.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends the `n` tokens at global position `offset` to `out` (a window may span shards).
    /// Refuses an id at or above the vocabulary size, naming the shard and the token's position.
    pub fn read(&self, offset: usize, n: usize, out: &mut Vec<u32>) -> Result<()> {
        let (mut pos, end) = (offset as u64, offset as u64 + n as u64);
        if end > self.len {
            bail!("window {offset}..{end} is past the end of the split ({} tokens)", self.len);
        }
        while pos < end {
            let k = self.starts.partition_point(|&s| s <= pos) - 1;
            let s = &self.shards[k];
            let local = pos - self.starts[k];
            let take = (end - pos).min(s.tokens - local);
            let from = HEADER_BYTES + local as usize * s.width;
            let bytes = &s.map[from..from + take as usize * s.width];
            let before = out.len();
            if s.width == 2 {
                out.extend(bytes.chunks_exact(2).map(|b| u32::from(u16::from_le_bytes([b[0], b[1]]))));
            } else {
                out.extend(bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])));
            }
            if let Some(i) = out[before..].iter().position(|&t| t >= self.vocab_size) {
                bail!(
                    "shard {}: token id {} at token position {} (byte offset {}) is not below the vocabulary \
                     size {}",
                    s.path.display(),
                    out[before + i],
                    local + i as u64,
                    from + i * s.width,
                    self.vocab_size
                );
            }
            pos += take;
        }
        Ok(())
    }
}
