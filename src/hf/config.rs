//! The `config.json` of a MixtralForCausalLM / Qwen2MoeForCausalLM: the fields import reads (with
//! transformers' defaults where a field is absent) and the keys export writes. Every refusal names
//! the key.

use super::Format;
use crate::config::{Activation, Config, NormKind, Positions, RouterInput};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::Path;

/// The fields we read; others are ignored.
#[derive(Clone, Debug, Deserialize)]
pub struct HfConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub hidden_act: Option<String>,
    pub max_position_embeddings: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    pub rope_parameters: Option<Value>,
    pub rope_scaling: Option<Value>,
    pub sliding_window: Option<usize>,
    pub use_sliding_window: Option<bool>,
    pub tie_word_embeddings: Option<bool>,
    /// Mixtral.
    pub num_local_experts: Option<usize>,
    /// Qwen2-MoE.
    pub num_experts: Option<usize>,
    pub num_experts_per_tok: Option<usize>,
    pub decoder_sparse_step: Option<usize>,
    pub mlp_only_layers: Option<Vec<usize>>,
    pub moe_intermediate_size: Option<usize>,
    pub norm_topk_prob: Option<bool>,
    pub router_aux_loss_coef: Option<f64>,
}

impl HfConfig {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{}: not a Mixtral / Qwen2-MoE config.json", path.display()))
    }

    pub fn format(&self) -> Result<Format> {
        Ok(match self.model_type.as_str() {
            "mixtral" => Format::Mixtral,
            "qwen2_moe" => Format::Qwen2Moe,
            t @ ("qwen3_moe" | "olmoe") => bail!(
                "config.json key `model_type` = \"{t}\": its attention has QK-norm (self_attn.q_norm / k_norm), \
                 which this model does not have"
            ),
            t => bail!("config.json key `model_type` = \"{t}\": only \"mixtral\" and \"qwen2_moe\" can be imported"),
        })
    }

    /// Experts per block (E).
    pub fn experts(&self) -> usize {
        match self.model_type.as_str() {
            "mixtral" => self.num_local_experts.unwrap_or(8),
            _ => self.num_experts.unwrap_or(60),
        }
    }

    /// Experts per token (k).
    pub fn top_k(&self) -> usize {
        self.num_experts_per_tok.unwrap_or(if self.model_type == "mixtral" { 2 } else { 4 })
    }

    /// Whether the k routing weights are renormalised to sum to 1 (Mixtral always).
    pub fn renormalises(&self) -> bool {
        self.model_type == "mixtral" || self.norm_topk_prob.unwrap_or(false)
    }

    /// RoPE theta: `rope_parameters.rope_theta`, else the legacy top-level key, else transformers'
    /// default (1e6 for Mixtral, 1e4 for Qwen2-MoE). Refuses any rope type but "default".
    pub fn rope_theta(&self) -> Result<f64> {
        if let Some(s) = self.rope_scaling.as_ref().filter(|s| !s.is_null()) {
            bail!("config.json key `rope_scaling` = {s}: only unscaled RoPE (rope_type \"default\") is supported");
        }
        let p = self.rope_parameters.as_ref().filter(|p| !p.is_null());
        if let Some(t) = p.and_then(|p| p.get("rope_type")).and_then(|t| t.as_str()).filter(|t| *t != "default") {
            bail!(
                "config.json key `rope_parameters.rope_type` = \"{t}\": only \"default\" (unscaled RoPE) is supported"
            );
        }
        let from_params = p.and_then(|p| p.get("rope_theta")).and_then(|t| t.as_f64());
        let default = if self.model_type == "mixtral" { 1e6 } else { 1e4 };
        Ok(from_params.or(self.rope_theta).unwrap_or(default))
    }

    /// The attention window, None when every position sees the whole context.
    pub fn window(&self) -> Option<usize> {
        match self.model_type.as_str() {
            "qwen2_moe" if !self.use_sliding_window.unwrap_or(false) => None,
            _ => self.sliding_window.filter(|&w| w > 0),
        }
    }

    /// Sets our model keys from this config (everything but the router kind); refuses what our
    /// model cannot run exactly.
    pub fn apply(&self, cfg: &mut Config) -> Result<()> {
        let f = self.format()?;
        if let Some(a) = self.hidden_act.as_deref().filter(|a| *a != "silu") {
            bail!("config.json key `hidden_act` = \"{a}\": only \"silu\" (SwiGLU experts) is supported");
        }
        let (c, nh) = (self.hidden_size, self.num_attention_heads);
        if nh == 0 || c % nh != 0 {
            bail!(
                "config.json keys `hidden_size` = {c}, `num_attention_heads` = {nh}: the width must split into heads"
            );
        }
        if let Some(hd) = self.head_dim.filter(|&hd| hd != c / nh) {
            bail!(
                "config.json key `head_dim` = {hd}: only hidden_size / num_attention_heads = {} is supported",
                c / nh
            );
        }
        let m = &mut cfg.model;
        m.vocab_size = self.vocab_size;
        m.n_embd = c;
        m.n_head = nh;
        m.n_kv_head = self.num_key_value_heads.unwrap_or(if f == Format::Mixtral { 8 } else { 16 });
        m.n_layer = self.num_hidden_layers;
        m.block_size = self.max_position_embeddings.unwrap_or(1024).min(1024);
        m.norm = NormKind::Rms;
        m.norm_eps = self.rms_norm_eps.unwrap_or(if f == Format::Mixtral { 1e-5 } else { 1e-6 });
        m.bias = false;
        m.positions = Positions::Rotary;
        m.rope_theta = self.rope_theta()?;
        m.tie_embeddings = self.tie_word_embeddings.unwrap_or(false);
        m.dropout = 0.0;
        m.moe.activation = Activation::Swiglu;
        m.moe.capacity_factor = 0.0;
        m.moe.num_experts = self.experts();
        m.router.top_m = self.top_k();
        m.router.input = RouterInput::Hidden;
        if let Some(a) = self.router_aux_loss_coef {
            // HF's balance loss sums to k where ours sums to 1.
            m.moe.balance_coef = a * self.top_k() as f64;
        }
        match f {
            Format::Mixtral => {
                m.moe_every = 1;
                m.moe.expert_hidden = self.intermediate_size;
            }
            Format::Qwen2Moe => {
                if let Some(l) = self.mlp_only_layers.as_ref().filter(|l| !l.is_empty()) {
                    bail!(
                        "config.json key `mlp_only_layers` = {l:?}: only the decoder_sparse_step pattern is supported"
                    );
                }
                m.moe_every = self.decoder_sparse_step.unwrap_or(1);
                if m.moe_every == 0 || m.moe.num_experts == 0 {
                    bail!("config.json keys `decoder_sparse_step` / `num_experts`: a model without MoE blocks");
                }
                m.moe.expert_hidden = self.moe_intermediate_size.unwrap_or(1408);
                if m.moe_every > 1 && self.intermediate_size != 4 * c {
                    bail!(
                        "config.json key `intermediate_size` = {}: the dense blocks' width must be 4 x hidden_size = {}",
                        self.intermediate_size,
                        4 * c
                    );
                }
            }
        }
        Ok(())
    }
}

/// The `config.json` of an export of `cfg` (validated by `export::check`): `k` experts per token,
/// `renorm` (Qwen2-MoE's `norm_topk_prob`), `tied`: whether `lm_head.weight` is left to the tie.
pub fn export_json(cfg: &Config, f: Format, k: usize, renorm: bool, tied: bool) -> Value {
    let m = &cfg.model;
    let mut v = json!({
        "architectures": [match f { Format::Mixtral => "MixtralForCausalLM", Format::Qwen2Moe => "Qwen2MoeForCausalLM" }],
        "model_type": f.model_type(),
        "vocab_size": m.vocab_size,
        "hidden_size": m.n_embd,
        "num_hidden_layers": m.n_layer,
        "num_attention_heads": m.n_head,
        "num_key_value_heads": cfg.n_kv_head(),
        "head_dim": m.n_embd / m.n_head,
        "hidden_act": "silu",
        "max_position_embeddings": m.block_size,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "num_experts_per_tok": k,
        // HF's balance loss sums to k where ours sums to 1.
        "router_aux_loss_coef": m.moe.balance_coef / k as f64,
        "output_router_logits": false,
        "sliding_window": null,
        "attention_dropout": 0.0,
        "tie_word_embeddings": tied,
        // A char vocabulary has no special tokens: HF's defaults (bos 1, eos 2) would be characters.
        "bos_token_id": null,
        "eos_token_id": null,
        "pad_token_id": null,
        "dtype": "float32",
        "use_cache": true,
        "initializer_range": 0.02,
    });
    let o = v.as_object_mut().expect("an object");
    match f {
        Format::Mixtral => {
            o.insert("intermediate_size".into(), json!(cfg.expert_hidden()));
            o.insert("num_local_experts".into(), json!(m.moe.num_experts));
            o.insert("router_jitter_noise".into(), json!(0.0));
        }
        Format::Qwen2Moe => {
            o.insert("intermediate_size".into(), json!(4 * m.n_embd));
            o.insert("moe_intermediate_size".into(), json!(cfg.expert_hidden()));
            o.insert("num_experts".into(), json!(m.moe.num_experts));
            o.insert("decoder_sparse_step".into(), json!(m.moe_every));
            o.insert("mlp_only_layers".into(), json!([]));
            o.insert("norm_topk_prob".into(), json!(renorm));
            // A zero shared expert: Qwen2-MoE always has one.
            o.insert("shared_expert_intermediate_size".into(), json!(1));
            o.insert("qkv_bias".into(), json!(false));
            o.insert("use_sliding_window".into(), json!(false));
        }
    }
    v
}
