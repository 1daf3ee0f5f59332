//! What one run's metrics.jsonl says, boiled down: the curves the plots draw and the numbers of
//! one row of the comparison table.

use super::stats::{Paired, Spread};
use crate::train::metrics;
use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::Value;
use std::path::Path;

/// The curves of one run, read from its metrics.jsonl.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunMetrics {
    /// (step, val_loss) of every evaluation (eval_iters batches; not the final full-split one).
    pub val_loss: Vec<(u64, f64)>,
    /// (step, train_loss) of every log line (the loss of that step's batch).
    pub train_loss: Vec<(u64, f64)>,
    /// Steps of the log lines with `tokens_per_expert`, and at each, `[layer][expert]` tokens.
    pub load_steps: Vec<u64>,
    pub load: Vec<Vec<Vec<u64>>>,
    /// The last log line with router telemetry.
    pub last_telemetry: Option<Value>,
    /// The `{"event":"done"}` line, if the run finished.
    pub done: Option<Value>,
}

impl RunMetrics {
    /// Reads `dir/metrics.jsonl`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("metrics.jsonl");
        if !path.exists() {
            anyhow::bail!("{} does not exist: not a training run folder (or the run never started)", path.display());
        }
        let lines = metrics::read(&path)?;
        Ok(Self::from_lines(&lines))
    }

    pub fn from_lines(lines: &[Value]) -> Self {
        let mut m = RunMetrics::default();
        for v in lines {
            if v.get("event").is_some() {
                if v["event"] == "done" {
                    m.done = Some(v.clone());
                }
                continue;
            }
            let Some(step) = v.get("step").and_then(Value::as_u64) else { continue };
            if let Some(l) = v.get("val_loss").and_then(Value::as_f64) {
                m.val_loss.push((step, l));
            }
            if let Some(l) = v.get("train_loss").and_then(Value::as_f64) {
                m.train_loss.push((step, l));
            }
            if let Some(t) = v.get("tokens_per_expert") {
                if let Ok(t) = serde_json::from_value::<Vec<Vec<u64>>>(t.clone()) {
                    m.load_steps.push(step);
                    m.load.push(t);
                }
            }
            if v.get("load_cv").is_some() {
                m.last_telemetry = Some(v.clone());
            }
        }
        m
    }

    /// Mean over the layers of an array key of the last telemetry line; None when there is no
    /// such line or the model has no MoE layer.
    pub fn layer_mean(&self, key: &str) -> Option<f64> {
        let xs: Vec<f64> =
            self.last_telemetry.as_ref()?.get(key)?.as_array()?.iter().filter_map(Value::as_f64).collect();
        (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
    }

    /// Sum over the layers of an array key of the last telemetry line.
    pub fn layer_sum(&self, key: &str) -> Option<u64> {
        let xs = self.last_telemetry.as_ref()?.get(key)?.as_array()?;
        (!xs.is_empty()).then(|| xs.iter().filter_map(Value::as_u64).sum())
    }
}

/// One row of the comparison table (report.md and report.json).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RunSummary {
    pub name: String,
    /// model.router.kind, or "dense_ffn" for a model without MoE layers.
    pub router: String,
    /// "ok" or "failed".
    pub status: String,
    /// The train.log of a failed run.
    pub log: Option<String>,
    /// The run's `seed` (None in the row of several seeds).
    pub seed: Option<u64>,
    /// The done line's final validation loss (mean over the finished seeds).
    pub val_loss: Option<f64>,
    /// The lowest periodic validation loss (eval_iters batches) of the run.
    pub best_val_loss: Option<f64>,
    /// "full_split" or "eval_iters".
    pub val_loss_kind: Option<String>,
    pub steps: Option<u64>,
    pub tok_per_s: Option<f64>,
    /// Last logged values, mean over the MoE layers.
    pub load_cv: Option<f64>,
    pub router_entropy: Option<f64>,
    pub top1_prob: Option<f64>,
    pub dropped_pct: Option<f64>,
    /// Last logged, summed over the MoE layers.
    pub dead_experts: Option<u64>,
    pub wall_s: Option<f64>,
    /// val_loss minus dense_ffn's (filled in by the report; with several seeds, the mean of the
    /// differences paired by seed).
    pub delta_vs_dense_ffn: Option<f64>,
    /// val_loss minus the baseline's (`compare --baseline`, dense_ffn by default), paired by seed
    /// as delta_vs_dense_ffn.
    pub delta_vs_baseline: Option<f64>,
    /// Several seeds: the final validation losses' mean, sd and 95% interval.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss_spread: Option<Spread>,
    /// Several seeds: val_loss minus the baseline's, paired by seed (filled in by the report).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta_paired: Option<Paired>,
    /// Several seeds: each seed's own row, in seed order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub per_seed: Vec<RunSummary>,
}

/// The router name of a resolved config (config.json as JSON).
pub fn router_of(cfg: &Value) -> Option<String> {
    if cfg.pointer("/model/moe_every").and_then(Value::as_u64) == Some(0) {
        return Some(super::plan::DENSE_FFN.to_string());
    }
    cfg.pointer("/model/router/kind").and_then(Value::as_str).map(str::to_string)
}

impl RunSummary {
    /// The row of the run `name` in `dir`: "failed" (pointing at `dir/train.log`) when its
    /// metrics do not end with the done line.
    pub fn from_dir(name: &str, dir: &Path) -> Self {
        let cfg: Option<Value> =
            std::fs::read_to_string(dir.join("config.json")).ok().and_then(|t| serde_json::from_str(&t).ok());
        let router = cfg.as_ref().and_then(router_of).unwrap_or_else(|| "?".into());
        let mut row = match RunMetrics::read(dir) {
            Ok(m) if m.done.is_some() => Self::from_metrics(name, &router, &m),
            _ => Self::failed(name, &router, &dir.join("train.log")),
        };
        row.seed = cfg.as_ref().and_then(|c| c.get("seed")).and_then(Value::as_u64);
        row
    }

    pub fn failed(name: &str, router: &str, log: &Path) -> Self {
        RunSummary {
            name: name.into(),
            router: router.into(),
            status: "failed".into(),
            log: Some(log.display().to_string()),
            ..Default::default()
        }
    }

    pub fn from_metrics(name: &str, router: &str, m: &RunMetrics) -> Self {
        let done = m.done.as_ref();
        let f = |k: &str| done.and_then(|d| d.get(k)).and_then(Value::as_f64);
        RunSummary {
            name: name.into(),
            router: router.into(),
            status: if done.is_some() { "ok" } else { "failed" }.into(),
            log: None,
            val_loss: f("val_loss"),
            best_val_loss: m.val_loss.iter().map(|p| p.1).filter(|v| v.is_finite()).min_by(f64::total_cmp),
            val_loss_kind: done.and_then(|d| d.get("val_loss_kind")).and_then(Value::as_str).map(str::to_string),
            steps: done.and_then(|d| d.get("step")).and_then(Value::as_u64),
            tok_per_s: f("tok_per_s"),
            load_cv: m.layer_mean("load_cv"),
            router_entropy: m.layer_mean("router_entropy"),
            top1_prob: m.layer_mean("top1_prob"),
            dropped_pct: m.layer_mean("dropped_pct"),
            dead_experts: m.layer_sum("dead_experts"),
            wall_s: f("wall_s"),
            ..Default::default()
        }
    }
}

/// Reads a run folder's metrics, naming the folder in the error.
pub fn read_run(dir: &Path) -> Result<RunMetrics> {
    RunMetrics::read(dir).with_context(|| format!("reading the run in {}", dir.display()))
}
