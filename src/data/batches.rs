//! The train/validation split and the batches drawn from a tokenized split.
//!
//! Random batches are nanoGPT's `get_batch`, made reproducible: the window offsets are a pure
//! function of (seed, step, micro-batch, row) through the Philox counter-based generator, so a
//! resumed or re-run training sees exactly the same batches. The tokens are a vector in memory or
//! a prepared split's memory-mapped shards ([`super::store::ShardSet`]); the windows are the same
//! function of (seed, step, micro-batch, row) either way.

use super::store::ShardSet;
use crate::rng::{draw, Stream};
use anyhow::{bail, Result};
use std::sync::Arc;

/// nanoGPT's split: the first `train_fraction` of the characters (not bytes) train, the rest
/// validation (0.9 gives nanoGPT's 90/10). The cut is `floor(chars * train_fraction)`;
/// the fraction is clamped to [0, 1] (NaN counts as 0).
pub fn split_text(text: &str, train_fraction: f64) -> (&str, &str) {
    let fraction = if train_fraction.is_nan() { 0.0 } else { train_fraction.clamp(0.0, 1.0) };
    let chars = text.chars().count();
    let cut = ((chars as f64 * fraction).floor() as usize).min(chars);
    let byte = text.char_indices().nth(cut).map_or(text.len(), |(b, _)| b);
    text.split_at(byte)
}

/// Draws (x, y) windows of `block_size` tokens from one tokenized split.
#[derive(Clone)]
pub struct Batcher {
    tokens: Tokens,
    block_size: usize,
    batch_size: usize,
    seed: u64,
}

/// One batch of consecutive windows: (x, y, rows), row-major.
pub type SeqBatch = (Vec<u32>, Vec<u32>, usize);

/// Where a batcher's tokens live.
#[derive(Clone)]
enum Tokens {
    Memory(Arc<Vec<u32>>),
    Shards(Arc<ShardSet>),
}

impl Tokens {
    fn len(&self) -> usize {
        match self {
            Tokens::Memory(v) => v.len(),
            Tokens::Shards(s) => s.len(),
        }
    }

    /// Appends the `n` tokens at `offset` to `out`; only shards can fail (a bad token id).
    fn read(&self, offset: usize, n: usize, out: &mut Vec<u32>) -> Result<()> {
        match self {
            Tokens::Memory(v) => {
                out.extend_from_slice(&v[offset..offset + n]);
                Ok(())
            }
            Tokens::Shards(s) => s.read(offset, n, out),
        }
    }
}

impl Batcher {
    /// A batcher over `tokens`. Errors if `block_size` or `batch_size` is 0, or if
    /// `tokens.len() < block_size + 2` (one window and its shifted target need `block_size + 1`
    /// tokens; one more leaves a choice of two offsets).
    pub fn new(tokens: Vec<u32>, block_size: usize, batch_size: usize, seed: u64) -> Result<Self> {
        Self::over(Tokens::Memory(Arc::new(tokens)), block_size, batch_size, seed)
    }

    /// A batcher over a prepared split's shards (the same checks as [`Batcher::new`]).
    pub fn from_shards(shards: ShardSet, block_size: usize, batch_size: usize, seed: u64) -> Result<Self> {
        Self::over(Tokens::Shards(Arc::new(shards)), block_size, batch_size, seed)
    }

    fn over(tokens: Tokens, block_size: usize, batch_size: usize, seed: u64) -> Result<Self> {
        if block_size == 0 || batch_size == 0 {
            bail!("block_size ({block_size}) and batch_size ({batch_size}) must both be at least 1");
        }
        let need = block_size.saturating_add(2);
        if tokens.len() < need {
            bail!(
                "split has {} tokens, need at least block_size+2 = {need} (block_size {block_size}); \
                 use a longer text or a smaller block_size",
                tokens.len()
            );
        }
        Ok(Self { tokens, block_size, batch_size, seed })
    }

    /// The window offset of `row` in the random batch (step, micro): uniform in
    /// `[0, len - block_size - 1]`, from 64 random bits (modulo bias below 2^-32).
    ///
    /// Philox counter: (low 32 bits of step, micro, row) in the Batch stream. Steps at or above
    /// 2^32 fold their high bits into the key, so they never repeat the batches of lower steps.
    fn offset(&self, step: u64, micro: u32, row: u32) -> usize {
        let high = step >> 32;
        let key = self.seed ^ high.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let r = draw(key, Stream::Batch, step as u32, micro, row);
        let bits = (u64::from(r[1]) << 32) | u64::from(r[0]);
        let range = (self.tokens.len() - self.block_size) as u64;
        (bits % range) as usize
    }

    /// A random batch like nanoGPT's `get_batch`: `batch_size` windows at offsets drawn uniformly
    /// in `[0, len - block_size - 1]`, keyed by (seed, step, micro) and the row: a pure function of
    /// its arguments. Returns (x, y), row-major, `batch_size * block_size` each; y is x shifted by
    /// one token.
    ///
    /// Panics where [`Batcher::try_random_batch`] errors (a bad token id in a shard); tokens in
    /// memory never do.
    pub fn random_batch(&self, step: u64, micro: u32) -> (Vec<u32>, Vec<u32>) {
        self.try_random_batch(step, micro).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// [`Batcher::random_batch`], with an error naming the shard and position of a token id at
    /// or above the vocabulary size.
    pub fn try_random_batch(&self, step: u64, micro: u32) -> Result<(Vec<u32>, Vec<u32>)> {
        let t = self.block_size;
        let mut x = Vec::with_capacity(self.batch_size * t);
        let mut y = Vec::with_capacity(self.batch_size * t);
        let mut window = Vec::with_capacity(t + 1);
        for row in 0..self.batch_size {
            let o = self.offset(step, micro, row as u32);
            window.clear();
            self.tokens.read(o, t + 1, &mut window)?;
            x.extend_from_slice(&window[..t]);
            y.extend_from_slice(&window[1..]);
        }
        Ok((x, y))
    }

    /// The whole split as consecutive non-overlapping windows (stride `block_size`, the first at
    /// offset 0), `floor((len - 1) / block_size)` of them, grouped into batches of at most
    /// `batch_size` rows (the last may be smaller), for an exact full-split evaluation. Each
    /// element is (x, y, rows), row-major like `random_batch`. The tail tokens after the last
    /// full window are not predicted.
    ///
    /// Panics where [`Batcher::try_sequential_batches`] errors (a bad token id in a shard).
    pub fn sequential_batches(&self) -> Vec<(Vec<u32>, Vec<u32>, usize)> {
        self.try_sequential_batches().unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// [`Batcher::sequential_batches`], with an error naming the shard and position of a token id
    /// at or above the vocabulary size.
    pub fn try_sequential_batches(&self) -> Result<Vec<SeqBatch>> {
        let t = self.block_size;
        let windows = (self.tokens.len() - 1) / t;
        let mut batches = Vec::with_capacity(windows.div_ceil(self.batch_size));
        let mut first = 0;
        let mut span = Vec::new();
        while first < windows {
            let rows = self.batch_size.min(windows - first);
            let (start, end) = (first * t, (first + rows) * t);
            span.clear();
            self.tokens.read(start, end + 1 - start, &mut span)?;
            let x = span[..end - start].to_vec();
            let y = span[1..].to_vec();
            batches.push((x, y, rows));
            first += rows;
        }
        Ok(batches)
    }

    /// Tokens in the split.
    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// Tokens per window.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Windows per random batch (and at most per sequential batch).
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("num_tokens", &self.tokens.len())
            .field("block_size", &self.block_size)
            .field("batch_size", &self.batch_size)
            .field("seed", &self.seed)
            .finish()
    }
}
