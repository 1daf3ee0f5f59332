//! Shared test helpers: a tiny config on the repo's Tiny Shakespeare file, a straight vs resumed
//! training run, and the submodules (device-parametric tests, finite differences, host math,
//! router builders).
#![allow(dead_code)]

pub mod device;
pub mod fd;
pub mod host;
pub mod routing;

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

/// Trains `kind` 6 steps in one go (in dir a) and 3 steps + resume + 3 (in dir b); returns each
/// run's final weights (sorted by name) and REINFORCE baseline.
pub type Ckpt = (Vec<(String, Vec<f64>)>, Option<f64>);
pub fn straight_and_resumed(kind: &str, extra: &[&str]) -> (Ckpt, Ckpt) {
    use gumbel_moe::train::{checkpoint, Trainer};
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let run = |dir: &std::path::Path, more: &[&str]| {
        let o: Vec<&str> = extra.iter().chain(more).copied().collect();
        let mut t = Trainer::new(tiny_config(kind, &o), dir).unwrap();
        t.progress = false;
        t.fit().unwrap();
    };
    run(a.path(), &[]);
    run(b.path(), &["train.max_iters=3"]);
    let mut r = Trainer::resume(b.path(), &["train.max_iters=6".into()], None).unwrap();
    r.progress = false;
    r.fit().unwrap();
    let ckpt = |dir: &std::path::Path| {
        let loaded = checkpoint::load(&dir.join("ckpt-0000006")).unwrap();
        let m = candle_core::safetensors::load(dir.join("ckpt-0000006/model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
        let mut v: Vec<(String, Vec<f64>)> = m.into_iter().map(|(k, t)| (k, host::flat(&t))).collect();
        v.sort_by(|x, y| x.0.cmp(&y.0));
        (v, loaded.state.reinforce_baseline)
    };
    (ckpt(a.path()), ckpt(b.path()))
}

/// Every file under `dir` (relative path -> bytes).
pub fn snapshot(dir: &std::path::Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    fn walk(root: &std::path::Path, at: &std::path::Path, out: &mut std::collections::BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(at).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(p.strip_prefix(root).unwrap().display().to_string(), std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// A run's weights file at `step` and its metrics lines without timings and `done` lines (a run
/// cut short keeps its `done` line): what two runs that should agree bit for bit are compared on.
pub fn run_outcome(dir: &std::path::Path, step: usize) -> (Vec<u8>, Vec<String>) {
    let w = std::fs::read(dir.join(format!("ckpt-{step:07}/model.safetensors"))).unwrap();
    let m = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let lines = m
        .lines()
        .filter(|l| !l.contains("\"event\""))
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            o.remove("tok_per_s");
            o.remove("wall_s");
            o.remove("sent_mib_per_step");
            v.to_string()
        })
        .collect();
    (w, lines)
}

/// Builds this rank's trainer with `make` and fits it; a rank that fails aborts its group (as
/// `main` does), so the others stop too. The final val loss, or the error's text.
pub fn fit_rank(
    comm: std::sync::Arc<dyn gumbel_moe::dist::Comm>,
    make: impl FnOnce(std::sync::Arc<dyn gumbel_moe::dist::Comm>) -> anyhow::Result<gumbel_moe::train::Trainer>,
) -> Result<f64, String> {
    let r = make(comm.clone()).and_then(|mut t| {
        t.progress = false;
        t.fit().map(|s| s.val_loss)
    });
    if r.is_err() {
        let c = comm.clone();
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || c.abort(1)));
    }
    r.map_err(|e| format!("{e:#}"))
}
