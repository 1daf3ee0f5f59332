//! The comparison report: one row per run, the best run, and each run's difference from the dense
//! twin (`dense_ffn`), as report.md and report.json. With several seeds a row holds the means over
//! the seeds, the spread of the final validation loss and the difference paired by seed (table in
//! [`super::table_seeds`]).

use super::plan::DENSE_FFN;
use super::stats::paired;
use super::summary::RunSummary;
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::Path;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    /// What was compared (base config, steps, ...), one line of text.
    pub title: String,
    /// Seeds per run (1: one training per run, no per_seed rows).
    pub seeds: usize,
    pub runs: Vec<RunSummary>,
    /// The finished run with the lowest final validation loss.
    pub best: Option<String>,
    /// The run the deltas are against (`compare --baseline`, "dense_ffn" by default), when it
    /// finished.
    pub baseline: Option<String>,
}

impl Report {
    /// [`Report::against`] `dense_ffn`.
    pub fn new(title: &str, runs: Vec<RunSummary>) -> Self {
        Self::against(title, runs, DENSE_FFN)
    }

    /// Fills in the best run (the lowest mean final val loss of the runs whose every seed
    /// finished) and the deltas against `baseline` and `dense_ffn`, paired by seed index when runs
    /// have several seeds (`per_seed`).
    pub fn against(title: &str, mut runs: Vec<RunSummary>, baseline: &str) -> Self {
        let seeds = runs.iter().map(|r| r.per_seed.len()).max().unwrap_or(0).max(1);
        let dense = runs.iter().find(|r| r.name == DENSE_FFN).map(seed_losses);
        let base_row = runs.iter().find(|r| r.name == baseline);
        let base = base_row.map(seed_losses);
        let baseline = base_row.and_then(|r| r.val_loss).map(|_| baseline.to_string());
        // Seed k's difference: its loss minus seed k's of the other run.
        let diff = |other: &Option<Vec<Option<f64>>>, k: usize, own: Option<f64>| -> Option<f64> {
            Some(own? - (*other.as_ref()?.get(k)?)?)
        };
        for r in &mut runs {
            let own = seed_losses(r);
            for (k, s) in r.per_seed.iter_mut().enumerate() {
                (s.delta_vs_dense_ffn, s.delta_vs_baseline) = (diff(&dense, k, own[k]), diff(&base, k, own[k]));
            }
            if let Some(d) = &dense {
                r.delta_vs_dense_ffn = paired(&own, d).map(|p| p.diff.mean);
            }
            let Some(b) = &base else { continue };
            let p = paired(&own, b);
            r.delta_vs_baseline = p.as_ref().map(|p| p.diff.mean);
            if !r.per_seed.is_empty() {
                r.delta_paired = p;
            }
        }
        let best = runs
            .iter()
            .filter(|r| r.status == "ok")
            .filter_map(|r| r.val_loss.filter(|v| v.is_finite()).map(|v| (v, &r.name)))
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, n)| n.clone());
        Report { title: title.into(), seeds, runs, best, baseline }
    }

    pub fn to_markdown(&self) -> String {
        if self.seeds > 1 {
            return super::table_seeds::markdown(self);
        }
        let mut s = format!("# Router comparison\n\n{}\n\n", self.title);
        s += &format!("| run | router | val loss | Δ vs {} | tok/s | load CV | router entropy | top-1 prob | dropped % | dead experts | wall (s) |\n", self.baseline_name());
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
                r.delta_vs_baseline.map_or("–".into(), |d| format!("{d:+.4}")),
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

    /// The baseline's name for headers: the finished baseline, else dense_ffn.
    pub fn baseline_name(&self) -> &str {
        self.baseline.as_deref().unwrap_or(DENSE_FFN)
    }

    /// "Best: X (val loss ...). Against dense_ffn: a +0.01, b -0.02." and the failed runs.
    pub fn sentence(&self) -> String {
        if self.seeds > 1 {
            return super::table_seeds::sentence(self);
        }
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
                .filter(|r| r.name != self.baseline_name())
                .filter_map(|r| r.delta_vs_baseline.map(|d| format!("{} {d:+.4}", r.name)))
                .collect();
            if !d.is_empty() {
                s += &format!(" Val loss against {}: {}.", self.baseline_name(), d.join(", "));
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

/// The final val loss of each seed of a row (one entry without per-seed rows; None where a seed
/// did not finish).
fn seed_losses(r: &RunSummary) -> Vec<Option<f64>> {
    if r.per_seed.is_empty() {
        return vec![r.val_loss];
    }
    r.per_seed.iter().map(|s| s.val_loss.filter(|_| s.status == "ok")).collect()
}

pub(super) fn num(x: Option<f64>, digits: usize) -> String {
    match x {
        Some(v) if v.is_finite() => format!("{v:.digits$}"),
        _ => "–".into(),
    }
}
