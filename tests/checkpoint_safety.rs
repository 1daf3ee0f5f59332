//! Runs never lose or poison a checkpoint: a second run into a run directory refuses, a resume from
//! an older checkpoint refuses, a diverged update is never saved (and a poisoned checkpoint is
//! never loaded), a torn metrics line does not block a resume, a save stopped at any file-system
//! step leaves a loadable best/, and the command line's messages name the problem.

mod common;
use common::{snapshot, tiny_config, tiny_overrides};
use gumbel_moe::train::{checkpoint, metrics, run_dir, FsSteps, IfRunExists, Trainer};
use std::path::{Path, PathBuf};
use std::process::Command;

fn trainer(extra: &[&str], dir: &Path) -> Trainer {
    let mut t = Trainer::new(tiny_config("gumbel", extra), dir).expect("trainer");
    t.progress = false;
    t
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    v.sort();
    v
}

/// The binary, run in `cwd`; returns (success, stderr).
fn cli(cwd: &Path, args: &[&str]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_gumbel-moe"))
        .args(args)
        .current_dir(cwd)
        .env("RAYON_NUM_THREADS", "1")
        .env_remove("HF_HOME")
        .env_remove("HF_HUB_CACHE")
        .output()
        .unwrap();
    (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stderr), String::from_utf8_lossy(&o.stdout)))
}

/// A tiny config file in `dir` whose data.source is the relative `data/tinyshakespeare.txt`.
fn tiny_toml(dir: &Path, extra: &[&str]) -> PathBuf {
    let mut o = tiny_overrides("gumbel");
    o[0] = "data.source=\"data/tinyshakespeare.txt\"".into();
    o.extend(extra.iter().map(|s| s.to_string()));
    let cfg = gumbel_moe::Config::resolve("", "tiny", &o).unwrap();
    let path = dir.join("tiny.toml");
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    path
}

/// Same run twice into one directory: the second refuses and leaves every file of the first as it
/// was; with --overwrite it replaces the run's files (and only those).
#[test]
fn second_train_into_a_run_dir_refuses_and_keeps_the_first_run() {
    let d = tempfile::tempdir().unwrap();
    let cfg = tiny_toml(d.path(), &["train.max_iters=3"]);
    let cfg = cfg.to_str().unwrap();
    // From a directory without data/: the relative data.source falls back to the crate's copy.
    let (ok, err) = cli(d.path(), &["train", "--config", cfg, "--quiet"]);
    assert!(ok, "{err}");
    let run = d.path().join("runs/tiny");
    assert!(run.join("ckpt-0000003").is_dir() && run.join("best").is_dir(), "{:?}", names(&run));
    std::fs::write(run.join("notes.txt"), "mine").unwrap();
    let before = snapshot(&run);

    let (ok, err) = cli(d.path(), &["train", "--config", cfg, "--quiet"]);
    assert!(!ok, "a second run into {} must refuse", run.display());
    for part in ["already holds a run", "--resume runs/tiny", "--overwrite"] {
        assert!(err.contains(part), "{part:?} not in: {err}");
    }
    assert_eq!(snapshot(&run), before, "the refused run changed the first run's files");
    // The library refuses too.
    let e = format!("{:#}", Trainer::new(tiny_config("gumbel", &[]), &run).err().unwrap());
    assert!(e.contains("already holds a run"), "{e}");

    let (ok, err) = cli(d.path(), &["train", "--config", cfg, "--quiet", "--overwrite", "--set", "train.max_iters=2"]);
    assert!(ok, "{err}");
    assert_eq!(names(&run), ["best", "ckpt-0000002", "config.json", "metrics.jsonl", "notes.txt"]);
    let m = metrics::read(&run.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = m.iter().filter(|v| v.get("event").is_none()).map(|v| v["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [1, 2], "only the new run's lines");
    assert_eq!(std::fs::read_to_string(run.join("notes.txt")).unwrap(), "mine");
}

/// `train` without --config trains the built-in default recipe into runs/shakespeare-char-cpu,
/// from a directory without data/.
#[test]
fn train_without_config_trains_the_default_recipe() {
    let d = tempfile::tempdir().unwrap();
    let sets = ["train.max_iters=1", "train.eval_iters=1", "train.final_full_eval=false", "train.batch_size=2"];
    let mut args = vec!["train", "--quiet"];
    for s in &sets {
        args.extend(["--set", s]);
    }
    let (ok, err) = cli(d.path(), &args);
    assert!(ok, "{err}");
    let run = d.path().join("runs/shakespeare-char-cpu");
    let cfg = checkpoint::load(&run.join("ckpt-0000001")).unwrap().cfg;
    let want = gumbel_moe::Config::from_file(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/shakespeare-char-cpu.toml"),
        &sets.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    )
    .unwrap();
    assert_eq!(cfg.model.router, want.model.router);
    assert_eq!(
        (cfg.model.n_embd, cfg.model.moe.num_experts, cfg.data.source.as_str()),
        (128, 16, "data/tinyshakespeare.txt")
    );
}

/// Resuming from a checkpoint that is not its run's newest refuses and keeps the newer ones and
/// best/; branching off into a new directory works and leaves the run alone.
#[test]
fn resume_from_an_older_checkpoint_refuses_and_keeps_the_newer_ones() {
    let d = tempfile::tempdir().unwrap();
    trainer(&["train.keep_last=2"], d.path()).fit().unwrap();
    assert!(d.path().join("ckpt-0000003").is_dir() && d.path().join("ckpt-0000006").is_dir());
    let before = snapshot(d.path());
    let old = d.path().join("ckpt-0000003");
    let e = format!("{:#}", Trainer::resume(&old, &[], None).err().expect("an older checkpoint must be refused"));
    for part in ["not the newest", "ckpt-0000006", "--out"] {
        assert!(e.contains(part), "{part:?} not in: {e}");
    }
    assert_eq!(snapshot(d.path()), before);
    // --overwrite may not delete the run being resumed.
    let e = format!("{:#}", Trainer::resume_with(d.path(), &[], None, IfRunExists::Overwrite).err().unwrap());
    assert!(e.contains("--overwrite") && e.contains("being resumed"), "{e}");

    // A branch: its own directory, the run untouched.
    let b = tempfile::tempdir().unwrap();
    let branch = b.path().join("branch");
    let mut r = Trainer::resume(&old, &[], Some(&branch)).unwrap();
    r.progress = false;
    assert_eq!(r.state.step, 3);
    r.fit().unwrap();
    assert!(branch.join("ckpt-0000006").is_dir());
    assert_eq!(snapshot(d.path()), before);
    // A branch into a directory that holds a run refuses, like a new run.
    let e = format!("{:#}", Trainer::resume(&old, &[], Some(&branch)).err().unwrap());
    assert!(e.contains("already holds a run"), "{e}");
    assert!(Trainer::resume_with(&old, &[], Some(&branch), IfRunExists::Overwrite).is_ok());
}

/// An update that turns the weights to NaN / infinity is never saved: training stops at that step
/// with an error naming a tensor, and the earlier checkpoints and best/ stay loadable.
#[test]
fn a_diverged_update_is_never_saved() {
    let d = tempfile::tempdir().unwrap();
    let mut t = trainer(&["train.max_iters=3", "train.ckpt_interval=1", "train.keep_last=3"], d.path());
    t.fit().unwrap();
    // A learning rate beyond f32's range: step 4's forward is still finite, its update is not, and
    // step 4 saves a checkpoint (ckpt_interval = 1) before any forward sees the new weights.
    t.cfg.train.lr = 1e39;
    t.cfg.train.min_lr = 1e39;
    t.cfg.train.max_iters = 6;
    let e = format!("{:#}", t.fit().unwrap_err());
    assert!(e.contains("NaN or infinity") && e.contains("step 4") && e.contains("parameter "), "{e}");
    assert!(!d.path().join("ckpt-0000004").exists(), "the diverged step 4 was saved");
    for ck in ["ckpt-0000003", "best"] {
        let ok = Trainer::for_inference(&d.path().join(ck), None).unwrap();
        assert!(ok.full_val_loss().unwrap().is_finite(), "{ck}");
    }
    assert_eq!(run_dir::run_files(d.path()).unwrap().iter().filter(|n| n.starts_with('.')).count(), 0);
}

/// Sets every element of `tensor` in a safetensors file to NaN.
fn poison(file: &Path, tensor: &str) {
    let mut m = candle_core::safetensors::load(file, &candle_core::Device::Cpu).unwrap();
    let t = m.get(tensor).unwrap_or_else(|| panic!("no {tensor} in {}", file.display()));
    let nan = (t.ones_like().unwrap() * f64::NAN).unwrap();
    m.insert(tensor.to_string(), nan);
    candle_core::safetensors::save(&m, file).unwrap();
}

/// `eval`, `generate` and a resume refuse a checkpoint whose weights (or optimizer moments) hold
/// NaN, naming the tensor.
#[test]
fn eval_generate_and_resume_refuse_a_poisoned_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    trainer(&["train.max_iters=3"], d.path()).fit().unwrap();
    let ck = d.path().join("ckpt-0000003");
    poison(&ck.join("model.safetensors"), "ln_f.weight");
    let ck_s = ck.to_str().unwrap();
    for args in [
        vec!["eval", "--checkpoint", ck_s],
        vec!["generate", "--checkpoint", ck_s, "--prompt", "ROMEO:", "--max-new-tokens", "3"],
    ] {
        let (ok, err) = cli(d.path(), &args);
        assert!(!ok, "{} accepted a NaN checkpoint: {err}", args[0]);
        assert!(err.contains("ln_f.weight") && err.contains("NaN"), "{}: {err}", args[0]);
    }
    let e = format!("{:#}", Trainer::resume(&ck, &[], None).err().unwrap());
    assert!(e.contains("ln_f.weight") && e.contains("NaN"), "{e}");

    // The optimizer state too (the weights are fine here).
    let d = tempfile::tempdir().unwrap();
    trainer(&["train.max_iters=3"], d.path()).fit().unwrap();
    let ck = d.path().join("ckpt-0000003");
    poison(&ck.join("optimizer.safetensors"), "v.h.0.attn.c_attn.weight");
    let e = format!("{:#}", Trainer::resume(&ck, &["train.max_iters=6".into()], None).err().unwrap());
    assert!(e.contains("v.h.0.attn.c_attn.weight") && e.contains("NaN"), "{e}");
    assert!(Trainer::for_inference(&ck, None).is_ok(), "the weights alone are fine for eval");
}

/// A kill in the middle of a metrics line leaves it torn; the resume cuts it off and goes on.
#[test]
fn resume_recovers_from_a_torn_metrics_line() {
    let d = tempfile::tempdir().unwrap();
    trainer(&["train.max_iters=3"], d.path()).fit().unwrap();
    let path = d.path().join("metrics.jsonl");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("{\"step\":4,\"train_loss\":3.1,\"lr\":0.0");
    std::fs::write(&path, text).unwrap();
    let mut r = Trainer::resume(d.path(), &["train.max_iters=6".into()], None).expect("resume over a torn line");
    r.progress = false;
    r.fit().unwrap();
    let m = metrics::read(&path).unwrap();
    let steps: Vec<u64> =
        m.iter().filter(|v| v.get("train_loss").is_some()).map(|v| v["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [1, 2, 3, 4, 5, 6]);
    assert_eq!(m.iter().filter(|v| v.get("event").is_some()).count(), 1);
    assert!(std::fs::read_to_string(&path).unwrap().ends_with("}\n"));
}

/// Whether `dir` is a complete checkpoint: every file there and the weights load.
fn assert_loadable(dir: &Path, what: &str) -> u64 {
    let l = checkpoint::load(dir).unwrap_or_else(|e| panic!("{what}: {} does not load: {e:#}", dir.display()));
    for f in ["model.safetensors", "optimizer.safetensors"] {
        candle_core::safetensors::load(l.dir.join(f), &candle_core::Device::Cpu)
            .unwrap_or_else(|e| panic!("{what}: {}/{f}: {e}", l.dir.display()));
    }
    l.state.step
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dst = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &dst);
        } else {
            std::fs::copy(&p, &dst).unwrap();
        }
    }
}

/// A step that replaces best/, saves a checkpoint and prunes the oldest, stopped before each of its
/// file-system steps in turn (as a kill -9 there would): best/ always loads (the old one or the new
/// one, under its name or through the fallback), every ckpt-* is complete, the newest one survives,
/// and the next run puts the directory in order and trains on.
#[test]
fn a_save_stopped_at_any_file_system_step_leaves_a_loadable_best() {
    let base = tempfile::tempdir().unwrap();
    // A shorter text keeps each of the ~50 restarts fast.
    let text = std::fs::read_to_string(common::shakespeare_path()).unwrap();
    let src = base.path().join("head.txt");
    std::fs::write(&src, &text[..200_000]).unwrap();
    let run = base.path().join("run");
    let extra = [
        format!("data.source={:?}", src.display().to_string()),
        "train.max_iters=3".into(),
        "train.eval_interval=1".into(),
        "train.ckpt_interval=1".into(),
        "train.keep_last=2".into(),
        "train.lr=3e-3".into(),
        "train.warmup_iters=1".into(),
    ];
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    trainer(&extra, &run).fit().unwrap();
    let old_best = assert_loadable(&run.join("best"), "base");
    let resume = |dir: &Path| {
        let mut r = Trainer::resume(dir, &["train.max_iters=4".into()], None).expect("resume");
        r.progress = false;
        r
    };
    let mut k = 0;
    loop {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("run");
        copy_dir(&run, &dir);
        let mut r = resume(&dir);
        r.fs = FsSteps::failing_at(k);
        match r.fit() {
            Ok(_) => {
                // Not vacuous: the full step replaced best/, saved ckpt-4 and pruned ckpt-2.
                assert_eq!(assert_loadable(&dir.join("best"), "finished"), 4, "step 4 did not improve best/");
                assert_eq!(names(&dir), ["best", "ckpt-0000003", "ckpt-0000004", "config.json", "metrics.jsonl"]);
                break;
            }
            Err(e) => assert!(format!("{e:#}").contains("as FsSteps::failing_at asked"), "step {k}: {e:#}"),
        }
        // What a reader finds right after the kill.
        let best = assert_loadable(&dir.join("best"), &format!("stopped at step {k}"));
        assert!(best == old_best || best == 4, "stopped at step {k}: best is from step {best}");
        let ckpts = run_dir::checkpoints(&dir).unwrap();
        for (_, p) in &ckpts {
            assert_loadable(p, &format!("stopped at step {k}"));
        }
        for n in names(&dir).iter().filter(|n| n.starts_with("ckpt-") || *n == "best") {
            assert!(dir.join(n).join("trainer_state.json").exists(), "stopped at step {k}: {n} is incomplete");
        }
        assert!(ckpts.last().unwrap().0 >= 3, "stopped at step {k}: the newest checkpoint was lost");
        // The next run recovers: best/ under its name, no leftovers, and it trains on.
        let mut next = resume(&dir);
        assert!(dir.join("best").is_dir(), "stopped at step {k}: best/ not restored");
        next.fit().unwrap_or_else(|e| panic!("stopped at step {k}: the next run failed: {e:#}"));
        let hidden: Vec<String> = names(&dir).into_iter().filter(|n| n.starts_with('.')).collect();
        assert!(hidden.is_empty(), "stopped at step {k}: left {hidden:?}");
        assert_eq!(assert_loadable(&dir, "next run"), 4);
        k += 1;
    }
    eprintln!("stopped and recovered at each of {k} file-system steps");
    assert!(k >= 30, "only {k} file-system steps: the replacement of best/ was not exercised");
}

/// A refused `--set` on resume names the key, both values and the reason.
#[test]
fn a_refused_set_on_resume_names_the_key_and_why() {
    let d = tempfile::tempdir().unwrap();
    trainer(&["train.max_iters=3"], d.path()).fit().unwrap();
    let e = format!("{:#}", Trainer::resume(d.path(), &["model.router.kind=softmax_topk".into()], None).err().unwrap());
    for part in ["model.router.kind", "softmax_topk", "gumbel", "router kind", "--config"] {
        assert!(e.contains(part), "{part:?} not in: {e}");
    }
    assert!(!e.contains("shape"), "{e}");
    let e = format!("{:#}", Trainer::resume(d.path(), &["model.router.input=token".into()], None).err().unwrap());
    assert!(e.contains("model.router.input") && e.contains("table"), "{e}");
    // A key that may change still does.
    assert!(Trainer::resume(d.path(), &["train.max_iters=4".into(), "model.router.tau_min=0.3".into()], None).is_ok());
}

/// A resume with nothing left to train says so (and still finishes the run).
#[test]
fn a_resume_at_max_iters_says_so() {
    let d = tempfile::tempdir().unwrap();
    let cfg = tiny_toml(d.path(), &["train.max_iters=3"]);
    let (ok, err) = cli(d.path(), &["train", "--config", cfg.to_str().unwrap(), "--out", "run", "--quiet"]);
    assert!(ok, "{err}");
    for (sets, step) in [(vec![], "step 3"), (vec!["--set", "train.max_iters=2"], "step 3")] {
        let mut args = vec!["train", "--resume", "run", "--quiet"];
        args.extend(sets);
        let (ok, err) = cli(d.path(), &args);
        assert!(ok, "{err}");
        assert!(err.contains("already at or past train.max_iters") && err.contains(step), "{err}");
    }
}

/// `generate --temperature` takes a finite number >= 0 with a clear message otherwise (a negative
/// number is a value, not an unknown flag), and --help says what 0 means.
#[test]
fn generate_checks_its_temperature_and_documents_zero() {
    let d = tempfile::tempdir().unwrap();
    for bad in ["-1", "nan", "inf", "warm"] {
        let (ok, err) = cli(d.path(), &["generate", "--checkpoint", "nowhere", "--prompt", "x", "--temperature", bad]);
        assert!(!ok, "--temperature {bad} accepted");
        assert!(
            err.contains("temperature") && err.contains(">= 0") && !err.contains("unexpected argument"),
            "{bad}: {err}"
        );
    }
    let (ok, help) = cli(d.path(), &["generate", "--help"]);
    assert!(ok && help.contains("0 = greedy") && help.contains("0 = no limit"), "{help}");
    let (ok, help) = cli(d.path(), &["train", "--help"]);
    assert!(ok && help.contains("--overwrite") && help.contains("--resume"), "{help}");
    // The library refuses too.
    trainer(&["train.max_iters=1"], d.path()).fit().unwrap();
    let t = Trainer::for_inference(d.path(), None).unwrap();
    let s = gumbel_moe::generate::SampleConfig { max_new_tokens: 2, temperature: -1.0, top_k: 0, seed: 1 };
    let ctx = gumbel_moe::nn::Ctx::eval(t.cfg.seed, 1.0);
    let e = gumbel_moe::generate::generate(&t.model, &t.tokenizer, "RO", &s, &t.device, ctx).unwrap_err().to_string();
    assert!(e.contains("temperature") && e.contains(">= 0"), "{e}");
}
