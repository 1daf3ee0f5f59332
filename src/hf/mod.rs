//! Hugging Face interop: checkpoints of ours to and from transformers' MixtralForCausalLM and
//! Qwen2MoeForCausalLM directories (`config.json`, `model.safetensors`, `tokenizer.json`), exact at
//! eval, or refused naming the config key that cannot be expressed.
//!
//! - [`config`]: the HF `config.json` fields we read and write, and what each refusal names.
//! - [`names`]: our tensor names to theirs (per-expert on disk; fused names are accepted on import).
//! - [`export`]: `gumbel-moe export-hf`; [`import`]: `gumbel-moe import-hf`; [`files`]: where a
//!   model directory's files are (a local folder or a hub model in hf-hub's cache); [`cli`]: the
//!   subcommands; [`out_dir`]: where an export may write (never into a checkpoint or a run).
pub mod cli;
pub mod config;
pub mod export;
pub mod files;
pub mod import;
pub mod names;
pub mod out_dir;

pub use export::{export_hf, ExportOptions};
pub use import::{import_hf, ImportOptions};

/// The two HF architectures we write and read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `MixtralForCausalLM`: an MoE in every block, routing weights renormalised over the top k.
    Mixtral,
    /// `Qwen2MoeForCausalLM`: MoE every `decoder_sparse_step` blocks, `norm_topk_prob` either way,
    /// a shared expert (written as zeros of width 1).
    Qwen2Moe,
}

impl Format {
    pub fn parse(s: &str) -> anyhow::Result<Option<Format>> {
        Ok(match s {
            "auto" => None,
            "mixtral" => Some(Format::Mixtral),
            "qwen2-moe" | "qwen2_moe" => Some(Format::Qwen2Moe),
            o => anyhow::bail!("--format {o}: expected auto, mixtral or qwen2-moe"),
        })
    }

    pub fn model_type(self) -> &'static str {
        match self {
            Format::Mixtral => "mixtral",
            Format::Qwen2Moe => "qwen2_moe",
        }
    }
}
