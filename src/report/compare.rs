//! `gumbel-moe compare`: trains each planned run as a child process of the same binary (reusing
//! finished ones), then writes report.md / report.json and the plots (val_loss.png,
//! train_loss.png, NAME/load.png); and `gumbel-moe plot`.
//!
//! Each run trains with `train --config BASE --set ... --out DIR/NAME --quiet`, its stdout and
//! stderr in DIR/NAME/train.log. A run folder whose config.json is this run's config is reused when
//! finished and resumed (`train --resume DIR/NAME`) when it has a checkpoint; any other folder is
//! moved to DIR/.prev/G/NAME (G a new generation each time: nothing earlier is deleted) and the run
//! trains from scratch. DIR may not be a training run's own folder (its plots would be replaced).
//!
//! With `--seeds N` every run trains N times (seed k in `DIR/NAME` for k = 0, `DIR/NAME.seedS`
//! after: [`super::seeds`]); each seed is reused, resumed or retrained on its own, the report gives
//! the spread over the seeds and the plots draw each run's mean curve in its min-max band.

use super::bands::{train_loss_band_chart, val_loss_band_chart, SeedCurves};
use super::plan::{plan_runs, run_state, RunPlan, RunState, DENSE_FFN};
use super::plot::{load_heatmap, train_loss_chart, val_loss_chart};
use super::prev::move_aside;
use super::seeds::{aggregate, expand};
use super::summary::{read_run, router_of, RunMetrics, RunSummary};
use super::table::Report;
use crate::config::Config;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// The command line of `compare`.
#[derive(Clone, Debug)]
pub struct CompareArgs {
    pub config: PathBuf,
    pub routers: Vec<String>,
    pub variants: Vec<String>,
    pub sets: Vec<String>,
    pub steps: Option<usize>,
    /// Seeds per run (1: one training each, as before; see [`super::seeds`]).
    pub seeds: usize,
    /// The run the others are compared with (None: dense_ffn, when planned).
    pub baseline: Option<String>,
    pub jobs: usize,
    pub out: PathBuf,
}

/// Runs the comparison with `exe` as the training binary; returns the report.
pub fn compare(exe: &Path, a: &CompareArgs) -> Result<Report> {
    if a.jobs == 0 {
        bail!("--jobs 0: the number of runs trained at once must be at least 1");
    }
    refuse_run_folder(&a.out)?;
    let plans = plan_runs(&a.routers, &a.variants, &a.sets, a.steps)?;
    if let Some(b) = a.baseline.as_deref().filter(|b| !plans.iter().any(|p| p.name == *b)) {
        let names: Vec<&str> = plans.iter().map(|p| p.name.as_str()).collect();
        bail!("--baseline {b} is not one of the runs ({})", names.join(", "));
    }
    // Resolve every config first: a typo fails before anything trains.
    let mut base_seeds = Vec::new();
    for p in &plans {
        let cfg = Config::from_file(&a.config, &p.overrides).with_context(|| format!("run `{}`", p.name))?;
        base_seeds.push(cfg.seed);
    }
    let runs = expand(&plans, &base_seeds, a.seeds)?;
    let mut cfgs = Vec::new();
    for r in &runs {
        let cfg = Config::from_file(&a.config, &r.plan.overrides).with_context(|| format!("run `{}`", r.plan.name))?;
        cfgs.push(cfg);
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("cannot create {}", a.out.display()))?;
    let todo: Vec<(usize, RunState)> = runs
        .iter()
        .zip(&cfgs)
        .enumerate()
        .map(|(i, (r, c))| (i, run_state(&a.out.join(&r.plan.name), c)))
        .filter(|(i, s)| {
            if *s == RunState::Finished {
                eprintln!("{}: finished with this config, reused", runs[*i].plan.name);
            }
            *s != RunState::Finished
        })
        .collect();
    let stale: Vec<&str> = todo
        .iter()
        .filter(|(_, s)| matches!(s, RunState::Stale(_)))
        .map(|(i, _)| runs[*i].plan.name.as_str())
        .collect();
    for (i, s) in &todo {
        if let RunState::Stale(why) = s {
            eprintln!("{}: retraining ({why})", runs[*i].plan.name);
        }
    }
    if let Some(generation) = move_aside(&a.out, &stale)? {
        eprintln!("the earlier folders of {} are kept in {}", stale.join(", "), generation.display());
    }
    let next = AtomicUsize::new(0);
    std::thread::scope(|sc| {
        for _ in 0..a.jobs.max(1).min(todo.len()) {
            sc.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::SeqCst);
                let Some((i, state)) = todo.get(k) else { break };
                // A failed run shows in the report (and the exit status); the others go on.
                if let Err(e) = train_one(exe, a, &runs[*i].plan, state) {
                    eprintln!("{}: {e:#}", runs[*i].plan.name);
                }
            });
        }
    });
    let steps = cfgs.first().map(|c| c.train.max_iters).unwrap_or(0);
    let title = format!(
        "Base config `{}`, {} steps each{}. Written by `gumbel-moe compare`.",
        a.config.display(),
        steps,
        if a.sets.is_empty() { String::new() } else { format!(", --set {}", a.sets.join(" ")) }
    );
    let seed_rows: Vec<RunSummary> = runs
        .iter()
        .zip(&cfgs)
        .map(|(r, c)| {
            let mut row = RunSummary::from_dir(&r.plan.name, &a.out.join(&r.plan.name));
            if row.router == "?" {
                // A run that failed before writing config.json: name its router from the plan.
                row.router = router_of(&serde_json::to_value(c).unwrap_or_default()).unwrap_or(row.router);
            }
            row.seed = Some(r.seed);
            row
        })
        .collect();
    let rows: Vec<RunSummary> = if a.seeds == 1 {
        seed_rows
    } else {
        let mut by_run: Vec<Vec<RunSummary>> = vec![Vec::new(); plans.len()];
        for (r, row) in runs.iter().zip(seed_rows) {
            by_run[r.run].push(row);
        }
        plans.iter().zip(by_run).map(|(p, rows)| aggregate(&p.name, rows)).collect()
    };
    let report = Report::against(&title, rows, a.baseline.as_deref().unwrap_or(DENSE_FFN));
    report.write(&a.out)?;
    // Plots: a missing one is a warning, not a failed comparison.
    let (mut curves, mut train_curves) = (Vec::new(), Vec::new());
    for p in &plans {
        curves.push((p.name.clone(), Vec::new()));
        train_curves.push((p.name.clone(), Vec::new()));
    }
    for r in &runs {
        let dir = a.out.join(&r.plan.name);
        let Ok(m) = RunMetrics::read(&dir) else { continue };
        if !m.load.is_empty() {
            let title = format!("{}: expert load", r.plan.name);
            if let Err(e) = load_heatmap(&dir.join("load.png"), &title, &m.load_steps, &m.load) {
                eprintln!("warning: {e:#}");
            }
        }
        curves[r.run].1.push(m.val_loss);
        train_curves[r.run].1.push(m.train_loss);
    }
    let plotted = if a.seeds == 1 {
        let one = |c: Vec<SeedCurves>| -> Vec<(String, Vec<(u64, f64)>)> {
            c.into_iter().filter_map(|(n, mut s)| s.pop().map(|s| (n, s))).collect()
        };
        let (v, t) = (one(curves), one(train_curves));
        [val_loss_chart(&a.out.join("val_loss.png"), &v), train_loss_chart(&a.out.join("train_loss.png"), &t)]
    } else {
        [
            val_loss_band_chart(&a.out.join("val_loss.png"), &curves),
            train_loss_band_chart(&a.out.join("train_loss.png"), &train_curves),
        ]
    };
    for e in plotted.into_iter().filter_map(Result::err) {
        eprintln!("warning: {e:#}");
    }
    eprintln!("{}", report.sentence());
    eprintln!("wrote {}", a.out.join("report.md").display());
    Ok(report)
}

/// Refuses an output folder that is a training run's or a checkpoint's own (compare would replace
/// its val_loss.png and train_loss.png).
fn refuse_run_folder(out: &Path) -> Result<()> {
    for marker in ["metrics.jsonl", "config.json", "trainer_state.json", "best"] {
        if out.join(marker).exists() {
            bail!(
                "--out {} is a training run's folder (it holds {marker}): compare writes report.md, val_loss.png \
                 and train_loss.png there, replacing that run's plots; choose another folder",
                out.display()
            );
        }
    }
    Ok(())
}

/// Trains (or resumes) one run; Ok when the child exited 0.
fn train_one(exe: &Path, a: &CompareArgs, p: &RunPlan, state: &RunState) -> Result<()> {
    let dir = a.out.join(&p.name);
    let mut cmd = Command::new(exe);
    cmd.arg("train");
    // Runs side by side share the cores: each gets cores / jobs threads (workers and intra-op).
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let share = (cores / a.jobs.max(1)).max(1).to_string();
    if std::env::var_os("GUMBEL_MOE_THREADS").is_none() {
        cmd.env("GUMBEL_MOE_THREADS", &share);
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        cmd.env("RAYON_NUM_THREADS", &share);
    }
    match state {
        RunState::Partial => {
            eprintln!("{}: unfinished with this config, resuming", p.name);
            cmd.arg("--resume").arg(&dir);
        }
        _ => {
            cmd.arg("--config").arg(&a.config);
            for o in &p.overrides {
                cmd.arg("--set").arg(o);
            }
        }
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    cmd.arg("--out").arg(&dir).arg("--quiet");
    let log_path = dir.join("train.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    eprintln!("{}: training -> {} (log {})", p.name, dir.display(), log_path.display());
    let t0 = Instant::now();
    let status = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    if !status.success() {
        bail!("training failed ({status}); see {}", log_path.display());
    }
    eprintln!("{}: done in {:.0} s", p.name, t0.elapsed().as_secs_f64());
    Ok(())
}

/// `gumbel-moe plot RUN_DIR`: RUN_DIR/val_loss.png, RUN_DIR/train_loss.png and RUN_DIR/load.png
/// from its metrics.jsonl.
/// Returns the files written; a plot with nothing to draw is skipped with a warning, both
/// skipped is an error.
pub fn plot_run(dir: &Path) -> Result<Vec<PathBuf>> {
    let m = read_run(dir)?;
    let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "run".into());
    let mut wrote = Vec::new();
    let mut problems = Vec::new();
    let vl = dir.join("val_loss.png");
    match val_loss_chart(&vl, &[(name.clone(), m.val_loss.clone())]) {
        Ok(()) => wrote.push(vl),
        Err(e) => problems.push(format!("{e:#}")),
    }
    let tl = dir.join("train_loss.png");
    match train_loss_chart(&tl, &[(name.clone(), m.train_loss.clone())]) {
        Ok(()) => wrote.push(tl),
        Err(e) => problems.push(format!("{e:#}")),
    }
    let lp = dir.join("load.png");
    match load_heatmap(&lp, &format!("{name}: expert load"), &m.load_steps, &m.load) {
        Ok(()) => wrote.push(lp),
        Err(e) => problems.push(format!("{e:#}")),
    }
    if wrote.is_empty() {
        bail!("nothing to plot in {}: {}", dir.display(), problems.join("; "));
    }
    for p in problems {
        eprintln!("warning: {p}");
    }
    Ok(wrote)
}
