//! Resuming a run: in its own directory from its newest checkpoint (after recovering a save that
//! was cut short), or as a branch into another directory from any checkpoint. A resume never
//! overwrites a newer checkpoint, a better best/, or weights and optimizer state with NaN in them.

use super::checkpoint;
use super::fs_steps::FsSteps;
use super::metrics;
use super::resume_check::refused_change;
use super::run_dir::{self, IfRunExists};
use super::trainer::Trainer;
use crate::config::Config;
use anyhow::{bail, Context, Result};
use std::path::Path;

impl Trainer {
    /// Continues from the checkpoint at (or newest under) `ckpt`, in its own run directory unless
    /// `out_dir` names another one; see [`Trainer::resume_with`].
    pub fn resume(ckpt: &Path, overrides: &[String], out_dir: Option<&Path>) -> Result<Self> {
        Self::resume_with(ckpt, overrides, out_dir, IfRunExists::Refuse)
    }

    /// Continues from the checkpoint at (or newest under) `ckpt`. `overrides` (`key=value`) may
    /// change anything but the keys [`refused_change`] lists (e.g. train.max_iters).
    ///
    /// In the checkpoint's own run directory (no `out_dir`, or that directory) the run goes on
    /// where it stopped: a save cut short is recovered first, and a checkpoint that is not the
    /// newest there is refused, since going on from it would overwrite the newer ones and best/
    /// (branch off with `out_dir` instead). In another directory the run is a branch that starts
    /// from this checkpoint; that directory must not hold a run unless `if_exists` is
    /// [`IfRunExists::Overwrite`].
    pub fn resume_with(
        ckpt: &Path,
        overrides: &[String],
        out_dir: Option<&Path>,
        if_exists: IfRunExists,
    ) -> Result<Self> {
        Self::resume_on(ckpt, overrides, out_dir, if_exists, crate::dist::world()?)
    }

    /// [`Trainer::resume_with`] on the ranks of `comm`, any number of them (each rank calls it):
    /// rank 0 checks and repairs the run directory, then every rank reads the checkpoint.
    pub fn resume_on(
        ckpt: &Path,
        overrides: &[String],
        out_dir: Option<&Path>,
        if_exists: IfRunExists,
        comm: std::sync::Arc<dyn crate::dist::Comm>,
    ) -> Result<Self> {
        let lead = comm.rank() == 0;
        let found = checkpoint::resolve_dir(ckpt)?;
        let home = found.parent().context("checkpoint has no parent dir")?.to_path_buf();
        let out = out_dir.map(Path::to_path_buf).unwrap_or_else(|| home.clone());
        let in_place = run_dir::same_dir(&out, &home);
        let first = checkpoint::load(ckpt)?;
        if !lead {
            // Rank 0 checks and repairs the directory; the others wait for it, then read.
        } else if in_place {
            if if_exists == IfRunExists::Overwrite {
                bail!(
                    "--overwrite would delete the run {} that holds the checkpoint being resumed; give --out \
                     another directory to branch off, or leave --overwrite out to continue the run",
                    home.display()
                );
            }
            let newer: Vec<String> = run_dir::checkpoints(&home)?
                .into_iter()
                .filter(|(s, _)| *s > first.state.step)
                .map(|(_, p)| p.file_name().unwrap_or_default().to_string_lossy().to_string())
                .collect();
            if !newer.is_empty() {
                bail!(
                    "checkpoint {} (step {}) is not the newest of its run {}: {} {} newer; going on from it \
                     there would overwrite them and best/. Resume the newest with `--resume {}`, or branch \
                     off from this one into a new directory with `--out DIR`",
                    first.dir.display(),
                    first.state.step,
                    home.display(),
                    newer.join(", "),
                    if newer.len() == 1 { "is" } else { "are" },
                    home.display()
                );
            }
            for line in run_dir::recover(&home, &FsSteps::new())? {
                eprintln!("note: {line}");
            }
        } else if if_exists == IfRunExists::Refuse {
            run_dir::refuse_if_run(&out)?;
        }
        comm.barrier()?;
        // Recovery may have renamed a `.old-best-*` the first load read back to `best`.
        let loaded = if in_place { checkpoint::load(ckpt)? } else { first };
        let text = toml::to_string(&loaded.cfg)?;
        let origin = loaded.dir.join(checkpoint::CONFIG_FILE).display().to_string();
        let mut cfg = Config::resolve(&text, &origin, overrides)?;
        if cfg.model.vocab_size == 0 {
            cfg.model.vocab_size = loaded.tokenizer.vocab_size();
        }
        if let Some(why) = refused_change(&loaded.cfg, &cfg) {
            bail!("cannot resume checkpoint {} with --set {why}", loaded.dir.display());
        }
        let mut t = Self::build_on(cfg, &out, Some(loaded.tokenizer), &crate::moe::build_router, comm)?;
        checkpoint::load_weights(&loaded.dir.join(checkpoint::MODEL_FILE), &t.params)?;
        let opt_file = loaded.dir.join(checkpoint::OPTIMIZER_FILE);
        checkpoint::check_optimizer_finite(&opt_file)?;
        t.opt.load(&opt_file)?;
        t.release_foreign_moments();
        if t.opt.step_count() != loaded.state.step {
            bail!(
                "checkpoint {}: optimizer step {} != trainer step {}",
                loaded.dir.display(),
                t.opt.step_count(),
                loaded.state.step
            );
        }
        if loaded.state.dataset != t.state.dataset {
            let name = |d: &Option<String>| d.clone().unwrap_or_else(|| "none (a text source)".into());
            bail!(
                "cannot resume checkpoint {} on another dataset: it was trained on dataset {} (manifest sha256), but \
                 data.source {} is dataset {}; resume with the data it was trained on",
                loaded.dir.display(),
                name(&loaded.state.dataset),
                t.cfg.data.source,
                name(&t.state.dataset)
            );
        }
        t.state = loaded.state;
        if in_place {
            // best/ may be newer than this checkpoint (a run stopped between the two saves): only a
            // better loss may replace it.
            if let Ok(best) = checkpoint::load(&home.join("best")) {
                if let Some(b) = best.state.best_val_loss {
                    t.state.best_val_loss = Some(t.state.best_val_loss.map_or(b, |own| own.min(b)));
                }
            }
            if lead {
                metrics::truncate_after(&t.out_dir, t.state.step)?;
            }
        } else if lead && if_exists == IfRunExists::Overwrite {
            run_dir::clear(&out, &t.fs)?;
        }
        Ok(t)
    }
}
