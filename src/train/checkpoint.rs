//! Checkpoints: a directory holding
//! - `model.safetensors`: the weights under the names documented in `model.rs`,
//! - `optimizer.safetensors`: AdamW moments `m.<name>`, `v.<name>` and `step`,
//! - `config.json`: the resolved config, `tokenizer.json`: the tokenizer (Hugging Face format),
//! - `trainer_state.json`: steps done, best validation loss, the RNG position.
//!
//! Written atomically: everything goes into a temporary sibling directory `.tmp-NAME-PID`, synced,
//! then renamed into place, so a kill during a save leaves the previous checkpoint intact (the
//! replacement order is in `run_dir`'s header). Parameters with a NaN or an infinity are never
//! saved, and never loaded: the error names the tensor.

use super::file_mode::{as_if_created, check_readable};
use super::finite::{first_non_finite, first_non_finite_in_file};
use super::fs_steps::FsSteps;
use super::run_dir;
use super::AdamW;
use crate::config::{Config, TokenizerType};
use crate::data::{Tokenizer, TokenizerKind};
use crate::nn::Params;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The training loop's own state.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    pub best_val_loss: Option<f64>,
    /// Every random draw is Philox keyed by (seed, step, ...): the seed and the next step are the
    /// whole RNG position.
    pub rng_seed: u64,
    pub rng_next_step: u64,
    pub tokens_seen: u64,
    pub wall_s: f64,
    /// The REINFORCE router's moving-average loss baseline (None until its first step, and for
    /// every other router); saved so a resumed run continues exactly.
    #[serde(default)]
    pub reinforce_baseline: Option<f64>,
    /// The SHA-256 of the prepared dataset's manifest.json (None for a text source): a resume on
    /// another dataset is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
}

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const CONFIG_FILE: &str = "config.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const STATE_FILE: &str = "trainer_state.json";

/// Writes a checkpoint to `dir` atomically (replacing an older one there), every file-system
/// step through `fs`. Refuses, before writing anything in place, when a parameter or an optimizer
/// moment holds a NaN or an infinity; the error names the tensor.
pub fn save(
    dir: &Path,
    params: &Params,
    opt: &AdamW,
    cfg: &Config,
    tok: &Tokenizer,
    state: &TrainerState,
    fs: &FsSteps,
) -> Result<()> {
    // A bare relative name (`ck`, `ck/`) has the parent "", which cannot be opened to sync it.
    let parent = match dir.parent().context("checkpoint dir has no parent")? {
        p if p.as_os_str().is_empty() => Path::new("."),
        p => p,
    };
    let name = dir.file_name().context("checkpoint dir has no name")?.to_string_lossy().to_string();
    let named = params.named();
    if let Some(bad) = first_non_finite(named.iter().map(|(n, v)| (n.as_str(), v.as_tensor())))? {
        bail!(
            "not saving checkpoint {}: parameter {bad} holds NaN or infinity after step {} (training \
             diverged); the checkpoints already saved are kept",
            dir.display(),
            state.step
        );
    }
    fs.create_dir_all(parent)?;
    let tmp = parent.join(format!(".tmp-{name}-{}", std::process::id()));
    fs.remove_tree(&tmp)?;
    fs.create_dir(&tmp)?;
    fs.write_with(&tmp.join(MODEL_FILE), |p| save_weights(p, params))?;
    fs.write_with(&tmp.join(OPTIMIZER_FILE), |p| opt.save(p).and_then(|()| as_if_created(p)))?;
    if let Some(bad) = first_non_finite_in_file(&tmp.join(OPTIMIZER_FILE))? {
        let _ = std::fs::remove_dir_all(&tmp);
        bail!(
            "not saving checkpoint {}: optimizer state {bad} holds NaN or infinity after step {} (training \
             diverged); the checkpoints already saved are kept",
            dir.display(),
            state.step
        );
    }
    let write = |p: &Path, text: String| std::fs::write(p, text).with_context(|| format!("writing {}", p.display()));
    fs.write_with(&tmp.join(CONFIG_FILE), |p| write(p, cfg.to_json()?))?;
    fs.write_with(&tmp.join(TOKENIZER_FILE), |p| tok.save(p))?;
    fs.write_with(&tmp.join(STATE_FILE), |p| write(p, serde_json::to_string_pretty(state)?))?;
    // Sync the files before the rename makes them the checkpoint.
    for f in [MODEL_FILE, OPTIMIZER_FILE, CONFIG_FILE, TOKENIZER_FILE, STATE_FILE] {
        fs.sync(&tmp.join(f))?;
    }
    fs.sync(&tmp)?;
    if dir.exists() {
        // Between these two renames `dir` is missing and `.old-NAME-PID` is the complete previous
        // checkpoint: loading falls back to it and `run_dir::recover` renames it back.
        let old = parent.join(format!(".old-{name}-{}", std::process::id()));
        fs.remove_tree(&old)?;
        fs.rename(dir, &old)?;
        fs.rename(&tmp, dir)?;
        fs.sync(parent)?;
        run_dir::trash(&old, fs)?;
    } else {
        fs.rename(&tmp, dir)?;
    }
    fs.sync(parent)
}

pub fn save_weights(path: &Path, params: &Params) -> Result<()> {
    let map: std::collections::HashMap<String, candle_core::Tensor> =
        params.named().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
    candle_core::safetensors::save(&map, path).with_context(|| format!("writing {}", path.display()))?;
    as_if_created(path)
}

/// Loads weights into `params`: every parameter must be present with its shape, and the file must
/// hold nothing else. Errors name the tensor and both shapes.
pub fn load_weights(path: &Path, params: &Params) -> Result<()> {
    let dev = params.named().first().map(|(_, v)| v.device().clone()).unwrap_or(candle_core::Device::Cpu);
    check_readable(path, "checkpoint weights")?;
    let map = candle_core::safetensors::load(path, &dev).with_context(|| {
        format!("checkpoint weights {} are unreadable (truncated or not safetensors)", path.display())
    })?;
    let named = params.named();
    for (name, var) in &named {
        let t = map.get(name).with_context(|| {
            format!("{}: missing tensor {name} (model expects shape {:?})", path.display(), var.shape())
        })?;
        if t.shape() != var.shape() {
            bail!(
                "{}: tensor {name} has shape {:?} in the checkpoint but the model expects {:?}",
                path.display(),
                t.dims(),
                var.dims()
            );
        }
        if first_non_finite([(name.as_str(), t)])?.is_some() {
            bail!(
                "{}: tensor {name} holds NaN or infinity (saved after training diverged): this checkpoint \
                 cannot be evaluated, sampled from or resumed; use an earlier one",
                path.display()
            );
        }
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    if let Some(extra) = map.keys().find(|k| !named.iter().any(|(n, _)| n == *k)) {
        bail!("{}: tensor {extra} is not a parameter of this model (config mismatch?)", path.display());
    }
    Ok(())
}

/// A checkpoint's config, tokenizer and trainer state (weights are loaded into a built model).
pub struct Loaded {
    pub dir: PathBuf,
    pub cfg: Config,
    pub tokenizer: Tokenizer,
    pub state: TrainerState,
}

pub fn tokenizer_kind(cfg: &Config) -> TokenizerKind {
    match cfg.data.tokenizer {
        TokenizerType::Bpe => TokenizerKind::Bpe { vocab_size: cfg.data.bpe_vocab_size },
        TokenizerType::Char => TokenizerKind::Char,
        TokenizerType::Hf => TokenizerKind::Hf,
    }
}

/// Resolves `path` to a checkpoint directory: itself if it holds `model.safetensors`, else the
/// newest `ckpt-*` inside it (a run directory). A checkpoint caught mid-replacement (`best` renamed
/// to `.old-best-PID` by a save that was killed before the new one arrived) is found under that name.
pub fn resolve_dir(path: &Path) -> Result<PathBuf> {
    if path.join(MODEL_FILE).exists() {
        return Ok(path.to_path_buf());
    }
    if !path.exists() {
        if let Some(aside) = run_dir::renamed_aside(path).filter(|p| p.join(MODEL_FILE).exists()) {
            return Ok(aside);
        }
        bail!("checkpoint {} does not exist", path.display());
    }
    if !path.is_dir() {
        bail!("checkpoint {} is not a directory", path.display());
    }
    run_dir::checkpoints(path)?
        .pop()
        .map(|(_, p)| p)
        .with_context(|| format!("{} holds no checkpoint (no {MODEL_FILE}, no ckpt-* dir)", path.display()))
}

/// Refuses optimizer state with a NaN or an infinity (before a resume loads it).
pub fn check_optimizer_finite(path: &Path) -> Result<()> {
    if let Some(bad) = first_non_finite_in_file(path)? {
        bail!(
            "{}: optimizer state {bad} holds NaN or infinity (saved after training diverged): this \
             checkpoint cannot be resumed; use an earlier one",
            path.display()
        );
    }
    Ok(())
}

/// Reads config, tokenizer and state of the checkpoint at (or newest under) `path`.
pub fn load(path: &Path) -> Result<Loaded> {
    let dir = resolve_dir(path)?;
    let read = |f: &str| -> Result<String> {
        check_readable(&dir.join(f), "checkpoint file")?;
        std::fs::read_to_string(dir.join(f)).with_context(|| format!("checkpoint {}: cannot read {f}", dir.display()))
    };
    let cfg = Config::from_json(&read(CONFIG_FILE)?, &dir.join(CONFIG_FILE).display().to_string())?;
    let state: TrainerState = serde_json::from_str(&read(STATE_FILE)?)
        .with_context(|| format!("checkpoint {}: {STATE_FILE} is malformed", dir.display()))?;
    let tokenizer = Tokenizer::load(&dir.join(TOKENIZER_FILE), &tokenizer_kind(&cfg))?;
    // A padded vocabulary (an imported model's) has rows no token uses.
    if tokenizer.vocab_size() > cfg.model.vocab_size {
        bail!(
            "checkpoint {}: tokenizer has {} tokens, more than config model.vocab_size = {}",
            dir.display(),
            tokenizer.vocab_size(),
            cfg.model.vocab_size
        );
    }
    Ok(Loaded { dir, cfg, tokenizer, state })
}
