//! Text generation: autoregressive sampling with temperature and top-k, as nanoGPT's sample.py.
//! Draws come from the Philox stream keyed by (seed, position), so a seed reproduces its text.

use crate::data::Tokenizer;
use crate::model::Gpt;
use crate::nn::Ctx;
use crate::rng::{draw, u32_to_open_unit, Stream};
use anyhow::{bail, Result};
use candle_core::{DType, Device, IndexOp, Tensor};

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
    if !(s.temperature.is_finite() && s.temperature >= 0.0) {
        bail!("the sampling temperature must be finite and >= 0 (0 = greedy), got {}", s.temperature);
    }
    let ids = tok.encode(prompt)?;
    if ids.is_empty() {
        bail!("the prompt is empty: give at least one character");
    }
    tok.decode(&generate_ids(model, &ids, s, device, ctx)?)
}

/// Continues the token ids `prompt` (non-empty) by `max_new_tokens` tokens, the model seeing the
/// last `block_size` of them; returns prompt + continuation. Temperature 0 is greedy decoding
/// (the first of equal maxima), as transformers' `generate(do_sample=False)`.
pub fn generate_ids(model: &Gpt, prompt: &[u32], s: &SampleConfig, device: &Device, ctx: Ctx) -> Result<Vec<u32>> {
    if !(s.temperature.is_finite() && s.temperature >= 0.0) {
        bail!("the sampling temperature must be finite and >= 0 (0 = greedy), got {}", s.temperature);
    }
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
