//! Data-parallel training through `mpirun` (feature `mpi`; OpenMPI installed, as `.ci/run` does):
//! two ranks give one process's bits, a killed rank ends the job within seconds naming the rank
//! and leaves a checkpoint that resumes exactly, ranks that disagree are refused, and two ranks
//! that split the experts (`train.expert_parallel = 2`) follow one process.
//!
//!     cargo test --features mpi --test mpi
#![cfg(feature = "mpi")]
mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_gumbel-moe");

/// The tiny test model's settings as `--set` arguments, then `extra`.
fn sets(extra: &[&str]) -> Vec<String> {
    let mut o = common::tiny_overrides("gumbel");
    o.extend(
        ["train.threads=1", "train.grad_accum=2", "train.lr_decay_iters=4000", "train.ckpt_interval=3"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string()),
    );
    o.into_iter().flat_map(|s| ["--set".to_string(), s]).collect()
}

/// `mpirun` as root or not, on a machine of any size, quietly.
fn mpirun() -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--oversubscribe", "--bind-to", "none"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none");
    c
}

fn train_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = vec!["train".to_string(), "--quiet".into(), "--out".into(), out.display().to_string()];
    a.extend(sets(extra));
    a
}

fn ok(o: Output, what: &str) -> Output {
    assert!(o.status.success(), "{what} failed:\n{}", String::from_utf8_lossy(&o.stderr));
    o
}

#[test]
fn two_mpi_ranks_give_the_bits_of_one_process() {
    for accum in ["train.grad_accum=2", "train.grad_accum=4"] {
        let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        ok(Command::new(BIN).args(train_args(one.path(), &[accum])).output().unwrap(), "one process");
        let o = ok(mpirun().args(["-np", "2", BIN]).args(train_args(two.path(), &[accum])).output().unwrap(), "mpirun");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("rank 1 of 2 (mpi)"), "{err}");
        let (a, b) = (common::run_outcome(one.path(), 6), common::run_outcome(two.path(), 6));
        assert!(a.0 == b.0, "{accum}: weights after 6 steps differ");
        assert_eq!(a.1, b.1, "{accum}: logged losses");
        assert_eq!(a.1.len(), 6);
    }
}

#[test]
fn a_killed_rank_ends_the_job_naming_it_and_the_last_checkpoint_resumes_exactly() {
    let run = tempfile::tempdir().unwrap();
    let mut child = mpirun()
        .args(["-np", "2", BIN])
        .args(train_args(run.path(), &["train.max_iters=4000", "train.eval_interval=1000"]))
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Rank 1's pid, from its start-up line.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let pid = loop {
        let line = rx.recv_timeout(Duration::from_secs(120)).expect("rank 1's start-up line");
        seen.push(line.clone());
        if let Some(at) = line.find("rank 1 of 2 (mpi): pid ") {
            break line[at + 23..].split(|c: char| !c.is_ascii_digit()).next().unwrap().to_string();
        }
    };
    let start = Instant::now();
    while !run.path().join("ckpt-0000009").exists() {
        assert!(start.elapsed() < Duration::from_secs(120), "no checkpoint at step 9: {seen:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(Command::new("kill").args(["-9", &pid]).status().unwrap().success());
    let killed = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if killed.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("the job still runs 30 s after rank 1 was killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = killed.elapsed();
    std::thread::sleep(Duration::from_millis(200));
    let said: String = seen.into_iter().chain(rx.try_iter()).collect::<Vec<_>>().join("\n");
    assert!(!status.success(), "mpirun exited 0 after a rank was killed");
    assert!(said.contains("rank 1"), "the message names rank 1:\n{said}");
    assert!(took < Duration::from_secs(20), "ended {took:?} after the kill");

    // The newest checkpoint resumes in one process and continues exactly: 3 more steps give the
    // bits of a run that was never stopped.
    let newest = std::fs::read_dir(run.path())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("ckpt-")?.parse::<usize>().ok())
        .max()
        .unwrap();
    let to = newest + 3;
    let max = format!("train.max_iters={to}");
    let mut resume = vec!["train".to_string(), "--quiet".into(), "--resume".into(), run.path().display().to_string()];
    resume.extend(["--set".to_string(), max.clone()]);
    ok(Command::new(BIN).args(resume).output().unwrap(), "resume");
    let straight = tempfile::tempdir().unwrap();
    let ev = "train.eval_interval=1000";
    ok(Command::new(BIN).args(train_args(straight.path(), &[&max, ev])).output().unwrap(), "straight");
    assert!(
        common::run_outcome(run.path(), to).0 == common::run_outcome(straight.path(), to).0,
        "resumed from step {newest}: weights differ"
    );
}

#[test]
fn ranks_with_different_configs_are_refused_by_name() {
    let run = tempfile::tempdir().unwrap();
    let mut c = mpirun();
    c.args(["-np", "1", BIN]).args(train_args(run.path(), &["train.lr=0.001"]));
    c.args([":", "-np", "1", BIN]).args(train_args(run.path(), &["train.lr=0.002"]));
    let start = Instant::now();
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("rank 1's config differs from rank 0's") && err.contains("lr"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(60));
    assert!(!run.path().join("metrics.jsonl").exists(), "nothing was trained");
}

#[test]
fn two_mpi_ranks_holding_half_the_experts_each_follow_one_process() {
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let moe = ["model.moe_every=1", "model.router.top_m=2"];
    ok(Command::new(BIN).args(train_args(one.path(), &moe)).output().unwrap(), "one process");
    let split: Vec<&str> = moe.iter().copied().chain(["train.expert_parallel=2"]).collect();
    ok(mpirun().args(["-np", "2", BIN]).args(train_args(two.path(), &split)).output().unwrap(), "mpirun");
    let loss = |dir: &Path| -> Vec<f64> {
        common::run_outcome(dir, 6)
            .1
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["train_loss"].as_f64().unwrap())
            .collect()
    };
    let (a, b) = (loss(one.path()), loss(two.path()));
    assert_eq!(a.len(), 6);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((x - y).abs() <= 1e-5 * x.abs(), "step {}: {y} with the experts split vs {x}", i + 1);
    }
}
