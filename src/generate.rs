//! Text generation: autoregressive sampling with temperature and top-k, as nanoGPT's sample.py.
//! Draws come from the Philox stream keyed by (seed, position), so a seed reproduces its text.
//! [`generate_streaming`] hands each piece of text out as soon as its token is sampled (the
//! command line prints and flushes it), and a request is bounded by [`MAX_NEW_TOKENS`].

use crate::data::Tokenizer;
use crate::model::Gpt;
use crate::nn::Ctx;
use crate::rng::{draw, u32_to_open_unit, Stream};
use anyhow::{bail, Result};
use candle_core::{DType, Device, IndexOp, Tensor};

/// The most new tokens one request may ask for: about 2 minutes of a small CPU model (1 ms a
/// token) and far beyond any model's context; a larger request is a typo, not a wish.
pub const MAX_NEW_TOKENS: usize = 100_000;

/// Tokens decoded again around each new one to find its text (byte-level BPE needs a few for a
/// character split across tokens).
const DECODE_WINDOW: usize = 16;

#[derive(Clone, Debug)]
pub struct SampleConfig {
    pub max_new_tokens: usize,
    /// Finite and >= 0; 0 = greedy (argmax).
    pub temperature: f64,
    /// Keep only the k most likely tokens; 0 = all.
    pub top_k: usize,
    pub seed: u64,
}

/// Picks a token from `logits` (V) with the sampling settings; `pos` keys the random draw.
pub fn sample_token(logits: &[f64], s: &SampleConfig, pos: u64) -> usize {
    let argmax = || logits.iter().enumerate().fold(0, |best, (i, &v)| if v > logits[best] { i } else { best });
    if s.temperature <= 0.0 {
        return argmax();
    }
    let mut scaled: Vec<f64> = logits.iter().map(|l| l / s.temperature).collect();
    if s.top_k > 0 && s.top_k < scaled.len() {
        let mut sorted = scaled.clone();
        sorted.sort_by(|a, b| b.partial_cmp(a).unwrap_or(std::cmp::Ordering::Equal));
        let kth = sorted[s.top_k - 1];
        scaled.iter_mut().filter(|v| **v < kth).for_each(|v| *v = f64::NEG_INFINITY);
    }
    let max = scaled.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let probs: Vec<f64> = scaled.iter().map(|v| (v - max).exp()).collect();
    let total: f64 = probs.iter().sum();
    let r = draw(s.seed, Stream::Sample, pos as u32, (pos >> 32) as u32, 0);
    let u = u32_to_open_unit(r[0]) as f64 * total;
    let mut acc = 0.0;
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if u < acc {
            return i;
        }
    }
    argmax()
}

/// Continues `prompt` by `max_new_tokens` tokens; returns prompt + continuation.
pub fn generate(
    model: &Gpt,
    tok: &Tokenizer,
    prompt: &str,
    s: &SampleConfig,
    device: &Device,
    ctx: Ctx,
) -> Result<String> {
    generate_streaming(model, tok, prompt, s, device, ctx, &mut |_| Ok(()))
}

/// [`generate`], calling `on_text` first with the prompt's text and then with each new token's text
/// as soon as it is sampled (a character split across byte-level tokens comes whole, with its
/// last token). Returns prompt + continuation, decoded as a whole.
pub fn generate_streaming(
    model: &Gpt,
    tok: &Tokenizer,
    prompt: &str,
    s: &SampleConfig,
    device: &Device,
    ctx: Ctx,
    on_text: &mut dyn FnMut(&str) -> Result<()>,
) -> Result<String> {
    check(s)?;
    let ids = tok.encode(prompt)?;
    if ids.is_empty() {
        bail!("the prompt is empty: give at least one character");
    }
    on_text(&tok.decode(&ids)?)?;
    let all = generate_ids_with(model, &ids, s, device, ctx, &mut |ids| on_text(&new_text(tok, ids)?))?;
    tok.decode(&all)
}

/// The text the last of `ids` adds: the decoding of a short window with it, less the decoding of
/// the window without it; a trailing U+FFFD (a character not yet complete) is held back.
fn new_text(tok: &Tokenizer, ids: &[u32]) -> Result<String> {
    let w = &ids[ids.len().saturating_sub(DECODE_WINDOW)..];
    let (before, after) = (tok.decode(&w[..w.len() - 1])?, tok.decode(w)?);
    let before = before.trim_end_matches('\u{FFFD}');
    let piece = after.strip_prefix(before).unwrap_or_default();
    Ok(piece.trim_end_matches('\u{FFFD}').to_string())
}

fn check(s: &SampleConfig) -> Result<()> {
    if !(s.temperature.is_finite() && s.temperature >= 0.0) {
        bail!("the sampling temperature must be finite and >= 0 (0 = greedy), got {}", s.temperature);
    }
    if s.max_new_tokens > MAX_NEW_TOKENS {
        bail!("--max-new-tokens {} is above the maximum of {MAX_NEW_TOKENS} new tokens", s.max_new_tokens);
    }
    Ok(())
}

/// Continues the token ids `prompt` (non-empty) by `max_new_tokens` tokens, the model seeing the
/// last `block_size` of them; returns prompt + continuation. Temperature 0 is greedy decoding
/// (the first of equal maxima), as transformers' `generate(do_sample=False)`.
pub fn generate_ids(model: &Gpt, prompt: &[u32], s: &SampleConfig, device: &Device, ctx: Ctx) -> Result<Vec<u32>> {
    generate_ids_with(model, prompt, s, device, ctx, &mut |_| Ok(()))
}

/// [`generate_ids`], calling `on_token` with the ids so far after each new one.
pub fn generate_ids_with(
    model: &Gpt,
    prompt: &[u32],
    s: &SampleConfig,
    device: &Device,
    ctx: Ctx,
    on_token: &mut dyn FnMut(&[u32]) -> Result<()>,
) -> Result<Vec<u32>> {
    check(s)?;
    if prompt.is_empty() {
        bail!("the prompt is empty: give at least one token");
    }
    let mut ids = prompt.to_vec();
    let bs = model.block_size();
    for pos in 0..s.max_new_tokens {
        let start = ids.len().saturating_sub(bs);
        let window = &ids[start..];
        let x = Tensor::from_slice(window, (1, window.len()), device)?;
        let logits = model.forward(&x, &ctx)?.logits; // (1, T, V)
        let last = logits.i((0, window.len() - 1))?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        ids.push(sample_token(&last, s, pos as u64) as u32);
        on_token(&ids)?;
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_top1_pick_the_argmax() {
        let l = [0.1, 2.0, -1.0, 1.9];
        let mut s = SampleConfig { max_new_tokens: 1, temperature: 0.0, top_k: 0, seed: 7 };
        assert_eq!(sample_token(&l, &s, 0), 1);
        s.temperature = 1.0;
        s.top_k = 1;
        for pos in 0..50 {
            assert_eq!(sample_token(&l, &s, pos), 1);
        }
    }

    #[test]
    fn sampling_frequencies_follow_softmax() {
        let l = [0.0f64, (2.0f64).ln(), (3.0f64).ln()]; // probabilities 1/6, 2/6, 3/6
        let s = SampleConfig { max_new_tokens: 1, temperature: 1.0, top_k: 0, seed: 11 };
        let n = 60_000;
        let mut c = [0f64; 3];
        for pos in 0..n {
            c[sample_token(&l, &s, pos)] += 1.0;
        }
        let chi2: f64 =
            [1.0, 2.0, 3.0].iter().zip(c).map(|(p, o)| (o - n as f64 * p / 6.0).powi(2) / (n as f64 * p / 6.0)).sum();
        assert!(chi2 < 13.8, "chi2 = {chi2} (df 2, p = 0.001 threshold 13.8)");
    }
}
