//! Planning a comparison: the runs `gumbel-moe compare` asks for, as (name, config overrides), and
//! whether a run already in the output folder can be reused instead of retrained.

use crate::config::Config;
use anyhow::{bail, Context, Result};
use std::path::Path;

/// The special `--routers` entry for the dense twin of the same active compute (no MoE layer).
pub const DENSE_FFN: &str = "dense_ffn";

/// The keys `--steps` sets.
const BUDGET_KEYS: [&str; 2] = ["train.max_iters", "train.lr_decay_iters"];

/// One run of a comparison: its folder name and every override on top of the base config.
#[derive(Clone, Debug, PartialEq)]
pub struct RunPlan {
    pub name: String,
    /// `key=value` strings, in order: `--set`, `--steps`, then the run's own.
    pub overrides: Vec<String>,
}

/// What to do with a run's folder.
#[derive(Clone, Debug, PartialEq)]
pub enum RunState {
    /// Nothing there yet: train.
    New,
    /// metrics.jsonl ends with the done line and config.json is this run's config: reuse.
    Finished,
    /// Same config, not finished, with a checkpoint: continue with `train --resume`.
    Partial,
    /// Something else (another config, or no checkpoint): move it aside and train afresh. The
    /// string says why.
    Stale(String),
}

/// Run names become folder names: letters, digits, `_`, `-`, `.`, not starting with `.`.
pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.starts_with('.')
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        bail!("run name `{name}` must be letters, digits, `_`, `-` or `.` (not starting with `.`)");
    }
    Ok(())
}

/// Parses `--variant NAME:key=value,key=value` into its name and overrides. A comma inside a value
/// is kept when the text after it has no `=` (e.g. `NAME:k=[1,2]`).
pub fn parse_variant(s: &str) -> Result<(String, Vec<String>)> {
    let Some((name, rest)) = s.split_once(':') else {
        bail!("--variant `{s}` is not of the form NAME:key=value,key=value");
    };
    let name = name.trim();
    check_name(name).with_context(|| format!("--variant `{s}`"))?;
    let mut overrides: Vec<String> = Vec::new();
    for part in rest.split(',') {
        match overrides.last_mut() {
            Some(prev) if !part.contains('=') => {
                prev.push(',');
                prev.push_str(part);
            }
            _ if part.trim().is_empty() => {}
            _ if !part.contains('=') => bail!("--variant `{s}`: `{part}` is not key=value"),
            _ => overrides.push(part.trim().to_string()),
        }
    }
    Ok((name.to_string(), overrides))
}

/// Turns `--routers`, `--variant`, `--set` and `--steps` into the runs, in the order given
/// (routers first). `--steps N` sets train.max_iters and train.lr_decay_iters to N (the cosine
/// shortened to the budget); a run's own overrides come last and win.
pub fn plan_runs(
    routers: &[String],
    variants: &[String],
    sets: &[String],
    steps: Option<usize>,
) -> Result<Vec<RunPlan>> {
    let mut common: Vec<String> = sets.to_vec();
    if let Some(n) = steps {
        if n == 0 {
            bail!("--steps must be > 0");
        }
        let budget = |s: &&String| s.split_once('=').is_some_and(|(k, _)| BUDGET_KEYS.contains(&k.trim()));
        if let Some(s) = sets.iter().find(budget) {
            bail!(
                "--steps {n} and --set {s} both set the step budget (--steps sets train.max_iters and \
                 train.lr_decay_iters): give one of them"
            );
        }
        common.push(format!("train.max_iters={n}"));
        common.push(format!("train.lr_decay_iters={n}"));
    }
    let mut runs: Vec<RunPlan> = Vec::new();
    for r in routers.iter().map(|r| r.trim()).filter(|r| !r.is_empty()) {
        check_name(r).with_context(|| format!("--routers entry `{r}`"))?;
        let own = if r == DENSE_FFN { "model.moe_every=0".to_string() } else { format!("model.router.kind={r}") };
        runs.push(RunPlan { name: r.to_string(), overrides: [common.clone(), vec![own]].concat() });
    }
    for v in variants {
        let (name, own) = parse_variant(v)?;
        runs.push(RunPlan { name, overrides: [common.clone(), own].concat() });
    }
    if runs.is_empty() {
        bail!("nothing to compare: give --routers KIND,KIND,... and/or --variant NAME:key=value,...");
    }
    for (i, r) in runs.iter().enumerate() {
        if runs[..i].iter().any(|p| p.name == r.name) {
            bail!("run name `{}` is given twice (a --variant may not reuse a router's name)", r.name);
        }
    }
    Ok(runs)
}

/// Whether the last non-empty line of `metrics.jsonl` is `{"event":"done",...}`.
pub fn has_done_line(metrics: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(metrics) else { return false };
    let Some(last) = text.lines().rev().find(|l| !l.trim().is_empty()) else { return false };
    serde_json::from_str::<serde_json::Value>(last)
        .is_ok_and(|v| v.get("event").and_then(|e| e.as_str()) == Some("done"))
}

/// Whether the run in `dir` was trained with `cfg` (its config.json). `model.vocab_size = 0` in
/// `cfg` (taken from the tokenizer) matches any vocabulary size.
pub fn same_config(dir: &Path, cfg: &Config) -> Result<bool> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let stored = Config::from_json(&text, &path.display().to_string())?;
    let mut want = cfg.clone();
    if want.model.vocab_size == 0 {
        want.model.vocab_size = stored.model.vocab_size;
    }
    Ok(stored == want)
}

/// Decides what to do with the run folder `dir` for a run resolved to `cfg`.
pub fn run_state(dir: &Path, cfg: &Config) -> RunState {
    if !dir.exists() {
        return RunState::New;
    }
    match same_config(dir, cfg) {
        Err(e) => RunState::Stale(format!("{e:#}")),
        Ok(false) => RunState::Stale("its config.json differs from this run's config".into()),
        Ok(true) if has_done_line(&dir.join("metrics.jsonl")) => RunState::Finished,
        Ok(true) if has_checkpoint(dir) => RunState::Partial,
        Ok(true) => RunState::Stale("unfinished, with no checkpoint to resume".into()),
    }
}

fn has_checkpoint(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|rd| {
        rd.filter_map(|e| e.ok()).any(|e| e.file_name().to_string_lossy().starts_with("ckpt-") && e.path().is_dir())
    })
}
