//! Writes one split's tokens into numbered shards (`train-000000.bin`, ...), each published whole.
//!
//! Tokens stream into `.tmp-<split>-NNNNNN.bin` behind a placeholder header; closing a shard
//! writes the real header (with the token count), syncs and renames it. Memory stays flat.

use super::atomic::{publish, tmp_path};
use super::format::{token_width, Header, HEADER_BYTES};
use super::manifest::ShardInfo;
use anyhow::{bail, Context, Result};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The file name of shard `index` of `split`.
pub fn shard_name(split: &str, index: usize) -> String {
    format!("{split}-{index:06}.bin")
}

/// What every shard of a dataset shares.
#[derive(Clone, Debug)]
pub struct ShardSpec {
    pub vocab_size: u32,
    pub eot_id: u32,
    pub tokenizer_sha256: [u8; 32],
}

struct Open {
    tmp: PathBuf,
    out: BufWriter<std::fs::File>,
    tokens: u64,
}

/// Streams the tokens of one split into shards.
pub struct ShardWriter {
    dir: PathBuf,
    split: String,
    spec: ShardSpec,
    width: u32,
    next_index: usize,
    open: Option<Open>,
}

impl ShardWriter {
    /// A writer whose next shard is number `next_index` (the shards before it are done).
    pub fn new(dir: &Path, split: &str, spec: ShardSpec, next_index: usize) -> Self {
        let width = token_width(spec.vocab_size as usize);
        Self { dir: dir.to_path_buf(), split: split.to_string(), spec, width, next_index, open: None }
    }

    /// Tokens in the shard being written (0 when none is open).
    pub fn open_tokens(&self) -> u64 {
        self.open.as_ref().map_or(0, |o| o.tokens)
    }

    /// Appends `tokens` to the open shard (opening one if needed). Refuses an id at or above the
    /// vocabulary size.
    pub fn push(&mut self, tokens: &[u32]) -> Result<()> {
        if let Some(pos) = tokens.iter().position(|&t| t >= self.spec.vocab_size) {
            bail!(
                "token id {} is not below the vocabulary size {} (shard {} of split {})",
                tokens[pos],
                self.spec.vocab_size,
                self.next_index,
                self.split
            );
        }
        if self.open.is_none() {
            let path = self.dir.join(shard_name(&self.split, self.next_index));
            let tmp = tmp_path(&path);
            let file = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
            let mut out = BufWriter::with_capacity(1 << 20, file);
            out.write_all(&[0u8; HEADER_BYTES]).with_context(|| format!("cannot write {}", tmp.display()))?;
            self.open = Some(Open { tmp, out, tokens: 0 });
        }
        let o = self.open.as_mut().expect("opened above");
        let mut bytes = Vec::with_capacity(tokens.len() * self.width as usize);
        if self.width == 2 {
            tokens.iter().for_each(|&t| bytes.extend_from_slice(&(t as u16).to_le_bytes()));
        } else {
            tokens.iter().for_each(|&t| bytes.extend_from_slice(&t.to_le_bytes()));
        }
        o.out.write_all(&bytes).with_context(|| format!("cannot write {}", o.tmp.display()))?;
        o.tokens += tokens.len() as u64;
        Ok(())
    }

    /// Finishes the open shard (header, sync, rename) and returns it; None when none is open.
    pub fn close(&mut self) -> Result<Option<ShardInfo>> {
        let Some(mut o) = self.open.take() else { return Ok(None) };
        let name = shard_name(&self.split, self.next_index);
        let header = Header {
            token_width: self.width,
            vocab_size: self.spec.vocab_size,
            eot_id: self.spec.eot_id,
            token_count: o.tokens,
            tokenizer_sha256: self.spec.tokenizer_sha256,
        };
        let write = |o: &mut Open| -> std::io::Result<()> {
            o.out.flush()?;
            let f = o.out.get_mut();
            f.seek(SeekFrom::Start(0))?;
            f.write_all(&header.encode())?;
            f.flush()
        };
        write(&mut o).with_context(|| format!("cannot finish {}", o.tmp.display()))?;
        drop(o.out);
        publish(&o.tmp, &self.dir.join(&name))?;
        self.next_index += 1;
        Ok(Some(ShardInfo { file: name, tokens: o.tokens }))
    }
}
