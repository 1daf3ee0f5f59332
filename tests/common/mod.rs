//! Shared test helpers: a tiny config on the repo's Tiny Shakespeare file.
#![allow(dead_code)]

pub mod host;

use gumbel_moe::Config;
use std::path::PathBuf;

/// The repo's copy of Tiny Shakespeare (data/tinyshakespeare.txt).
pub fn shakespeare_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/tinyshakespeare.txt")
}

/// The `key=value` overrides of [`tiny_config`] before `extra`: a tiny model (2 layers, 32 wide,
/// 4 experts) that trains a step in milliseconds.
pub fn tiny_overrides(router: &str) -> Vec<String> {
    vec![
        format!("data.source={:?}", shakespeare_path().display().to_string()),
        "model.block_size=16".into(),
        "model.n_layer=2".into(),
        "model.n_head=2".into(),
        "model.n_embd=32".into(),
        "model.moe.num_experts=4".into(),
        "model.moe.expert_hidden=64".into(),
        "model.router.prefilter=3".into(),
        format!("model.router.kind={router}"),
        "train.batch_size=4".into(),
        "train.max_iters=6".into(),
        "train.warmup_iters=2".into(),
        "train.lr_decay_iters=6".into(),
        "train.eval_interval=3".into(),
        "train.eval_iters=2".into(),
        "train.log_interval=1".into(),
        "train.ckpt_interval=3".into(),
        "train.final_full_eval=false".into(),
    ]
}

/// A tiny model (2 layers, 32 wide, 4 experts) that trains a step in milliseconds.
pub fn tiny_config(router: &str, extra: &[&str]) -> Config {
    let mut o = tiny_overrides(router);
    o.extend(extra.iter().map(|s| s.to_string()));
    Config::resolve("", "tiny", &o).expect("tiny config")
}
