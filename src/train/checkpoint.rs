//! Checkpoints: a directory holding
//! - `model.safetensors`: the weights under the names documented in `model.rs`,
//! - `optimizer.safetensors`: AdamW moments `m.<name>`, `v.<name>` and `step`,
//! - `config.json`: the resolved config, `tokenizer.json`: the tokenizer (Hugging Face format),
//! - `trainer_state.json`: steps done, best validation loss, the RNG position.
//!
//! Written atomically: everything goes into a temporary sibling directory which is then renamed into
//! place, so a kill during a save leaves the previous checkpoint intact.

use super::AdamW;
use crate::config::Config;
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
}

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const CONFIG_FILE: &str = "config.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const STATE_FILE: &str = "trainer_state.json";

/// Writes a checkpoint to `dir` atomically (replacing an older one there).
pub fn save(
    dir: &Path,
    params: &Params,
    opt: &AdamW,
    cfg: &Config,
    tok: &Tokenizer,
    state: &TrainerState,
) -> Result<()> {
    let parent = dir.parent().context("checkpoint dir has no parent")?;
    let name = dir.file_name().context("checkpoint dir has no name")?.to_string_lossy().to_string();
    std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let tmp = parent.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    save_weights(&tmp.join(MODEL_FILE), params)?;
    opt.save(&tmp.join(OPTIMIZER_FILE))?;
    std::fs::write(tmp.join(CONFIG_FILE), cfg.to_json()?)?;
    tok.save(&tmp.join(TOKENIZER_FILE))?;
    std::fs::write(tmp.join(STATE_FILE), serde_json::to_string_pretty(state)?)?;
    // Sync the files before the rename makes them the checkpoint.
    for f in [MODEL_FILE, OPTIMIZER_FILE, CONFIG_FILE, TOKENIZER_FILE, STATE_FILE] {
        std::fs::File::open(tmp.join(f))?.sync_all()?;
    }
    if dir.exists() {
        let old = parent.join(format!(".old-{name}-{}", std::process::id()));
        std::fs::rename(dir, &old)?;
        std::fs::rename(&tmp, dir)?;
        std::fs::remove_dir_all(&old)?;
    } else {
        std::fs::rename(&tmp, dir).with_context(|| format!("cannot move checkpoint into {}", dir.display()))?;
    }
    Ok(())
}

pub fn save_weights(path: &Path, params: &Params) -> Result<()> {
    let map: std::collections::HashMap<String, candle_core::Tensor> =
        params.named().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
    candle_core::safetensors::save(&map, path).with_context(|| format!("writing {}", path.display()))
}

/// Loads weights into `params`: every parameter must be present with its shape, and the file must
/// hold nothing else. Errors name the tensor and both shapes.
pub fn load_weights(path: &Path, params: &Params) -> Result<()> {
    let dev = params.named().first().map(|(_, v)| v.device().clone()).unwrap_or(candle_core::Device::Cpu);
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
    match cfg.data.tokenizer.as_str() {
        "bpe" => TokenizerKind::Bpe { vocab_size: cfg.data.bpe_vocab_size },
        _ => TokenizerKind::Char,
    }
}

/// Resolves `path` to a checkpoint directory: itself if it holds `model.safetensors`, else the
/// newest `ckpt-*` inside it (a run directory).
pub fn resolve_dir(path: &Path) -> Result<PathBuf> {
    if path.join(MODEL_FILE).exists() {
        return Ok(path.to_path_buf());
    }
    if !path.is_dir() {
        bail!("checkpoint {} does not exist", path.display());
    }
    let mut ckpts: Vec<PathBuf> = std::fs::read_dir(path)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("ckpt-")) && p.join(MODEL_FILE).exists()
        })
        .collect();
    ckpts.sort();
    ckpts.pop().with_context(|| format!("{} holds no checkpoint (no {MODEL_FILE}, no ckpt-* dir)", path.display()))
}

/// Reads config, tokenizer and state of the checkpoint at (or newest under) `path`.
pub fn load(path: &Path) -> Result<Loaded> {
    let dir = resolve_dir(path)?;
    let read = |f: &str| -> Result<String> {
        std::fs::read_to_string(dir.join(f)).with_context(|| format!("checkpoint {}: cannot read {f}", dir.display()))
    };
    let cfg = Config::from_json(&read(CONFIG_FILE)?, &dir.join(CONFIG_FILE).display().to_string())?;
    let state: TrainerState = serde_json::from_str(&read(STATE_FILE)?)
        .with_context(|| format!("checkpoint {}: {STATE_FILE} is malformed", dir.display()))?;
    let tokenizer = Tokenizer::load(&dir.join(TOKENIZER_FILE), &tokenizer_kind(&cfg))?;
    if tokenizer.vocab_size() != cfg.model.vocab_size {
        bail!(
            "checkpoint {}: tokenizer has {} tokens but config model.vocab_size = {}",
            dir.display(),
            tokenizer.vocab_size(),
            cfg.model.vocab_size
        );
    }
    Ok(Loaded { dir, cfg, tokenizer, state })
}
