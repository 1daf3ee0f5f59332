//! Where `export-hf` may write: never into a checkpoint or a training run (their `config.json` and
//! `model.safetensors` are ours, and an HF file of the same name would destroy them), and into a
//! folder that already holds files only with `--overwrite`, as `huggingface-cli download
//! --local-dir` and `save_pretrained` users expect nothing else to be replaced.

use super::export::LOGITS_FILE;
use anyhow::{bail, Context, Result};
use std::path::Path;

/// The files an export writes (plus [`LOGITS_FILE`] with `--with-logits`).
pub const EXPORT_FILES: [&str; 4] = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"];

/// Names in a folder that make it a gumbel-moe checkpoint or training run.
const OURS: [&str; 4] = ["trainer_state.json", "optimizer.safetensors", "metrics.jsonl", "best"];

/// The first entry of `dir` that marks it as a checkpoint or a run (`ckpt-*` included).
fn run_marker(dir: &Path) -> Result<Option<String>> {
    let mut names = entries(dir)?;
    names.retain(|n| OURS.contains(&n.as_str()) || n.starts_with("ckpt-"));
    Ok(names.into_iter().next())
}

/// The names in `dir`, sorted (empty when it does not exist).
fn entries(dir: &Path) -> Result<Vec<String>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let rd = std::fs::read_dir(dir).with_context(|| format!("cannot list --out {}", dir.display()))?;
    let mut names: Vec<String> = Vec::new();
    for e in rd {
        names.push(
            e.with_context(|| format!("cannot list --out {}", dir.display()))?.file_name().to_string_lossy().into(),
        );
    }
    names.sort();
    Ok(names)
}

/// Refuses `out` when it is a file, a checkpoint or a run (always), or a folder that holds
/// anything (unless `overwrite`).
pub fn check_out(out: &Path, overwrite: bool) -> Result<()> {
    if out.exists() && !out.is_dir() {
        bail!("--out {} is a file, not a folder: export-hf writes a model folder", out.display());
    }
    if let Some(m) = run_marker(out)? {
        bail!(
            "--out {} is a gumbel-moe checkpoint or run (it holds {m}): exporting there would overwrite its \
             config.json and model.safetensors with the Hugging Face ones; choose another folder",
            out.display()
        );
    }
    let names = entries(out)?;
    if !names.is_empty() && !overwrite {
        let shown: Vec<&str> = names.iter().map(String::as_str).take(5).collect();
        let more = if names.len() > 5 { format!(" and {} more", names.len() - 5) } else { String::new() };
        bail!(
            "--out {} is not empty (it holds {}{more}): choose an empty or new folder, or pass --overwrite to \
             replace {} there (other files are kept; an old {LOGITS_FILE} is removed)",
            out.display(),
            shown.join(", "),
            EXPORT_FILES.join(", ")
        );
    }
    Ok(())
}

/// Removes an earlier export's [`LOGITS_FILE`] that this export does not rewrite, so a check
/// script never compares against logits of another model.
pub fn remove_stale_logits(out: &Path) -> Result<()> {
    let p = out.join(LOGITS_FILE);
    if p.exists() {
        std::fs::remove_file(&p).with_context(|| format!("cannot remove the stale {}", p.display()))?;
    }
    Ok(())
}
