//! `gumbel-moe import-hf`: a Mixtral or Qwen2-MoE directory (or hub model) as a checkpoint of ours
//! at step 0 with fresh optimizer state, refusing what our model cannot run exactly (naming the
//! `config.json` key or the tensor).

use super::config::HfConfig;
use super::files::{locate, ModelFiles};
use super::names::{mapping, shared_expert_names, unfuse};
use super::Format;
use crate::config::{Config, EvalMode, RouterKind, TokenizerType};
use crate::data::{HubOptions, Tokenizer, TokenizerKind};
use crate::model::Gpt;
use crate::nn::Params;
use crate::train::checkpoint::{self, TrainerState};
use crate::train::finite::all_finite;
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::FsSteps;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

#[derive(Clone, Debug, Default)]
pub struct ImportOptions {
    /// "softmax_topk" (default) or "gumbel": the gate's weights become the Gumbel router's (soft,
    /// top_m = k, tau fixed at 1: the same routing at eval when the HF weights are renormalised).
    pub router: Option<String>,
    /// `key=value` overrides applied to the imported config (e.g. model.block_size=256).
    pub sets: Vec<String>,
    pub hub: HubOptions,
}

/// What an import made.
#[derive(Clone, Debug)]
pub struct Imported {
    pub cfg: Config,
    pub format: Format,
    /// Whether our eval routing equals transformers' (false only for `--router gumbel` over
    /// weights that are not renormalised).
    pub exact: bool,
}

/// Sets the router keys for `kind`; returns whether eval routing is exact.
fn choose_router(hf: &HfConfig, cfg: &mut Config, kind: &str) -> Result<bool> {
    let (k, renorm) = (hf.top_k(), hf.renormalises());
    let r = &mut cfg.model.router;
    r.top_m = k;
    match kind {
        "softmax_topk" => {
            r.kind = RouterKind::SoftmaxTopk;
            if renorm && k == 1 {
                bail!(
                    "config.json key `num_experts_per_tok` = 1 with renormalised weights (each token's weight is 1): \
                       softmax_topk weighs a single expert by its probability; import with --router gumbel"
                );
            }
            if !renorm && k > 1 {
                bail!("config.json key `norm_topk_prob` = false with num_experts_per_tok = {k}: softmax_topk renormalises \
                       the weights of k > 1 experts");
            }
            Ok(true)
        }
        "gumbel" => {
            r.kind = RouterKind::Gumbel;
            r.hard = false;
            r.prefilter = k.max(hf.experts().min(4));
            r.tau0 = 1.0;
            r.tau_min = 1.0;
            r.tau_decay = 0.0;
            r.eval_mode = EvalMode::Argmax;
            Ok(renorm)
        }
        o => bail!("--router {o}: expected softmax_topk or gumbel"),
    }
}

/// Our char tokenizer when the file is one, else the file as it is (`data.tokenizer = "hf"`).
fn load_tokenizer(path: &Path) -> Result<(Tokenizer, TokenizerType)> {
    match Tokenizer::load(path, &TokenizerKind::Char) {
        Ok(t) => Ok((t, TokenizerType::Char)),
        Err(_) => Ok((Tokenizer::load(path, &TokenizerKind::Hf)?, TokenizerType::Hf)),
    }
}

/// Every tensor of the weight files, unfused to the per-expert names.
fn read_tensors(files: &ModelFiles, f: Format) -> Result<HashMap<String, Tensor>> {
    let mut map = HashMap::new();
    for p in &files.weights {
        let part = candle_core::safetensors::load(p, &Device::Cpu)
            .with_context(|| format!("{}: cannot read {} as safetensors", files.origin, p.display()))?;
        map.extend(part);
    }
    unfuse(map, f)
}

fn all_zero(t: &Tensor) -> Result<bool> {
    Ok(t.to_dtype(DType::F32)?.abs()?.max_all()?.to_scalar::<f32>()? == 0.0)
}

/// Removes the tensors HF has and we do not, refusing those that are not zero: Qwen2-MoE's shared
/// expert and qkv biases, rotary buffers, and a tied model's `lm_head.weight` (transformers
/// ignores it too).
fn drop_extras(map: &mut HashMap<String, Tensor>, cfg: &Config, f: Format) -> Result<()> {
    map.retain(|k, _| !k.ends_with("rotary_emb.inv_freq"));
    if cfg.model.tie_embeddings {
        map.remove("lm_head.weight");
    }
    for i in 0..cfg.model.n_layer {
        for p in ["q_proj", "k_proj", "v_proj"] {
            if let Some(b) = map.remove(&format!("model.layers.{i}.self_attn.{p}.bias")) {
                if !all_zero(&b)? {
                    bail!(
                        "config.json key `qkv_bias`: tensor model.layers.{i}.self_attn.{p}.bias is not zero; this \
                           model has no attention biases"
                    );
                }
            }
        }
        if f == Format::Qwen2Moe && cfg.is_moe_layer(i) {
            let names = shared_expert_names(i);
            let parts: Vec<Option<Tensor>> = names.iter().map(|n| map.remove(n)).collect();
            // Silent when a projection is absent (width 0) or zero: silu(0) = 0.
            let mut silent = false;
            for p in &parts[..3] {
                silent |= p.as_ref().map_or(Ok(true), all_zero)?;
            }
            if !silent {
                bail!(
                    "config.json key `shared_expert_intermediate_size`: the shared expert of block {i} ({}) is not \
                       zero; this model has no shared expert",
                    names[2]
                );
            }
        }
    }
    Ok(())
}

/// Imports `from` (a directory or hf://OWNER/NAME) into a checkpoint at `out` (which must not exist).
pub fn import_hf(from: &str, out: &Path, opts: &ImportOptions) -> Result<Imported> {
    if out.exists() {
        bail!("--out {} already exists: import-hf writes a new checkpoint directory", out.display());
    }
    let files = locate(from, &opts.hub)?;
    let hf = HfConfig::read(&files.config)?;
    let format = hf.format()?;
    let mut cfg = Config::default();
    hf.apply(&mut cfg)?;
    let exact = choose_router(&hf, &mut cfg, opts.router.as_deref().unwrap_or("softmax_topk"))?;
    let (tok, kind) = load_tokenizer(&files.tokenizer)?;
    cfg.data.tokenizer = kind;
    if tok.vocab_size() > hf.vocab_size {
        bail!(
            "{}: tokenizer.json has {} tokens, config.json key `vocab_size` = {}",
            from,
            tok.vocab_size(),
            hf.vocab_size
        );
    }
    let cfg = Config::resolve(&toml::to_string(&cfg)?, &format!("{from} (imported)"), &opts.sets)?;
    if let Some(w) = hf.window().filter(|&w| w < cfg.model.block_size) {
        bail!(
            "config.json key `sliding_window` = {w} is below model.block_size = {}: attention here sees the whole \
               context (lower it with --set model.block_size={w})",
            cfg.model.block_size
        );
    }
    let mut map = read_tensors(&files, format)?;
    drop_extras(&mut map, &cfg, format)?;
    let params = Params::new();
    let _model = Gpt::new(&cfg, params.var_builder(cfg.seed, DType::F32, &Device::Cpu))?;
    let mut set = std::collections::HashSet::new();
    for e in mapping(&cfg, format, !cfg.model.tie_embeddings) {
        let parts =
            e.hf.iter()
                .map(|n| map.remove(n).with_context(|| format!("{from}: missing tensor {n} (for our {})", e.ours)))
                .collect::<Result<Vec<_>>>()?;
        for (n, part) in e.hf.iter().zip(&parts) {
            if !all_finite(part)? {
                bail!(
                    "{from}: the input model's tensor {n} holds NaN or infinity (our {}); nothing was \
                     written: fix or re-download the model",
                    e.ours
                );
            }
        }
        let t = Tensor::cat(&parts, 0)?.to_dtype(DType::F32)?;
        let var = params.get(&e.ours).with_context(|| format!("our model has no tensor {}", e.ours))?;
        if t.dims() != var.dims() {
            bail!(
                "{from}: tensor {} has shape {:?} (as our {}) but the config makes it {:?}",
                e.hf.join(" + "),
                t.dims(),
                e.ours,
                var.dims()
            );
        }
        var.set(&t)?;
        set.insert(e.ours);
    }
    if let Some(extra) = map.keys().min() {
        bail!(
            "{from}: tensor {extra} has no place in a {} model of this config (unsupported feature?)",
            format.model_type()
        );
    }
    if let Some((name, _)) = params.named().into_iter().find(|(n, _)| !set.contains(n)) {
        bail!("{from}: nothing in the HF model sets our tensor {name}");
    }
    let t = &cfg.train;
    let opt = AdamW::new(
        params.named(),
        AdamWConfig { beta1: t.beta1, beta2: t.beta2, eps: t.eps, weight_decay: t.weight_decay },
    )?;
    let state = TrainerState {
        step: 0,
        best_val_loss: None,
        rng_seed: cfg.seed,
        rng_next_step: 0,
        tokens_seen: 0,
        wall_s: 0.0,
        reinforce_baseline: None,
        dataset: None,
    };
    checkpoint::save(out, &params, &opt, &cfg, &tok, &state, &FsSteps::new())?;
    Ok(Imported { cfg, format, exact })
}
