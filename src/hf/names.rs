//! Our tensor names to Hugging Face's. Each of our tensors is one HF tensor, except `c_attn`
//! (rows [q; k; v] = q_proj, k_proj, v_proj stacked). HF names are the on-disk (per-expert) ones;
//! [`unfuse`] turns transformers' in-memory fused expert tensors into them.

use super::Format;
use crate::config::Config;
use anyhow::{bail, Result};
use candle_core::Tensor;
use std::collections::HashMap;

/// One of our tensors and the HF tensors whose rows, stacked in order, are it.
#[derive(Clone, Debug)]
pub struct Entry {
    pub ours: String,
    pub hf: Vec<String>,
}

fn one(ours: String, hf: String) -> Entry {
    Entry { ours, hf: vec![hf] }
}

/// The HF name of a block's MoE part: `model.layers.{i}.block_sparse_moe` or `...mlp`.
fn moe_prefix(i: usize, f: Format) -> String {
    match f {
        Format::Mixtral => format!("model.layers.{i}.block_sparse_moe"),
        Format::Qwen2Moe => format!("model.layers.{i}.mlp"),
    }
}

/// HF names of expert `e`'s (gate, up, down) projections in block `i`.
pub fn expert_names(i: usize, e: usize, f: Format) -> [String; 3] {
    let p = format!("{}.experts.{e}", moe_prefix(i, f));
    match f {
        Format::Mixtral => [format!("{p}.w1.weight"), format!("{p}.w3.weight"), format!("{p}.w2.weight")],
        Format::Qwen2Moe => {
            [format!("{p}.gate_proj.weight"), format!("{p}.up_proj.weight"), format!("{p}.down_proj.weight")]
        }
    }
}

/// Qwen2-MoE's shared expert of block `i`: (gate, up, down, shared_expert_gate) names.
pub fn shared_expert_names(i: usize) -> [String; 4] {
    let p = format!("model.layers.{i}.mlp");
    [
        format!("{p}.shared_expert.gate_proj.weight"),
        format!("{p}.shared_expert.up_proj.weight"),
        format!("{p}.shared_expert.down_proj.weight"),
        format!("{p}.shared_expert_gate.weight"),
    ]
}

/// The name of block `i`'s router weight (E, C).
pub fn gate_name(i: usize, f: Format) -> String {
    format!("{}.gate.weight", moe_prefix(i, f))
}

/// Every tensor of a model with config `cfg` (rms, no biases, rotary, swiglu), ours -> HF.
/// `lm_head`: whether `lm_head.weight` is one of them (an untied head, or a tied one written out).
pub fn mapping(cfg: &Config, f: Format, lm_head: bool) -> Vec<Entry> {
    let mut v = vec![one("wte.weight".into(), "model.embed_tokens.weight".into())];
    for i in 0..cfg.model.n_layer {
        let (h, l) = (format!("h.{i}"), format!("model.layers.{i}"));
        v.push(one(format!("{h}.ln_1.weight"), format!("{l}.input_layernorm.weight")));
        let a = format!("{l}.self_attn");
        v.push(Entry {
            ours: format!("{h}.attn.c_attn.weight"),
            hf: vec![format!("{a}.q_proj.weight"), format!("{a}.k_proj.weight"), format!("{a}.v_proj.weight")],
        });
        v.push(one(format!("{h}.attn.c_proj.weight"), format!("{a}.o_proj.weight")));
        v.push(one(format!("{h}.ln_2.weight"), format!("{l}.post_attention_layernorm.weight")));
        if cfg.is_moe_layer(i) {
            v.push(one(format!("{h}.moe.router.weight"), gate_name(i, f)));
            for e in 0..cfg.model.moe.num_experts {
                let [g, u, d] = expert_names(i, e, f);
                let ex = format!("{h}.moe.experts.{e}");
                v.push(one(format!("{ex}.c_gate.weight"), g));
                v.push(one(format!("{ex}.c_fc.weight"), u));
                v.push(one(format!("{ex}.c_proj.weight"), d));
            }
        } else {
            v.push(one(format!("{h}.mlp.c_gate.weight"), format!("{l}.mlp.gate_proj.weight")));
            v.push(one(format!("{h}.mlp.c_fc.weight"), format!("{l}.mlp.up_proj.weight")));
            v.push(one(format!("{h}.mlp.c_proj.weight"), format!("{l}.mlp.down_proj.weight")));
        }
    }
    v.push(one("ln_f.weight".into(), "model.norm.weight".into()));
    if lm_head {
        v.push(one("lm_head.weight".into(), "lm_head.weight".into()));
    }
    v
}

/// Rewrites transformers' in-memory names as the on-disk ones: `mlp.experts.gate_up_proj` (E, 2I, C)
/// into each expert's gate (rows [0, I)) and up (rows [I, 2I)), `mlp.experts.down_proj` (E, C, I) into
/// each expert's down, and (Mixtral) `mlp.gate.weight` into `block_sparse_moe.gate.weight`.
pub fn unfuse(map: HashMap<String, Tensor>, f: Format) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::with_capacity(map.len());
    for (name, t) in map {
        let layer = name.strip_prefix("model.layers.").and_then(|r| r.split_once('.'));
        let Some((i, rest)) = layer.and_then(|(i, rest)| Some((i.parse::<usize>().ok()?, rest))) else {
            out.insert(name, t);
            continue;
        };
        match rest {
            "mlp.experts.gate_up_proj" | "mlp.experts.down_proj" => {
                let dims = t.dims().to_vec();
                let up = rest.ends_with("gate_up_proj");
                if dims.len() != 3 || (up && dims[1] % 2 != 0) {
                    bail!("tensor {name} has shape {dims:?}; expected (E, 2I, C) or (E, C, I)");
                }
                for e in 0..dims[0] {
                    let te = t.get(e)?; // (2I, C) or (C, I)
                    let [g, u, d] = expert_names(i, e, f);
                    if up {
                        let h = dims[1] / 2;
                        out.insert(g, te.narrow(0, 0, h)?.contiguous()?);
                        out.insert(u, te.narrow(0, h, h)?.contiguous()?);
                    } else {
                        out.insert(d, te.contiguous()?);
                    }
                }
            }
            "mlp.gate.weight" if f == Format::Mixtral => {
                out.insert(gate_name(i, f), t);
            }
            _ => {
                out.insert(name, t);
            }
        }
    }
    Ok(out)
}
