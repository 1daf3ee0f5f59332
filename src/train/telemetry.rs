//! Router telemetry: what every MoE layer's router did between two log lines of metrics.jsonl.
//!
//! The trainer feeds one [`LayerStep`] per MoE layer after every optimizer step; at each log line
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

use serde_json::{json, Map, Value};

/// One MoE layer's routing in one optimizer step (all micro-batches).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerStep {
    /// Token-slots kept per expert, summed over the micro-batches.
    pub tokens: Vec<u64>,
    /// Router entropy (nats), mean over the micro-batches; NaN if the layer does not report it.
    pub entropy: f64,
    /// Top-1 router probability, mean over the micro-batches; NaN if not reported.
    pub top1: f64,
    /// Token-slots dropped by the capacity limit.
    pub dropped: u64,
    /// Token-slots routed (tokens x experts per token).
    pub routed: u64,
}

/// Running sums of one layer since the last log line, and when each expert last got a token.
#[derive(Clone, Debug, Default)]
struct LayerAcc {
    tokens: Vec<u64>,
    entropy: f64,
    top1: f64,
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
        Self { window: window.max(1) as u64, layers: Vec::new(), last_step: None }
    }

    /// Adds optimizer step `step`'s routing, one entry per MoE layer (the same layers every step).
    pub fn record(&mut self, step: u64, layers: &[LayerStep]) {
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
            acc.entropy += s.entropy;
            acc.top1 += s.top1;
            acc.dropped += s.dropped;
            acc.routed += s.routed;
            acc.steps += 1;
        }
        self.last_step = Some(step);
    }

    /// The numbers since the last call (or since the start), then a new interval begins. Dead
    /// experts are counted at the last recorded step.
    pub fn summary(&mut self) -> Summary {
        let mut s = Summary::default();
        let (mut dropped, mut routed) = (0u64, 0u64);
        for acc in &mut self.layers {
            let steps = acc.steps.max(1) as f64;
            let dead = match self.last_step {
                // Seen in the window (last - window, last] when last_seen + window > last.
                Some(last) => acc.last_seen.iter().filter(|seen| seen.is_none_or(|l| l + self.window <= last)).count(),
                None => 0,
            };
            s.load_cv.push(load_cv(&acc.tokens));
            s.dead_experts.push(dead);
            s.router_entropy.push(acc.entropy / steps);
            s.top1_prob.push(acc.top1 / steps);
            s.dropped_pct.push(if acc.routed > 0 { 100.0 * acc.dropped as f64 / acc.routed as f64 } else { 0.0 });
            s.tokens_per_expert.push(std::mem::replace(&mut acc.tokens, vec![0; acc.last_seen.len()]));
            dropped += acc.dropped;
            routed += acc.routed;
            (acc.entropy, acc.top1, acc.dropped, acc.routed, acc.steps) = (0.0, 0.0, 0, 0, 0);
        }
        s.dropped_frac = if routed > 0 { dropped as f64 / routed as f64 } else { 0.0 };
        s
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
