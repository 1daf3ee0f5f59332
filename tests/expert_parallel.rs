//! Expert parallel on ranks that are threads of this process: each MoE layer's experts split over
//! two ranks give the loss and every gradient of one process that runs all experts, a training
//! run follows the single-process one, its checkpoints hold the full model (a run resumes with
//! another split or none), and the layouts it cannot run are refused. The same through `mpirun`:
//! tests/mpi.rs.
mod common;

use candle_core::{DType, Device, Tensor};
use common::tiny_config;
use gumbel_moe::dist::local::LocalGroup;
use gumbel_moe::dist::{Comm, Single};
use gumbel_moe::model::{cross_entropy, Gpt};
use gumbel_moe::moe::{build_router, ExpertGroup};
use gumbel_moe::nn::{Ctx, Params};
use gumbel_moe::train::data_parallel::all_reduce_grads;
use gumbel_moe::train::{IfRunExists, Trainer};
use gumbel_moe::Config;
use std::path::Path;
use std::sync::Arc;

/// Micro-batch `micro` of a fixed pseudo-random token stream: (inputs, targets), (B, T) each.
fn batch(cfg: &Config, micro: usize) -> (Tensor, Tensor) {
    let (b, t, v) = (cfg.train.batch_size, cfg.model.block_size, cfg.model.vocab_size as u64);
    let mut s = 0x9e37_79b9_7f4a_7c15u64 ^ (micro as u64 + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let ids: Vec<u32> = (0..b * (t + 1))
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) % v) as u32
        })
        .collect();
    let all = Tensor::from_vec(ids, (b, t + 1), &Device::Cpu).unwrap();
    (all.narrow(1, 0, t).unwrap(), all.narrow(1, 1, t).unwrap())
}

/// The model of `cfg` (same weights on every rank), split over `comm` when `g` > 1.
fn model(cfg: &Config, comm: &Arc<dyn Comm>, g: usize) -> (Params, Gpt) {
    let params = Params::new();
    let mut m =
        Gpt::new_with_router(cfg, params.var_builder(cfg.seed, DType::F32, &Device::Cpu), &build_router).unwrap();
    if g > 1 {
        m.set_expert_group(&ExpertGroup::new(comm.clone(), g).unwrap()).unwrap();
    }
    (params, m)
}

/// Cross-entropy and every parameter's gradient of micro-batches `micros` (each loss divided by
/// `accum`, as a training step), on this rank; gradients summed over its micro-batches.
fn grads(cfg: &Config, params: &Params, m: &Gpt, micros: &[usize], accum: usize) -> (Vec<f64>, Vec<Option<Tensor>>) {
    let named = params.named();
    let mut ces = Vec::new();
    let mut sum: Vec<Option<Tensor>> = vec![None; named.len()];
    for &i in micros {
        let (x, y) = batch(cfg, i);
        let ctx = Ctx { train: true, step: 3, tau: 1.0, seed: cfg.seed, micro: i as u32 };
        let out = m.forward_train(&x, &ctx).unwrap();
        let ce = cross_entropy(&out.logits, &y).unwrap();
        ces.push(ce.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap());
        let gs = ((ce + &out.aux_loss).unwrap() / accum as f64).unwrap().backward().unwrap();
        for (s, g) in sum.iter_mut().zip(out.param_grads(&gs, &named).unwrap()) {
            *s = match (s.take(), g) {
                (Some(a), Some(b)) => Some((a + b).unwrap()),
                (a, b) => a.or(b),
            };
        }
    }
    (ces, sum)
}

fn split_config(activation: &str) -> Config {
    tiny_config(
        "gumbel",
        &[
            "model.vocab_size=65",
            "model.moe_every=1",
            "model.router.top_m=2",
            &format!("model.moe.activation={activation}"),
        ],
    )
}

#[test]
fn two_ranks_holding_half_the_experts_give_the_loss_and_gradients_of_one_process() {
    for activation in ["gelu", "swiglu"] {
        split_matches_one_process(activation, 2, 2);
    }
}

#[test]
fn four_ranks_in_two_groups_give_the_loss_and_gradients_of_one_process() {
    split_matches_one_process("gelu", 4, 2);
}

/// `ranks` thread ranks, one micro-batch each, experts split over groups of `g`: every rank's
/// cross-entropy and every reduced gradient against one process running all micro-batches.
fn split_matches_one_process(activation: &str, ranks: usize, g: usize) {
    let cfg = split_config(activation);
    let single: Arc<dyn Comm> = Arc::new(Single);
    let (params, m) = model(&cfg, &single, 1);
    let micros: Vec<usize> = (0..ranks).collect();
    let (ce1, g1) = grads(&cfg, &params, &m, &micros, ranks);
    let names: Vec<String> = params.named().into_iter().map(|(n, _)| n).collect();
    let handles: Vec<_> = LocalGroup::ranks(ranks)
        .into_iter()
        .map(|comm| {
            let cfg = cfg.clone();
            std::thread::Builder::new()
                .stack_size(256 << 20)
                .spawn(move || {
                    let (params, m) = model(&cfg, &comm, g);
                    let (ce, g) = grads(&cfg, &params, &m, &[comm.rank()], ranks);
                    let own = g.iter().filter(|g| g.is_some()).count();
                    let (sum, _) = all_reduce_grads(comm.as_ref(), g, &params.named()).unwrap();
                    (ce[0], own, sum)
                })
                .unwrap()
        })
        .collect();
    let outs: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let mut worst = 0f64;
    for (r, (ce, own, sum)) in outs.iter().enumerate() {
        let rel = (ce - ce1[r]).abs() / ce1[r].abs();
        assert!(rel <= 1e-6, "{activation}: rank {r}'s cross-entropy {ce} vs one process {} ({rel:e})", ce1[r]);
        assert!(*own < names.len(), "{activation}: rank {r} took a gradient for every parameter");
        for ((name, a), b) in names.iter().zip(sum).zip(&g1) {
            let (a, b) = match (a, b) {
                (Some(a), Some(b)) => (common::host::flat(a), common::host::flat(b)),
                (a, b) => {
                    panic!("{activation}: {name}: gradient {} on rank {r}, {} in one process", a.is_some(), b.is_some())
                }
            };
            let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
            let diff = a.iter().zip(&b).fold(0f64, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                diff <= 1e-6 * scale,
                "{activation}: {name} on rank {r}: max |diff| {diff:e}, max |grad| {scale:e}"
            );
            worst = worst.max(diff / scale.max(f64::MIN_POSITIVE));
        }
    }
    eprintln!("{activation}, {ranks} ranks, groups of {g}: largest gradient difference / its tensor's largest gradient: {worst:e}");
}

/// Fits the trainer `make` builds on each of `n` thread ranks, all given `dir` (rank 0 alone
/// writes); every rank's final val loss, or its error.
fn on_ranks(
    n: usize,
    dir: &Path,
    make: impl Fn(Arc<dyn Comm>, &Path) -> anyhow::Result<Trainer> + Send + Sync + Clone + 'static,
) -> Vec<Result<f64, String>> {
    let handles: Vec<_> = LocalGroup::ranks(n)
        .into_iter()
        .map(|comm| {
            let (dir, make) = (dir.to_path_buf(), make.clone());
            std::thread::Builder::new()
                .stack_size(256 << 20)
                .spawn(move || common::fit_rank(comm, |c| make(c, &dir)))
                .unwrap()
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn train_config(extra: &[&str]) -> Config {
    let mut o = vec!["train.grad_accum=2", "train.threads=1", "model.moe_every=1", "model.router.top_m=2"];
    o.extend(extra);
    tiny_config("gumbel", &o)
}

/// The logged training losses of a run.
fn losses(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("train_loss")?.as_f64())
        .collect()
}

#[test]
fn a_split_run_follows_one_process_and_resumes_without_the_split() {
    let (one, split) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut t =
        Trainer::new_on(train_config(&[]), one.path(), &build_router, IfRunExists::Refuse, Arc::new(Single)).unwrap();
    t.progress = false;
    t.fit().unwrap();
    // Steps 1-3 with the experts split over 2 ranks, then 4-6 in one process that runs them all.
    let got = on_ranks(2, split.path(), |c, dir| {
        let cfg = train_config(&["train.expert_parallel=2", "train.max_iters=3"]);
        Trainer::new_on(cfg, dir, &build_router, IfRunExists::Refuse, c)
    });
    assert!(got.iter().all(Result::is_ok), "{got:?}");
    let mut r = Trainer::resume_on(
        split.path(),
        &["train.max_iters=6".into(), "train.expert_parallel=1".into()],
        None,
        IfRunExists::Refuse,
        Arc::new(Single),
    )
    .unwrap();
    r.progress = false;
    r.fit().unwrap();
    let (a, b) = (losses(one.path()), losses(split.path()));
    assert_eq!(a.len(), 6, "a loss per step");
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((x - y).abs() <= 1e-5 * x.abs(), "step {}: loss {y} split vs {x} in one process", i + 1);
    }
    // The split run's checkpoint holds every expert, as one process's does.
    let names = |dir: &Path| {
        let m = candle_core::safetensors::load(dir.join("ckpt-0000003/model.safetensors"), &Device::Cpu).unwrap();
        let mut k: Vec<String> = m.into_keys().collect();
        k.sort();
        k
    };
    assert_eq!(names(one.path()), names(split.path()));
}

#[test]
fn layouts_expert_parallel_cannot_run_are_refused_by_name() {
    let d = tempfile::tempdir().unwrap();
    // The config's own check, or the trainer's.
    let one = |extra: &[&str]| {
        let mut o = common::tiny_overrides("gumbel");
        o.extend(["train.grad_accum=2", "model.moe_every=1"].iter().chain(extra).map(|s| s.to_string()));
        let r = Config::resolve("", "tiny", &o)
            .and_then(|cfg| Trainer::new_on(cfg, d.path(), &build_router, IfRunExists::Refuse, Arc::new(Single)));
        r.err().map(|e| format!("{e:#}")).unwrap_or_default()
    };
    let e = one(&["train.expert_parallel=2"]);
    assert!(e.contains("train.expert_parallel = 2") && e.contains("1 rank"), "{e}");
    let e = one(&["train.expert_parallel=3"]);
    assert!(e.contains("model.moe.num_experts = 4"), "{e}");
    let e = one(&["train.expert_parallel=0"]);
    assert!(e.contains("train.expert_parallel = 0"), "{e}");
    let got = on_ranks(2, d.path(), |c, dir| {
        let cfg = train_config(&["train.expert_parallel=2", "model.router.impl=reference"]);
        Trainer::new_on(cfg, dir, &build_router, IfRunExists::Refuse, c)
    });
    for r in got {
        let e = r.unwrap_err();
        assert!(e.contains("model.router.impl") || e.contains("rank"), "{e}");
    }
}
