//! The run configuration: one typed, documented set of knobs (nanoGPT's lesson), read from TOML,
//! overridden by `--set key=value`, validated, and saved resolved into every checkpoint.
//!
//! Resolution order: built-in defaults <- config file <- `--set` overrides. Every key in a file or an
//! override must exist in the defaults and keep its type (an integer is accepted for a float);
//! otherwise the error names the key.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

mod kinds;
mod validate;

pub use kinds::{
    Activation, BadValue, DeviceKind, EvalMode, NormKind, Positions, RouterImpl, RouterInput, RouterKind,
    TokenizerType, EXPERT_CHOICE_REFUSAL,
};

/// The default config, configs/shakespeare-char-cpu.toml, built in: `gumbel-moe train` without
/// `--config` trains it.
pub const DEFAULT_CONFIG: &str = include_str!("../../configs/shakespeare-char-cpu.toml");
/// Its name (runs go to `runs/<name>`), and how errors refer to it.
pub const DEFAULT_CONFIG_NAME: &str = "shakespeare-char-cpu";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Seeds parameter init, batches, Gumbel noise, dropout and sampling (all Philox streams).
    pub seed: u64,
    pub model: ModelConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// 0: taken from the tokenizer.
    pub vocab_size: usize,
    /// Context length (nanoGPT's block_size).
    pub block_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub dropout: f64,
    /// Biases in Linear layers and LayerNorms, like GPT-2.
    pub bias: bool,
    /// "learned" (nanoGPT's absolute position table) or "rotary" (RoPE on q and k).
    pub positions: Positions,
    pub rope_theta: f64,
    /// "layer" (LayerNorm) or "rms" (RMSNorm).
    pub norm: NormKind,
    /// The layers as fused ops (`ops::{linear, norm, gelu, causal_attention, expert_mlp}`: one op each way,
    /// CPU kernels) rather than their plain-tensor twins; same math, same parameters.
    pub fused_layers: bool,
    /// MoE feed-forward in every n-th block (1 = every block); other blocks get a dense MLP.
    /// 0 = no MoE at all: the dense twin of the same active compute.
    pub moe_every: usize,
    /// Key/value heads of attention (grouped-query attention): query head h reads kv head
    /// h / (n_head / n_kv_head). 0 = n_head (multi-head attention).
    #[serde(default)]
    pub n_kv_head: usize,
    /// The LM head is the token embedding (GPT-2); false: its own `lm_head.weight` (V, C).
    #[serde(default = "default_true")]
    pub tie_embeddings: bool,
    /// Epsilon of every LayerNorm / RMSNorm.
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    pub moe: MoeConfig,
    pub router: RouterConfig,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MoeConfig {
    pub num_experts: usize,
    /// Hidden width of each expert; 0 = 4 x n_embd (nanoGPT's MLP).
    pub expert_hidden: usize,
    /// "gelu" (GPT-2 MLP) or "swiglu".
    pub activation: Activation,
    /// Expert capacity = ceil(capacity_factor * tokens * m / E); 0 = dropless.
    pub capacity_factor: f64,
    /// Switch load-balance loss coefficient (E * sum f_i P_i).
    pub balance_coef: f64,
    /// ST-MoE router z-loss coefficient (mean logsumexp^2).
    pub z_coef: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    /// "gumbel", "softmax_topk", "dense", "noisy_topk", "sigmoid_bias", "hash" or "reinforce"
    /// (src/moe/routers). "expert_choice" is refused: it looks at future tokens (not causal).
    pub kind: RouterKind,
    /// Experts used per token (m).
    pub top_m: usize,
    /// Gumbel: keep the K best logits as candidates before adding noise (K <= E, K >= m).
    pub prefilter: usize,
    /// Gumbel: straight-through hard routing (discrete forward, softmax gradient backward).
    pub hard: bool,
    /// Temperature schedule tau = max(tau_min, tau0 * exp(-tau_decay * step)).
    pub tau0: f64,
    pub tau_min: f64,
    pub tau_decay: f64,
    /// Gumbel at eval/generation: "argmax" (no noise) or "sample" (noise, as in training).
    pub eval_mode: EvalMode,
    /// "fused" (the router as custom ops with CPU/CUDA/Metal kernels, src/ops) or "reference"
    /// (plain tensor ops, the twin the tests compare against). Same numbers on the CPU.
    #[serde(rename = "impl")]
    pub implementation: RouterImpl,
    /// Std of the router weight init (nanoGPT's 0.02 by default).
    pub init_std: f64,
    /// Learning-rate multiplier for the router weights (AdamW's update size is ~lr whatever the
    /// gradient scale, so this is how fast the router can sharpen).
    pub lr_scale: f64,
    /// Weight-decay multiplier for the router weights (0 exempts them): decay pulls router logits
    /// toward 0, which keeps a Gumbel router's sampling close to uniform.
    pub decay_scale: f64,
    /// What the router's logits are computed from (every learned router). "hidden": the hidden state, x W (the
    /// usual router). "token": a learned table of E logits per input token id (V, E), looked up
    /// by the token ids: context-free routing, a learned version of hash routing.
    pub input: RouterInput,
    /// noisy_topk: std of the init of the noise projection W_noise (the noise std per expert is
    /// softplus(x W_noise) + 0.01). 0 is Shazeer et al.'s zero init: every expert starts with noise
    /// std softplus(0) + 0.01 = ln 2 + 0.01 and the router learns how much noise to keep.
    pub noise_init_std: f64,
    /// noisy_topk: coefficient of Shazeer's load loss CV(load)^2, load_i = sum_x P(x, i) the smooth
    /// (normal-CDF) estimate of the tokens expert i gets. 0.01, the order of the paper's w_load.
    pub load_coef: f64,
    /// noisy_topk: coefficient of Shazeer's importance loss CV(sum_x gates(x))^2.
    pub importance_coef: f64,
    /// sigmoid_bias: fixed step of the selection-only expert bias after each training call,
    /// b_i += rate * sign(mean load - load_i) (DeepSeek-V3's gamma = 0.001).
    pub bias_update_rate: f64,
    /// reinforce: decay of the moving-average loss baseline b <- decay b + (1 - decay) mean(L)
    /// that `model::router_surrogate` subtracts from the per-token loss (variance reduction).
    pub reinforce_baseline_decay: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// A local text file, or hf://OWNER/NAME/FILE (a dataset repo on the Hugging Face hub). A
    /// relative path is looked up in the current directory, then in the crate folder
    /// (`data::source::resolve_local`); the default is the repo's Tiny Shakespeare.
    pub source: String,
    /// "char", "bpe" (byte-level BPE trained on the training split) or "hf" (the tokenizer.json of an
    /// imported model, never trained).
    pub tokenizer: TokenizerType,
    pub bpe_vocab_size: usize,
    /// Share of the characters used for training; the rest is validation (nanoGPT: 0.9).
    pub train_fraction: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub batch_size: usize,
    /// Micro-batches per optimizer step (gradient accumulation).
    pub grad_accum: usize,
    pub max_iters: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_iters: usize,
    pub lr_decay_iters: usize,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global-norm gradient clipping; 0 = off.
    pub grad_clip: f64,
    pub eval_interval: usize,
    pub eval_iters: usize,
    pub log_interval: usize,
    /// Checkpoint every N steps (and at the end); 0 = only at the end.
    pub ckpt_interval: usize,
    /// How many periodic checkpoints to keep (the best by validation loss is kept apart).
    pub keep_last: usize,
    /// Final validation loss over the whole validation split (true) or eval_iters batches (false).
    pub final_full_eval: bool,
    /// "cpu", "cuda", "cuda:N" or "metal".
    pub device: DeviceKind,
    /// CUDA only: f32 matmuls in TF32 on tensor cores (cuBLAS, through Candle's
    /// `set_gemm_reduced_precision_f32`), as nanoGPT's `allow_tf32 = True`. Off by default (full
    /// f32, PyTorch's default); no effect on the CPU or Metal.
    pub tf32: bool,
    /// Telemetry: an expert is "dead" when it got no tokens in the last this-many steps.
    pub dead_expert_window: usize,
    /// CPU threads that run a step's micro-batches (`grad_accum`) side by side, each
    /// single-threaded inside; gradients are summed in micro-batch order, so the result does not
    /// depend on this number. 0 = one per core, at most `grad_accum`. See `train::parallel`.
    pub threads: usize,
    /// Expert parallel: each MoE layer's experts split over groups of this many ranks (1 = off);
    /// it must divide the number of ranks and of experts. See `moe::expert_parallel`.
    #[serde(default = "default_one")]
    pub expert_parallel: usize,
}

fn default_one() -> usize {
    1
}

fn default_true() -> bool {
    true
}

fn default_norm_eps() -> f64 {
    1e-5
}

impl Default for Config {
    fn default() -> Self {
        Config {
            seed: 1337,
            model: ModelConfig {
                vocab_size: 0,
                block_size: 64,
                n_layer: 4,
                n_head: 4,
                n_embd: 128,
                dropout: 0.0,
                bias: true,
                positions: Positions::Learned,
                rope_theta: 10000.0,
                norm: NormKind::Layer,
                fused_layers: true,
                moe_every: 1,
                n_kv_head: 0,
                tie_embeddings: true,
                norm_eps: default_norm_eps(),
                moe: MoeConfig {
                    num_experts: 8,
                    expert_hidden: 0,
                    activation: Activation::Gelu,
                    capacity_factor: 0.0,
                    balance_coef: 0.01,
                    z_coef: 0.001,
                },
                router: RouterConfig {
                    kind: RouterKind::Gumbel,
                    top_m: 1,
                    prefilter: 4,
                    hard: true,
                    tau0: 1.0,
                    tau_min: 0.5,
                    tau_decay: 1e-3,
                    eval_mode: EvalMode::Argmax,
                    implementation: RouterImpl::Fused,
                    init_std: 0.02,
                    lr_scale: 1.0,
                    decay_scale: 1.0,
                    input: RouterInput::Hidden,
                    noise_init_std: 0.0,
                    load_coef: 0.01,
                    importance_coef: 0.01,
                    bias_update_rate: 1e-3,
                    reinforce_baseline_decay: 0.99,
                },
            },
            data: DataConfig {
                source: "data/tinyshakespeare.txt".into(),
                tokenizer: TokenizerType::Char,
                bpe_vocab_size: 1024,
                train_fraction: 0.9,
            },
            train: TrainConfig {
                batch_size: 12,
                grad_accum: 1,
                max_iters: 2000,
                lr: 1e-3,
                min_lr: 1e-4,
                warmup_iters: 100,
                lr_decay_iters: 2000,
                weight_decay: 0.1,
                beta1: 0.9,
                beta2: 0.99,
                eps: 1e-8,
                grad_clip: 1.0,
                eval_interval: 250,
                eval_iters: 20,
                log_interval: 10,
                ckpt_interval: 500,
                keep_last: 2,
                final_full_eval: true,
                device: DeviceKind::Cpu,
                tf32: false,
                dead_expert_window: 100,
                threads: 0,
                expert_parallel: 1,
            },
        }
    }
}

fn type_name(v: &toml::Value) -> &'static str {
    v.type_str()
}

/// Merges `src` into `dst` (both tables). Keys must exist in `dst` with the same type.
fn merge(dst: &mut toml::Table, src: &toml::Table, prefix: &str, origin: &str) -> Result<()> {
    for (k, v) in src {
        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        let Some(slot) = dst.get_mut(k) else {
            bail!("{origin}: unknown config key `{key}`");
        };
        match (slot, v) {
            (toml::Value::Table(d), toml::Value::Table(s)) => merge(d, s, &key, origin)?,
            (slot @ toml::Value::Float(_), toml::Value::Integer(i)) => *slot = toml::Value::Float(*i as f64),
            (slot, v) if std::mem::discriminant(slot) == std::mem::discriminant(v) => {
                if matches!(v, toml::Value::Table(_)) {
                    unreachable!()
                }
                *slot = v.clone()
            }
            (slot, v) => {
                bail!("{origin}: config key `{key}` expects a {}, got a {} ({v})", type_name(slot), type_name(v))
            }
        }
    }
    Ok(())
}

/// Parses one `key=value` override into a nested table. The value is read as a TOML value;
/// a bare word that is not valid TOML (e.g. `gumbel`) is taken as a string.
fn parse_override(s: &str) -> Result<toml::Table> {
    let Some((key, raw)) = s.split_once('=') else {
        bail!("override `{s}` is not of the form key=value");
    };
    let key = key.trim();
    if key.is_empty() || key.split('.').any(|p| p.is_empty()) {
        bail!("override `{s}` has an empty key part");
    }
    let raw = raw.trim();
    let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").expect("parsed key"),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let mut table = toml::Table::new();
    let parts: Vec<&str> = key.split('.').collect();
    let mut cur = &mut table;
    for p in &parts[..parts.len() - 1] {
        cur = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .expect("fresh table");
    }
    cur.insert(parts[parts.len() - 1].to_string(), value);
    Ok(table)
}

/// The merged tree as a `Config` (types and names; `validate` comes after).
fn schema(tree: &toml::Table) -> std::result::Result<Config, toml::de::Error> {
    toml::Value::Table(tree.clone()).try_into()
}

impl Config {
    /// Defaults, then the TOML text (named `origin` in errors), then overrides; then validation.
    pub fn resolve(text: &str, origin: &str, overrides: &[String]) -> Result<Config> {
        let mut tree = toml::Table::try_from(Config::default()).context("serializing defaults")?;
        let file: toml::Table = toml::from_str(text).with_context(|| format!("{origin}: invalid TOML"))?;
        merge(&mut tree, &file, "", origin)?;
        if !overrides.is_empty() {
            // The file alone, then each `--set` in turn: a bad value is blamed on what gave it.
            schema(&tree).with_context(|| format!("{origin}: config does not match the schema"))?;
            for o in overrides {
                merge(&mut tree, &parse_override(o)?, "", &format!("--set {o}"))?;
                if let Err(e) = schema(&tree) {
                    bail!("--set {o}: {}", e.to_string().trim_end());
                }
            }
        }
        let cfg = schema(&tree).with_context(|| format!("{origin}: config does not match the schema"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and resolves a config file.
    pub fn from_file(path: &Path, overrides: &[String]) -> Result<Config> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::resolve(&text, &path.display().to_string(), overrides)
    }

    /// The built-in default config ([`DEFAULT_CONFIG`]) with `overrides`.
    pub fn default_recipe(overrides: &[String]) -> Result<Config> {
        Self::resolve(DEFAULT_CONFIG, &format!("built-in {DEFAULT_CONFIG_NAME}.toml"), overrides)
    }

    /// The resolved config as pretty JSON (saved as config.json in checkpoints).
    pub fn to_json(&self) -> Result<String> {
        Ok(serde_json::to_string_pretty(self)?)
    }

    /// Reads a resolved config (config.json of a checkpoint). Keys added to the crate since the
    /// checkpoint was written take their defaults; unknown keys are still errors.
    pub fn from_json(text: &str, origin: &str) -> Result<Config> {
        let json: serde_json::Value =
            serde_json::from_str(text).with_context(|| format!("{origin}: not valid JSON"))?;
        let file = toml::Table::try_from(json).with_context(|| format!("{origin}: not a gumbel-moe config"))?;
        let mut tree = toml::Table::try_from(Config::default()).context("serializing defaults")?;
        merge(&mut tree, &file, "", origin)?;
        let cfg: Config = toml::Value::Table(tree)
            .try_into()
            .with_context(|| format!("{origin}: config does not match the schema"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Expert hidden width after applying the 0 = 4 x n_embd default.
    pub fn expert_hidden(&self) -> usize {
        match self.model.moe.expert_hidden {
            0 => 4 * self.model.n_embd,
            h => h,
        }
    }

    /// Key/value heads after applying the 0 = n_head default.
    pub fn n_kv_head(&self) -> usize {
        match self.model.n_kv_head {
            0 => self.model.n_head,
            k => k,
        }
    }

    /// Whether block `layer` has an MoE feed-forward.
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        let n = self.model.moe_every;
        n > 0 && (layer + 1).is_multiple_of(n)
    }
}
