//! `gumbel-moe export-hf`: a checkpoint of ours as a transformers model directory (config.json,
//! model.safetensors with `{"format": "pt"}` metadata, tokenizer.json, tokenizer_config.json) that
//! gives the same logits at eval. What a format cannot express exactly is refused, naming the key.

use super::config::export_json;
use super::names::{mapping, shared_expert_names};
use super::out_dir::{check_out, remove_stale_logits};
use super::Format;
use crate::config::{Activation, Config, EvalMode, NormKind, Positions, RouterInput, RouterKind};
use crate::generate::{generate_ids, SampleConfig};
use crate::model::Gpt;
use crate::nn::{Ctx, Params};
use crate::train::checkpoint;
use crate::train::schedule::tau_at;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The file `--with-logits` writes: input_ids (2, T) i64, logits (2, T, V) f32 (ours), prompt_ids
/// (1, P) i64 and greedy_ids (1, P + N) i64 (our greedy decoding).
pub const LOGITS_FILE: &str = "gumbel_moe_logits.safetensors";

#[derive(Clone, Debug, Default)]
pub struct ExportOptions {
    /// None: Mixtral when it can express the model, else Qwen2-MoE.
    pub format: Option<Format>,
    /// A tied model: write `tie_word_embeddings: true` and no `lm_head.weight` (default: a copy).
    pub tied: bool,
    /// Also write [`LOGITS_FILE`].
    pub with_logits: bool,
    /// Write into a folder that already holds files (replacing the export's own; never into a
    /// checkpoint or a run, see [`super::out_dir`]).
    pub overwrite: bool,
}

/// How a checkpoint's routing is written.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub format: Format,
    /// num_experts_per_tok.
    pub k: usize,
    /// Whether the k weights are renormalised (always in Mixtral; Qwen2-MoE's norm_topk_prob).
    pub renorm: bool,
    /// Factor on the router weights (1 / tau for the soft Gumbel router).
    pub gate_scale: f64,
}

fn refuse(key: &str, value: impl std::fmt::Debug, why: &str) -> anyhow::Error {
    anyhow::anyhow!("cannot export: config key `{key}` = {value:?}: {why}")
}

/// What routing at eval in `cfg` (after `step` optimizer steps) is in HF terms, and the format.
pub fn plan(cfg: &Config, want: Option<Format>, step: u64) -> Result<Plan> {
    let m = &cfg.model;
    let r = &m.router;
    if m.norm != NormKind::Rms {
        return Err(refuse("model.norm", m.norm, "Mixtral and Qwen2-MoE use RMSNorm (\"rms\")"));
    }
    if m.bias {
        return Err(refuse("model.bias", m.bias, "Mixtral and Qwen2-MoE have no biases"));
    }
    if m.positions != Positions::Rotary {
        return Err(refuse("model.positions", m.positions, "Mixtral and Qwen2-MoE use rotary positions"));
    }
    if m.moe.activation != Activation::Swiglu {
        return Err(refuse("model.moe.activation", m.moe.activation, "HF experts are SwiGLU (silu)"));
    }
    if m.moe_every == 0 {
        return Err(refuse("model.moe_every", m.moe_every, "a model without MoE blocks is not an MoE"));
    }
    if m.moe.capacity_factor > 0.0 {
        return Err(refuse("model.moe.capacity_factor", m.moe.capacity_factor, "HF MoEs are dropless (0)"));
    }
    if r.input != RouterInput::Hidden {
        return Err(refuse("model.router.input", r.input, "HF routers read the hidden state"));
    }
    let (k, renorm, gate_scale) = match r.kind {
        // m = 1 weighs by the probability (Switch): Qwen2-MoE with norm_topk_prob = false.
        RouterKind::SoftmaxTopk => (r.top_m, r.top_m > 1, 1.0),
        RouterKind::Gumbel if r.eval_mode != EvalMode::Argmax => {
            return Err(refuse("model.router.eval_mode", r.eval_mode, "sampled routing at eval is not a function"))
        }
        RouterKind::Gumbel if r.hard && r.top_m > 1 => {
            return Err(refuse(
                "model.router.hard",
                r.hard,
                "hard top-m > 1 weighs each expert 1/m, HF by its renormalised probability",
            ))
        }
        RouterKind::Gumbel if r.hard => (1, true, 1.0),
        // Soft: softmax(logits / tau) renormalised over the top m, i.e. HF's with the gate / tau.
        RouterKind::Gumbel => (r.top_m, true, 1.0 / tau_at(r, step as usize)),
        RouterKind::Dense => (m.moe.num_experts, true, 1.0),
        RouterKind::NoisyTopk => (r.top_m, true, 1.0),
        RouterKind::Reinforce => (1, true, 1.0),
        k => return Err(refuse("model.router.kind", k, "its routing is not a softmax top-k of x W")),
    };
    let format = match want {
        Some(Format::Mixtral) if m.moe_every != 1 => {
            return Err(refuse(
                "model.moe_every",
                m.moe_every,
                "Mixtral has an MoE in every block; use --format qwen2-moe",
            ))
        }
        Some(Format::Mixtral) if !renorm => return Err(refuse(
            "model.router.top_m",
            r.top_m,
            "softmax_topk with top_m = 1 weighs by the probability, Mixtral renormalises to 1; use --format qwen2-moe",
        )),
        Some(f) => f,
        None if m.moe_every == 1 && renorm => Format::Mixtral,
        None => Format::Qwen2Moe,
    };
    Ok(Plan { format, k, renorm, gate_scale })
}

/// Splits our weights into the HF tensors of `plan`: (name, tensor) sorted by name.
pub fn hf_tensors(
    cfg: &Config,
    named: &HashMap<String, Tensor>,
    plan: &Plan,
    lm_head: bool,
) -> Result<Vec<(String, Tensor)>> {
    let c = cfg.model.n_embd;
    let kv = cfg.n_kv_head() * (c / cfg.model.n_head);
    let mut out = Vec::new();
    for e in mapping(cfg, plan.format, lm_head) {
        let src = if e.ours == "lm_head.weight" && cfg.model.tie_embeddings { "wte.weight" } else { e.ours.as_str() };
        let t = named.get(src).with_context(|| format!("the checkpoint has no tensor {src}"))?;
        if e.hf.len() == 3 {
            for (name, (start, len)) in e.hf.iter().zip([(0, c), (c, kv), (c + kv, kv)]) {
                out.push((name.clone(), t.narrow(0, start, len)?.contiguous()?));
                // q (C, C), k, v (kv, C)
            }
        } else if e.ours.ends_with(".moe.router.weight") && plan.gate_scale != 1.0 {
            out.push((e.hf[0].clone(), (t * plan.gate_scale)?));
        } else {
            out.push((e.hf[0].clone(), t.clone()));
        }
    }
    if plan.format == Format::Qwen2Moe {
        for i in (0..cfg.model.n_layer).filter(|&i| cfg.is_moe_layer(i)) {
            let [g, u, d, sg] = shared_expert_names(i);
            for (name, shape) in [(g, (1, c)), (u, (1, c)), (d, (c, 1)), (sg, (1, c))] {
                out.push((name, Tensor::zeros(shape, DType::F32, &Device::Cpu)?));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Writes f32 / i64 tensors with `{"format": "pt"}` metadata (what transformers writes).
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let mut bytes = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let (dtype, data): (safetensors::Dtype, Vec<u8>) = match t.dtype() {
            DType::F32 => (
                safetensors::Dtype::F32,
                t.flatten_all()?.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            DType::I64 => (
                safetensors::Dtype::I64,
                t.flatten_all()?.to_vec1::<i64>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            d => bail!("tensor {name}: cannot write dtype {d:?}"),
        };
        bytes.push((name.clone(), dtype, t.dims().to_vec(), data));
    }
    let views = bytes
        .iter()
        .map(|(n, d, s, b)| Ok((n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b)?)))
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path).with_context(|| format!("writing {}", path.display()))
}

/// Builds the model of a checkpoint on the CPU with its weights.
pub fn load_model(dir: &Path, cfg: &Config) -> Result<(Params, Gpt)> {
    let params = Params::new();
    let model = Gpt::new(cfg, params.var_builder(cfg.seed, DType::F32, &Device::Cpu))?;
    checkpoint::load_weights(&dir.join(checkpoint::MODEL_FILE), &params)?;
    Ok((params, model))
}

/// Exports the checkpoint at (or newest under) `ckpt` into `out`; returns the plan it followed.
pub fn export_hf(ckpt: &Path, out: &Path, opts: &ExportOptions) -> Result<Plan> {
    check_out(out, opts.overwrite)?;
    let loaded = checkpoint::load(ckpt)?;
    let cfg = &loaded.cfg;
    if opts.tied && !cfg.model.tie_embeddings {
        bail!(
            "--tied: the checkpoint's model is untied (model.tie_embeddings = false): its lm_head.weight is not \
             the embedding, so a tied export would change its logits; export without --tied"
        );
    }
    let plan = plan(cfg, opts.format, loaded.state.step)?;
    let (params, model) = load_model(&loaded.dir, cfg)?;
    let named: HashMap<String, Tensor> = params.named().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
    let omit_head = cfg.model.tie_embeddings && opts.tied;
    let tensors = hf_tensors(cfg, &named, &plan, !omit_head)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let write = |f: &str, text: String| -> Result<PathBuf> {
        let p = out.join(f);
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
        Ok(p)
    };
    write_safetensors(&out.join("model.safetensors"), &tensors)?;
    let json = export_json(cfg, plan.format, plan.k, plan.renorm, omit_head);
    write("config.json", serde_json::to_string_pretty(&json)?)?;
    loaded.tokenizer.save(&out.join("tokenizer.json"))?;
    let tc = serde_json::json!({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.model.block_size,
        "clean_up_tokenization_spaces": false});
    write("tokenizer_config.json", serde_json::to_string_pretty(&tc)?)?;
    if !opts.with_logits {
        remove_stale_logits(out)?;
    }
    if opts.with_logits {
        let ctx = Ctx::eval(cfg.seed, tau_at(&cfg.model.router, loaded.state.step as usize));
        write_logits(&out.join(LOGITS_FILE), &model, loaded.tokenizer.vocab_size(), ctx)?;
    }
    Ok(plan)
}

/// Our logits for fixed ids and our greedy decoding of a fixed prompt, for scripts/check_hf_export.py.
fn write_logits(path: &Path, model: &Gpt, vocab: usize, ctx: Ctx) -> Result<()> {
    let bs = model.block_size();
    let t = bs.min(32);
    // Fixed ids below the tokenizer's vocabulary (a multiplicative sequence).
    let ids: Vec<u32> = (0..2 * t as u64).map(|i| ((i * 2654435761 + 17) % vocab as u64) as u32).collect();
    let x = Tensor::from_slice(&ids, (2, t), &Device::Cpu)?;
    let logits = model.forward(&x, &ctx)?.logits; // (2, T, V)
    let p = bs.min(8);
    let s = SampleConfig { max_new_tokens: (bs - p).min(24), temperature: 0.0, top_k: 0, seed: 0 };
    let greedy = generate_ids(model, &ids[..p], &s, &Device::Cpu, ctx)?;
    let i64s = |v: &[u32], shape: (usize, usize)| {
        Tensor::from_vec(v.iter().map(|&i| i as i64).collect::<Vec<_>>(), shape, &Device::Cpu)
    };
    write_safetensors(
        path,
        &[
            ("input_ids".into(), i64s(&ids, (2, t))?),
            ("logits".into(), logits.to_dtype(DType::F32)?),
            ("prompt_ids".into(), i64s(&ids[..p], (1, p))?),
            ("greedy_ids".into(), i64s(&greedy, (1, greedy.len()))?),
        ],
    )
}
