//! A new run that starts from another checkpoint's weights (`train --init-from`): fresh optimizer
//! state, schedule and trainer state; every tensor must match by name and shape.

use super::checkpoint;
use super::run_dir::{self, IfRunExists};
use super::trainer::Trainer;
use crate::config::Config;
use anyhow::{bail, Context, Result};
use std::path::Path;

impl Trainer {
    /// A fresh run in `out_dir` from the weights of the checkpoint at (or newest under) `ckpt`,
    /// with `config` (a TOML file; None: the checkpoint's own config) and `overrides`. The
    /// tokenizer is the checkpoint's. Errors name the tensor whose name or shape differs.
    pub fn init_from(
        ckpt: &Path,
        config: Option<&Path>,
        overrides: &[String],
        out_dir: &Path,
        if_exists: IfRunExists,
    ) -> Result<Self> {
        let loaded = checkpoint::load(ckpt)?;
        let mut cfg = match config {
            Some(path) => Config::from_file(path, overrides)?,
            None => {
                let origin = loaded.dir.join(checkpoint::CONFIG_FILE).display().to_string();
                Config::resolve(&toml::to_string(&loaded.cfg)?, &origin, overrides)?
            }
        };
        if cfg.data.tokenizer != loaded.cfg.data.tokenizer {
            bail!(
                "--init-from {}: config key `data.tokenizer` = {:?} but the checkpoint's tokenizer is {:?} (its \
                 tokenizer is kept)",
                loaded.dir.display(),
                cfg.data.tokenizer,
                loaded.cfg.data.tokenizer
            );
        }
        if cfg.model.vocab_size == 0 {
            cfg.model.vocab_size = loaded.cfg.model.vocab_size;
        }
        let lead = crate::dist::world()?.rank() == 0;
        if lead && if_exists == IfRunExists::Refuse {
            run_dir::refuse_if_run(out_dir)?;
        }
        let t = Self::build(cfg, out_dir, Some(loaded.tokenizer), &crate::moe::build_router)?;
        checkpoint::load_weights(&loaded.dir.join(checkpoint::MODEL_FILE), &t.params)
            .with_context(|| format!("--init-from {}: the weights do not fit the config", loaded.dir.display()))?;
        if lead && if_exists == IfRunExists::Overwrite {
            run_dir::clear(out_dir, &t.fs)?;
        }
        Ok(t)
    }
}
