//! Router telemetry: what every MoE layer's router did between two log lines of metrics.jsonl.
//!
//! The trainer feeds a [`StepRouting`] after every optimizer step: one [`LayerStep`] of host counts
//! per MoE layer (from the dispatch offsets the MoE layer already copies) and the router scores as
//! a device tensor, summed on the device and copied once per log line. At each log line
//! [`Telemetry::summary`] returns, per layer, the numbers of the steps since the previous log line
//! and starts a new interval:
//!
//! | key | per layer |
//! |---|---|
//! | `tokens_per_expert` | token-slots each expert kept (after capacity), summed over the interval |
//! | `load_cv` | std / mean of `tokens_per_expert` (population std; 0 = perfectly even) |
//! | `dead_experts` | experts that got no token in the last `train.dead_expert_window` steps |
//! | `router_entropy` | mean router entropy (nats) of the noise-free softmax over all experts |
//! | `top1_prob` | mean top-1 probability of that softmax |
//! | `dropped_pct` | token-slots dropped by the capacity limit, % of those routed |
//!
//! plus `dropped_frac`, all layers together (a fraction, kept from the first metrics format).
//!
//! Everything comes from the steps this process has trained: after a resume the first log line
//! covers the steps since the resumed checkpoint, and the dead-expert window restarts there
//! (nothing about earlier steps is kept in the checkpoint). While fewer than `window` steps have
//! been seen, the window is every step seen so far.

use crate::moe::layer::MoeStats;
use candle_core::{DType, Device, Result, Tensor};
use serde_json::{json, Map, Value};

/// One MoE layer's routing counts in one optimizer step (all micro-batches).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerStep {
    /// Token-slots kept per expert, summed over the micro-batches.
    pub tokens: Vec<u64>,
    /// Token-slots dropped by the capacity limit.
    pub dropped: u64,
    /// Token-slots routed (tokens x experts per token).
    pub routed: u64,
}

/// Every MoE layer's routing in one optimizer step.
#[derive(Clone, Debug, Default)]
pub struct StepRouting {
    /// One entry per MoE layer, in layer order.
    pub layers: Vec<LayerStep>,
    /// (L, 2), any device and float dtype: per MoE layer, the router entropy (nats) and top-1
    /// probability, means over the micro-batches (NaN where the layer does not report them).
    /// None: not reported.
    pub scores: Option<Tensor>,
}

impl StepRouting {
    /// A step of `layers` MoE layers over `e` experts with nothing routed yet.
    pub fn new(layers: usize, e: usize) -> Self {
        Self { layers: vec![LayerStep { tokens: vec![0; e], ..LayerStep::default() }; layers], scores: None }
    }

    /// Adds one of the step's `accum` micro-batches: its counts, and 1/accum of its scores, which
    /// stay on the device (`dev`, where a NaN stands for a score a layer does not report).
    pub fn add(&mut self, stats: &[MoeStats], accum: usize, dev: &Device) -> Result<()> {
        let mut rows = Vec::with_capacity(stats.len());
        for (r, s) in self.layers.iter_mut().zip(stats) {
            r.tokens.resize(s.tokens_per_expert.len(), 0);
            for (t, &c) in r.tokens.iter_mut().zip(&s.tokens_per_expert) {
                *t += c as u64;
            }
            r.dropped += s.dropped as u64;
            r.routed += s.routed as u64;
            rows.push(match (&s.entropy, &s.top1_prob) {
                (Some(a), Some(b)) => Tensor::stack(&[a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?], 0)?,
                _ => Tensor::full(f32::NAN, 2, dev)?,
            }); // (2,)
        }
        if rows.is_empty() {
            return Ok(());
        }
        let v = (Tensor::stack(&rows, 0)? / accum as f64)?; // (L, 2)
        self.scores = Some(match self.scores.take() {
            Some(acc) => (acc + v)?,
            None => v,
        });
        Ok(())
    }
}

/// Running sums of one layer since the last log line, and when each expert last got a token.
#[derive(Clone, Debug, Default)]
struct LayerAcc {
    tokens: Vec<u64>,
    dropped: u64,
    routed: u64,
    steps: u64,
    /// The last step at which each expert kept at least one token.
    last_seen: Vec<Option<u64>>,
}

/// Per-layer numbers of one log line (see the module docs for each field).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    pub tokens_per_expert: Vec<Vec<u64>>,
    pub load_cv: Vec<f64>,
    pub dead_experts: Vec<usize>,
    pub router_entropy: Vec<f64>,
    pub top1_prob: Vec<f64>,
    pub dropped_pct: Vec<f64>,
    /// All layers together, as a fraction.
    pub dropped_frac: f64,
}

/// Accumulates [`LayerStep`]s between log lines.
#[derive(Clone, Debug)]
pub struct Telemetry {
    window: u64,
    layers: Vec<LayerAcc>,
    /// (L, 2) sum of the interval's router scores, on their device.
    scores: Option<Tensor>,
    /// Some step of the interval had no scores: they are then NaN.
    unscored: bool,
    /// The last step recorded.
    last_step: Option<u64>,
}

/// Coefficient of variation of a load vector: population std / mean (0 when the mean is 0).
pub fn load_cv(tokens: &[u64]) -> f64 {
    if tokens.is_empty() {
        return 0.0;
    }
    let n = tokens.len() as f64;
    let mean = tokens.iter().map(|&t| t as f64).sum::<f64>() / n;
    if mean == 0.0 {
        return 0.0;
    }
    let var = tokens.iter().map(|&t| (t as f64 - mean).powi(2)).sum::<f64>() / n;
    var.sqrt() / mean
}

impl Telemetry {
    /// `window`: train.dead_expert_window (0 is taken as 1: no token in the last step).
    pub fn new(window: usize) -> Self {
        Self { window: window.max(1) as u64, layers: Vec::new(), scores: None, unscored: false, last_step: None }
    }

    /// Adds optimizer step `step`'s routing (the same layers every step). The scores are summed
    /// on their device, with no copy.
    pub fn record(&mut self, step: u64, routing: &StepRouting) -> Result<()> {
        let layers = &routing.layers;
        if self.layers.len() != layers.len() {
            self.layers = vec![LayerAcc::default(); layers.len()];
        }
        for (acc, s) in self.layers.iter_mut().zip(layers) {
            if acc.tokens.len() != s.tokens.len() {
                acc.tokens = vec![0; s.tokens.len()];
                acc.last_seen = vec![None; s.tokens.len()];
            }
            for (e, &t) in s.tokens.iter().enumerate() {
                acc.tokens[e] += t;
                if t > 0 {
                    acc.last_seen[e] = Some(step);
                }
            }
            acc.dropped += s.dropped;
            acc.routed += s.routed;
            acc.steps += 1;
        }
        match &routing.scores {
            Some(v) => {
                self.scores = Some(match self.scores.take() {
                    Some(acc) => (acc + v.detach())?,
                    None => v.detach(),
                })
            }
            None => self.unscored = true,
        }
        self.last_step = Some(step);
        Ok(())
    }

    /// The numbers since the last call (or since the start), then a new interval begins. Dead
    /// experts are counted at the last recorded step. Copies the interval's score sums to the host.
    pub fn summary(&mut self) -> Result<Summary> {
        let mut s = Summary::default();
        let (mut dropped, mut routed) = (0u64, 0u64);
        let scores = match (self.scores.take(), std::mem::take(&mut self.unscored)) {
            (Some(v), false) => Some(v.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.to_vec2::<f64>()?),
            _ => None,
        };
        for (l, acc) in self.layers.iter_mut().enumerate() {
            let steps = acc.steps.max(1) as f64;
            let dead = match self.last_step {
                // Seen in the window (last - window, last] when last_seen + window > last.
                Some(last) => acc.last_seen.iter().filter(|seen| seen.is_none_or(|l| l + self.window <= last)).count(),
                None => 0,
            };
            s.load_cv.push(load_cv(&acc.tokens));
            s.dead_experts.push(dead);
            // A layer without scores: NaN for a scored interval, 0 for an empty one.
            let score = |i: usize| match &scores {
                Some(v) => v.get(l).map_or(f64::NAN, |r| r[i] / steps),
                None if acc.steps == 0 => 0.0,
                None => f64::NAN,
            };
            s.router_entropy.push(score(0));
            s.top1_prob.push(score(1));
            s.dropped_pct.push(if acc.routed > 0 { 100.0 * acc.dropped as f64 / acc.routed as f64 } else { 0.0 });
            s.tokens_per_expert.push(std::mem::replace(&mut acc.tokens, vec![0; acc.last_seen.len()]));
            dropped += acc.dropped;
            routed += acc.routed;
            (acc.dropped, acc.routed, acc.steps) = (0, 0, 0);
        }
        s.dropped_frac = if routed > 0 { dropped as f64 / routed as f64 } else { 0.0 };
        Ok(s)
    }
}

impl Summary {
    /// The metrics.jsonl keys of this summary.
    pub fn to_json(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("tokens_per_expert".into(), json!(self.tokens_per_expert));
        m.insert("load_cv".into(), json!(self.load_cv));
        m.insert("dead_experts".into(), json!(self.dead_experts));
        m.insert("router_entropy".into(), json!(self.router_entropy));
        m.insert("top1_prob".into(), json!(self.top1_prob));
        m.insert("dropped_pct".into(), json!(self.dropped_pct));
        m.insert("dropped_frac".into(), json!(self.dropped_frac));
        m
    }

    /// The progress-bar part, all layers together: mean load CV, dead experts summed, dropped %.
    /// Empty for a model without MoE layers.
    pub fn progress(&self) -> String {
        if self.load_cv.is_empty() {
            return String::new();
        }
        let cv = self.load_cv.iter().sum::<f64>() / self.load_cv.len() as f64;
        let dead: usize = self.dead_experts.iter().sum();
        format!("cv {cv:.2} dead {dead} drop {:.1}%", 100.0 * self.dropped_frac)
    }
}
