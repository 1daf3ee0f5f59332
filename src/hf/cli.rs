//! The `export-hf` and `import-hf` subcommands' arguments and what they print.

use super::{export_hf, import_hf, ExportOptions, Format, ImportOptions};
use crate::data::HubOptions;
use anyhow::Result;
use std::path::PathBuf;

/// Write a checkpoint as a transformers model directory (MixtralForCausalLM or Qwen2MoeForCausalLM)
/// with the same logits at eval; refuses, naming the config key, what the format cannot express.
#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// A checkpoint directory, or a run directory (its newest checkpoint).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The model directory to write: new or empty, never a checkpoint or a training run.
    #[arg(long)]
    pub out: PathBuf,
    /// mixtral, qwen2-moe, or auto (Mixtral when it can express the model).
    #[arg(long, default_value = "auto")]
    pub format: String,
    /// A tied model: `tie_word_embeddings: true` and no lm_head.weight (default: an untied copy).
    #[arg(long)]
    pub tied: bool,
    /// Also write our logits for fixed ids and our greedy decoding (for scripts/check_hf_export.py).
    #[arg(long)]
    pub with_logits: bool,
    /// Write into a folder that already holds files: replaces the export's files there (and removes
    /// an old gumbel_moe_logits.safetensors); other files are kept.
    #[arg(long)]
    pub overwrite: bool,
}

impl ExportArgs {
    pub fn run(&self) -> Result<()> {
        let opts = ExportOptions {
            format: Format::parse(&self.format)?,
            tied: self.tied,
            with_logits: self.with_logits,
            overwrite: self.overwrite,
        };
        let plan = export_hf(&self.checkpoint, &self.out, &opts)?;
        let j = serde_json::json!({"event": "exported", "out": self.out, "model_type": plan.format.model_type(),
            "num_experts_per_tok": plan.k, "renormalised": plan.renorm, "gate_scale": plan.gate_scale});
        println!("{j}");
        Ok(())
    }
}

/// Make a checkpoint of ours (step 0, fresh optimizer state) from a Mixtral or Qwen2-MoE directory or
/// hub model; refuses, naming the key, what this model cannot run exactly.
#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    /// A model directory, or hf://OWNER/NAME (through the hub cache; HF_HUB_OFFLINE=1: cache only).
    #[arg(long)]
    pub from: String,
    /// The checkpoint directory to write (must not exist).
    #[arg(long)]
    pub out: PathBuf,
    /// softmax_topk (default) or gumbel (the gate's weights as a soft Gumbel router's, tau = 1).
    #[arg(long)]
    pub router: Option<String>,
    /// Override a config key of the imported model, e.g. --set model.block_size=256 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

impl ImportArgs {
    pub fn run(&self) -> Result<()> {
        let opts =
            ImportOptions { router: self.router.clone(), sets: self.overrides.clone(), hub: HubOptions::from_env() };
        let got = import_hf(&self.from, &self.out, &opts)?;
        if !got.exact {
            eprintln!(
                "note: the {} router does not route as the HF model at eval (norm_topk_prob = false)",
                got.cfg.model.router.kind
            );
        }
        let m = &got.cfg.model;
        let j = serde_json::json!({"event": "imported", "out": self.out, "model_type": got.format.model_type(),
            "router": m.router.kind, "exact": got.exact, "n_layer": m.n_layer, "n_embd": m.n_embd,
            "num_experts": m.moe.num_experts, "top_m": m.router.top_m, "vocab_size": m.vocab_size});
        println!("{j}");
        Ok(())
    }
}
