//! The comparison report: one row per run, the best run, and each run's difference from the dense
//! twin (`dense_ffn`), as report.md and report.json.

use super::plan::DENSE_FFN;
use super::summary::RunSummary;
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::Path;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    /// What was compared (base config, steps, ...), one line of text.
    pub title: String,
    pub runs: Vec<RunSummary>,
    /// The finished run with the lowest final validation loss.
    pub best: Option<String>,
    /// "dense_ffn" when such a run finished (the deltas are against it).
    pub baseline: Option<String>,
}

impl Report {
    /// Fills in the best run and the deltas against `dense_ffn`.
    pub fn new(title: &str, mut runs: Vec<RunSummary>) -> Self {
        let base = runs.iter().find(|r| r.name == DENSE_FFN).and_then(|r| r.val_loss);
        for r in &mut runs {
            r.delta_vs_dense_ffn = base.zip(r.val_loss).map(|(b, v)| v - b);
        }
        let best = runs
            .iter()
            .filter_map(|r| r.val_loss.filter(|v| v.is_finite()).map(|v| (v, &r.name)))
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, n)| n.clone());
        Report { title: title.into(), runs, best, baseline: base.map(|_| DENSE_FFN.to_string()) }
    }

    pub fn to_markdown(&self) -> String {
        let mut s = format!("# Router comparison\n\n{}\n\n", self.title);
        s += "| run | router | val loss | Δ vs dense_ffn | tok/s | load CV | router entropy | top-1 prob | dropped % | dead experts | wall (s) |\n";
        s += "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
        for r in &self.runs {
            if r.status != "ok" {
                let log = r.log.as_deref().unwrap_or("?");
                s += &format!("| {} | {} | failed: see `{log}` | | | | | | | | |\n", r.name, r.router);
                continue;
            }
            s += &format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                r.name,
                r.router,
                num(r.val_loss, 4),
                r.delta_vs_dense_ffn.map_or("–".into(), |d| format!("{d:+.4}")),
                num(r.tok_per_s, 0),
                num(r.load_cv, 3),
                num(r.router_entropy, 3),
                num(r.top1_prob, 3),
                num(r.dropped_pct, 2),
                r.dead_experts.map_or("–".into(), |d| d.to_string()),
                num(r.wall_s, 1),
            );
        }
        s += "\n";
        s += &self.sentence();
        s += "\n\nval loss: the final validation loss of the done line (the whole validation split when \
              train.final_full_eval). Load CV (std/mean of tokens per expert), router entropy (nats), top-1 \
              prob and dropped %: the last log line, mean over the MoE layers; dead experts: summed over the \
              layers (no token in the last train.dead_expert_window steps).\n";
        s
    }

    /// "Best: X (val loss ...). Against dense_ffn: a +0.01, b -0.02." and the failed runs.
    pub fn sentence(&self) -> String {
        let mut s = match &self.best {
            Some(b) => {
                let v = self.runs.iter().find(|r| &r.name == b).and_then(|r| r.val_loss).unwrap_or(f64::NAN);
                format!("Best run: **{b}** (final val loss {v:.4}).")
            }
            None => "No run finished.".to_string(),
        };
        if self.baseline.is_some() {
            let d: Vec<String> = self
                .runs
                .iter()
                .filter(|r| r.name != DENSE_FFN)
                .filter_map(|r| r.delta_vs_dense_ffn.map(|d| format!("{} {d:+.4}", r.name)))
                .collect();
            if !d.is_empty() {
                s += &format!(" Val loss against dense_ffn: {}.", d.join(", "));
            }
        }
        let failed: Vec<&str> = self.runs.iter().filter(|r| r.status != "ok").map(|r| r.name.as_str()).collect();
        if !failed.is_empty() {
            s += &format!(" Failed: {}.", failed.join(", "));
        }
        s
    }

    /// Writes `dir/report.md` and `dir/report.json`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let md = dir.join("report.md");
        std::fs::write(&md, self.to_markdown()).with_context(|| format!("writing {}", md.display()))?;
        let js = dir.join("report.json");
        std::fs::write(&js, serde_json::to_string_pretty(self)? + "\n")
            .with_context(|| format!("writing {}", js.display()))?;
        Ok(())
    }
}

fn num(x: Option<f64>, digits: usize) -> String {
    match x {
        Some(v) if v.is_finite() => format!("{v:.digits$}"),
        _ => "–".into(),
    }
}
