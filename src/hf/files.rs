//! Where an HF model's files are: a local directory, or `hf://OWNER/NAME` (a model repo, revision
//! main) through hf-hub's cache, as `data::hub` reads dataset files (`HF_HUB_CACHE`, else
//! `$HF_HOME/hub`; offline, cache only, when `HF_HUB_OFFLINE` is set).

#[cfg(feature = "hub")]
use crate::data::hub::follow_flattened_link;
use crate::data::hub::{HubOptions, HUB_PREFIX};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// The files of one model.
#[derive(Clone, Debug)]
pub struct ModelFiles {
    /// What the user named (for errors).
    pub origin: String,
    pub config: PathBuf,
    /// `model.safetensors`, or the shards `model.safetensors.index.json` lists.
    pub weights: Vec<PathBuf>,
    pub tokenizer: PathBuf,
}

/// The shard file names of a `model.safetensors.index.json` (its `weight_map` values, sorted, once each).
fn shards(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).with_context(|| format!("cannot read {}", index.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", index.display()))?;
    let map = v["weight_map"].as_object().with_context(|| format!("{} has no weight_map", index.display()))?;
    let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
    files.sort();
    files.dedup();
    if let Some(f) = files.iter().find(|f| !confined(f)) {
        bail!(
            "{}: shard {f:?} is outside the model folder (weight_map names must be relative paths inside it)",
            index.display()
        );
    }
    Ok(files)
}

/// Whether a shard name is a plain relative path inside the model folder (no absolute path, `..`,
/// drive or root): an index must not make us read files elsewhere.
fn confined(name: &str) -> bool {
    use std::path::Component;
    !name.is_empty() && Path::new(name).components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// Resolves `from`: a directory holding config.json, model.safetensors (or its index and shards)
/// and tokenizer.json, or `hf://OWNER/NAME`.
pub fn locate(from: &str, hub: &HubOptions) -> Result<ModelFiles> {
    if from.starts_with(HUB_PREFIX) {
        return locate_hub(from, hub);
    }
    let dir = Path::new(from);
    if !dir.is_dir() {
        bail!("--from {from}: not a directory (nor hf://OWNER/NAME)");
    }
    let need = |f: &str| -> Result<PathBuf> {
        let p = dir.join(f);
        if !p.is_file() {
            bail!("{from}: no {f}");
        }
        Ok(p)
    };
    let config = need("config.json")?;
    let weights = if dir.join("model.safetensors").is_file() {
        vec![dir.join("model.safetensors")]
    } else {
        let index = need("model.safetensors.index.json").context("expected model.safetensors or its index")?;
        shards(&index)?.iter().map(|f| need(f)).collect::<Result<_>>()?
    };
    Ok(ModelFiles { origin: from.into(), config, weights, tokenizer: need("tokenizer.json")? })
}

#[cfg(feature = "hub")]
fn locate_hub(from: &str, hub: &HubOptions) -> Result<ModelFiles> {
    let rest = from.strip_prefix(HUB_PREFIX).unwrap_or_default();
    let parts: Vec<&str> = rest.split('/').collect();
    if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
        bail!("malformed hub model {from:?}: expected hf://OWNER/NAME (a model repo on the Hugging Face hub)");
    }
    let mut builder = hf_hub::HFClient::builder().retry_max_attempts(0);
    if let Some(dir) = &hub.cache_dir {
        builder = builder.cache_dir(dir.clone());
    }
    let client = builder.build().context("cannot set up the Hugging Face hub client")?;
    let cache = client.cache_dir().to_path_buf();
    let sync = hf_hub::HFClientSync::from_inner(client).context("cannot start the Hugging Face hub client")?;
    let repo = sync.model(parts[0], parts[1]);
    let fetch = |file: &str| -> Result<PathBuf> {
        let r = repo.download_file().filename(file).local_files_only(hub.offline).send();
        let p = r.map_err(|e| {
            let how = if hub.offline { "offline: not in the hub cache" } else { "cannot fetch it" };
            anyhow::anyhow!(
                "file {file:?} of Hugging Face model {}/{} (revision main, hub cache {}): {how} ({e})",
                parts[0],
                parts[1],
                cache.display()
            )
        })?;
        Ok(follow_flattened_link(p))
    };
    let config = fetch("config.json")?;
    let weights = match fetch("model.safetensors") {
        Ok(p) => vec![p],
        Err(first) => match fetch("model.safetensors.index.json") {
            Ok(index) => shards(&index)?.iter().map(|f| fetch(f)).collect::<Result<_>>()?,
            Err(_) => return Err(first),
        },
    };
    Ok(ModelFiles { origin: from.into(), config, weights, tokenizer: fetch("tokenizer.json")? })
}

#[cfg(not(feature = "hub"))]
fn locate_hub(from: &str, _hub: &HubOptions) -> Result<ModelFiles> {
    bail!("cannot read {from}: gumbel-moe was built without the `hub` feature")
}
