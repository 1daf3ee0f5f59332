//! Data-parallel training on ranks that are threads of this process (`dist::local`): the same
//! bits as one process, resume with another rank count, refusals that name the rank and the key,
//! rank 0 alone writing. The same runs through `mpirun` are in tests/mpi.rs (feature `mpi`).
mod common;

use common::{fit_rank as run_rank, tiny_config};
use gumbel_moe::dist::local::LocalGroup;
use gumbel_moe::dist::Comm;
use gumbel_moe::moe::build_router;
use gumbel_moe::train::{IfRunExists, Trainer};
use gumbel_moe::Config;
use std::path::Path;
use std::sync::Arc;

/// `f(comm)` on each of `n` thread ranks (with room for the model's stack), in rank order.
fn on_ranks<T: Send>(n: usize, f: &(dyn Fn(Arc<dyn Comm>) -> T + Sync)) -> Vec<T> {
    std::thread::scope(|s| {
        let handles: Vec<_> = LocalGroup::ranks(n)
            .into_iter()
            .map(|comm| std::thread::Builder::new().stack_size(256 << 20).spawn_scoped(s, move || f(comm)).unwrap())
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Trains `cfg` on `n` thread ranks into `dir` (every rank is given `dir`; rank 0 alone writes).
/// Returns each rank's outcome (the error text on failure).
fn train_on_ranks(n: usize, cfg: &(dyn Fn(usize) -> Config + Sync), dir: &Path) -> Vec<Result<f64, String>> {
    on_ranks(n, &|comm| {
        let cfg = cfg(comm.rank());
        run_rank(comm, |c| Trainer::new_on(cfg, dir, &build_router, IfRunExists::Refuse, c))
    })
}

/// One process (rank 0 of 1) with `threads` workers.
fn train_single(cfg: Config, threads: usize, dir: &Path) -> f64 {
    let mut cfg = cfg;
    cfg.train.threads = threads;
    let mut t =
        Trainer::new_on(cfg, dir, &build_router, IfRunExists::Refuse, Arc::new(gumbel_moe::dist::Single)).unwrap();
    t.progress = false;
    t.fit().unwrap().val_loss
}

fn cfg_with(extra: &[&str]) -> Config {
    let mut o = vec![
        "train.grad_accum=2",
        "train.max_iters=6",
        "train.lr_decay_iters=6",
        "train.ckpt_interval=3",
        "train.threads=1",
    ];
    o.extend(extra);
    tiny_config("gumbel", &o)
}

#[test]
fn two_ranks_give_the_bits_of_one_process_with_one_or_two_threads() {
    for accum in ["2", "4"] {
        let extra = [format!("train.grad_accum={accum}")];
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let (d1, d2, dr) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let v1 = train_single(cfg_with(&extra), 1, d1.path());
        let v2 = train_single(cfg_with(&extra), 2, d2.path());
        let got = train_on_ranks(2, &|_| cfg_with(&extra), dr.path());
        for (r, g) in got.iter().enumerate() {
            assert_eq!(g.as_ref().map(|v| v.to_bits()), Ok(v1.to_bits()), "rank {r}'s val loss, accum {accum}");
        }
        assert_eq!(v1.to_bits(), v2.to_bits());
        let (a, b, c) =
            (common::run_outcome(d1.path(), 6), common::run_outcome(d2.path(), 6), common::run_outcome(dr.path(), 6));
        assert!(a.0 == b.0 && a.0 == c.0, "final weights differ (accum {accum})");
        assert_eq!(a.1, c.1, "logged losses, grad norms and routing (accum {accum})");
        assert_eq!(a.1, b.1);
        assert_eq!(a.1.len(), 6, "a metrics line per step");
    }
}

#[test]
fn each_rank_holds_the_optimizer_state_of_its_range_and_checkpoints_hold_all_of_it() {
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    train_single(cfg_with(&[]), 1, one.path());
    let held: Vec<(usize, usize)> = on_ranks(2, &|comm| {
        let t = Trainer::new_on(cfg_with(&[]), two.path(), &build_router, IfRunExists::Refuse, comm.clone());
        let r = t.and_then(|mut t| {
            t.progress = false;
            t.fit()?;
            let total: usize = t.params.named().iter().map(|(_, v)| v.elem_count()).sum();
            Ok((t.opt.held_elements(), total))
        });
        if r.is_err() {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || comm.abort(1)));
        }
        r.map_err(|e| format!("{e:#}")).unwrap()
    });
    let total = held[0].1;
    // After the last checkpoint every rank is back to its own range: m and v of each parameter
    // held once among the ranks, and neither rank holding most of them.
    assert_eq!(held.iter().map(|h| h.0).sum::<usize>(), 2 * total, "{held:?}");
    for (r, &(h, _)) in held.iter().enumerate() {
        assert!(h > 0 && h < 2 * total * 3 / 4, "rank {r} holds {h} of the {} moment elements", 2 * total);
    }
    // The checkpoints' optimizer state, gathered from both ranks, has the bits of one process's.
    for step in [3, 6] {
        let file = |d: &Path| d.join(format!("ckpt-{step:07}")).join(gumbel_moe::train::checkpoint::OPTIMIZER_FILE);
        let a = candle_core::safetensors::load(file(one.path()), &candle_core::Device::Cpu).unwrap();
        let b = candle_core::safetensors::load(file(two.path()), &candle_core::Device::Cpu).unwrap();
        assert_eq!(a.len(), b.len());
        for (k, x) in &a {
            let bits = |t: &candle_core::Tensor| -> Vec<u8> {
                let t = t.flatten_all().unwrap();
                match t.dtype() {
                    candle_core::DType::I64 => {
                        t.to_vec1::<i64>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect()
                    }
                    _ => t.to_vec1::<f32>().unwrap().iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
                }
            };
            assert!(bits(x) == bits(&b[k]), "step {step}: optimizer tensor {k} differs from one process's");
        }
    }
}

#[test]
fn a_run_resumes_exactly_on_another_rank_count() {
    let (straight, cut) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let accum4 = ["train.grad_accum=4"];
    train_single(cfg_with(&accum4), 1, straight.path());
    // Steps 1-3 on 4 ranks, then 4-6 on 2 ranks, then the final evaluation alone.
    let first = train_on_ranks(4, &|_| cfg_with(&["train.grad_accum=4", "train.max_iters=3"]), cut.path());
    assert!(first.iter().all(Result::is_ok), "{first:?}");
    let second = on_ranks(2, &|comm| {
        run_rank(comm, |c| Trainer::resume_on(cut.path(), &["train.max_iters=6".into()], None, IfRunExists::Refuse, c))
    });
    assert!(second.iter().all(Result::is_ok), "{second:?}");
    let (a, b) = (common::run_outcome(straight.path(), 6), common::run_outcome(cut.path(), 6));
    assert!(a.0 == b.0, "weights after 3 steps on 4 ranks and 3 on 2 differ from 6 steps in one process");
    assert_eq!(a.1, b.1, "the resumed run's metrics");
}

#[test]
fn ranks_that_disagree_are_refused_by_name() {
    let d = tempfile::tempdir().unwrap();
    let got = train_on_ranks(2, &|r| if r == 1 { cfg_with(&["train.lr=0.002"]) } else { cfg_with(&[]) }, d.path());
    let msg = got[0].as_ref().unwrap_err();
    assert!(msg.contains("rank 1's config differs from rank 0's") && msg.contains("lr"), "{msg}");
    assert!(!d.path().join("metrics.jsonl").exists(), "nothing was trained or written");
}

#[test]
fn rank_0_alone_writes() {
    let (d0, d1) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let dirs = [d0.path().to_path_buf(), d1.path().join("rank1")];
    let got = on_ranks(2, &|comm| {
        let dir = &dirs[comm.rank()];
        run_rank(comm, |c| Trainer::new_on(cfg_with(&[]), dir, &build_router, IfRunExists::Refuse, c))
    });
    assert!(got.iter().all(Result::is_ok), "{got:?}");
    assert!(dirs[0].join("ckpt-0000006/model.safetensors").exists());
    assert!(!dirs[1].exists(), "rank 1 created its output directory");
}

#[test]
fn layouts_that_cannot_be_shared_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let got = train_on_ranks(2, &|_| cfg_with(&["train.grad_accum=3"]), d.path());
    let msg = got[0].as_ref().unwrap_err();
    assert!(msg.contains("train.grad_accum = 3") && msg.contains("2 ranks"), "{msg}");
    let got = train_on_ranks(2, &|_| tiny_config("reinforce", &["train.max_iters=2", "train.grad_accum=2"]), d.path());
    let msg = got[1].as_ref().unwrap_err();
    assert!(msg.contains("model.router.kind") && msg.to_lowercase().contains("reinforce"), "{msg}");
}

#[cfg(not(feature = "mpi"))]
#[test]
fn a_binary_without_mpi_refuses_a_launcher() {
    let d = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_gumbel-moe"))
        .args(["train", "--quiet", "--out"])
        .arg(d.path().join("run"))
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .env("OMPI_COMM_WORLD_RANK", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("OMPI_COMM_WORLD_SIZE=2") && err.contains("--features mpi"), "{err}");
    assert!(!d.path().join("run").exists(), "it trained anyway");
}
