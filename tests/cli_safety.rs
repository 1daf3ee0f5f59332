//! What a new user of `import-hf`, `export-hf`, `train`, `generate` and `compare` could lose,
//! and errors that must name the right thing. One test per item, named after it: `lost_N_*` for
//! the six ways to lose data or hang, `says_N_*` for the ten unclear errors.

mod common;

use common::{snapshot, tiny_config};
use gumbel_moe::data::{HubOptions, Tokenizer, TokenizerKind};
use gumbel_moe::generate::{generate_streaming, SampleConfig, MAX_NEW_TOKENS};
use gumbel_moe::hf::export::{write_safetensors, LOGITS_FILE};
use gumbel_moe::hf::{export_hf, import_hf, ExportOptions, ImportOptions};
use gumbel_moe::nn::Ctx;
use gumbel_moe::report::{compare, plan_runs, CompareArgs};
use gumbel_moe::train::{checkpoint, memory, Trainer};
use gumbel_moe::Config;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// The tiny Qwen2-MoE fixture (tied) as a folder.
fn qwen() -> PathBuf {
    fixture("hf-tiny-qwen2-moe")
}

/// The tiny Mixtral fixture (untied): its files live in the hub cache layout.
fn mixtral() -> PathBuf {
    let snaps = fixture("hf-cache/hub/models--gumbel-moe-fixtures--tiny-mixtral/snapshots");
    std::fs::read_dir(snaps).unwrap().next().unwrap().unwrap().path()
}

fn import_to(from: &Path, out: &Path) -> anyhow::Result<()> {
    let opts = ImportOptions { hub: HubOptions { cache_dir: None, offline: true }, ..Default::default() };
    import_hf(&from.display().to_string(), out, &opts).map(|_| ())
}

/// The binary, run in `cwd`; returns (success, stderr + stdout).
fn cli(cwd: &Path, args: &[&str]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_gumbel-moe"))
        .args(args)
        .current_dir(cwd)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stderr), String::from_utf8_lossy(&o.stdout)))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

fn first_line(e: &anyhow::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

// ---------------------------------------------------------------------------------------------
// Data loss, crashes, hangs

/// Item 1: `--out ck_mix` (a bare relative name, also `ck_mix/`) used to exit 1 with "cannot open
/// to sync it" after writing the checkpoint, and a retry was refused.
#[test]
fn lost_1_import_hf_into_a_bare_relative_out_succeeds() {
    let d = tempfile::tempdir().unwrap();
    let from = qwen().display().to_string();
    for out in ["ck_mix", "ck_two/"] {
        let (ok, text) = cli(d.path(), &["import-hf", "--from", &from, "--out", out]);
        assert!(ok, "{out}: {text}");
        let ck = d.path().join(out.trim_end_matches('/'));
        assert!(checkpoint::load(&ck).is_ok(), "{out}");
    }
}

/// Item 2: `export-hf --checkpoint RUN/best --out RUN` (or a checkpoint of the run, or the source
/// itself) used to overwrite the run's config.json and weights with the HF ones.
#[test]
fn lost_2_export_hf_never_writes_into_a_checkpoint_or_a_run() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    import_to(&qwen(), &run.join("best")).unwrap();
    copy_dir(&run.join("best"), &run.join("ckpt-0000020"));
    std::fs::write(run.join("config.json"), std::fs::read(run.join("best/config.json")).unwrap()).unwrap();
    std::fs::write(run.join("metrics.jsonl"), "{\"event\":\"done\"}\n").unwrap();
    let before = snapshot(&run);
    for out in [run.clone(), run.join("ckpt-0000020"), run.join("best")] {
        for overwrite in [false, true] {
            let opts = ExportOptions { overwrite, ..Default::default() };
            let e = export_hf(&run.join("best"), &out, &opts).unwrap_err();
            assert!(first_line(&e).contains("checkpoint or run"), "{}: {e:#}", out.display());
        }
    }
    assert!(before == snapshot(&run), "the run was changed");
    assert!(checkpoint::load(&run.join("best")).is_ok());
}

/// Item 3: `export-hf` into a folder holding a user's config.json used to replace it; over an
/// older export without `--with-logits` it left the old logits for the check script.
#[test]
fn lost_3_export_hf_refuses_a_non_empty_folder_and_drops_stale_logits() {
    let d = tempfile::tempdir().unwrap();
    let ck = d.path().join("ck");
    import_to(&qwen(), &ck).unwrap();
    let mine = d.path().join("mine");
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(mine.join("config.json"), "my own config").unwrap();
    let e = export_hf(&ck, &mine, &ExportOptions::default()).unwrap_err();
    assert!(first_line(&e).contains("not empty") && e.to_string().contains("--overwrite"), "{e:#}");
    assert_eq!(std::fs::read_to_string(mine.join("config.json")).unwrap(), "my own config");

    let ex = d.path().join("ex");
    export_hf(&ck, &ex, &ExportOptions { with_logits: true, ..Default::default() }).unwrap();
    assert!(ex.join(LOGITS_FILE).exists());
    assert!(export_hf(&ck, &ex, &ExportOptions::default()).is_err(), "a second export needs --overwrite");
    export_hf(&ck, &ex, &ExportOptions { overwrite: true, ..Default::default() }).unwrap();
    assert!(!ex.join(LOGITS_FILE).exists(), "stale logits left for scripts/check_hf_export.py");
}

/// A base config for `compare` and a run folder `OUT/NAME` trained with another config, holding
/// `marker`.
fn stale_run(out: &Path, name: &str, marker: &str) {
    let dir = out.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let other = Config::resolve("", "other", &["model.router.tau_min=0.3".into()]).unwrap();
    std::fs::write(dir.join("config.json"), other.to_json().unwrap()).unwrap();
    std::fs::write(dir.join("marker"), marker).unwrap();
}

fn compare_args(d: &Path, out: &Path) -> CompareArgs {
    let base = d.join("base.toml");
    std::fs::write(&base, "seed = 7\n").unwrap();
    CompareArgs {
        config: base,
        routers: vec!["gumbel".into()],
        variants: vec![],
        sets: vec![],
        steps: Some(2),
        seeds: 1,
        baseline: None,
        jobs: 1,
        out: out.to_path_buf(),
    }
}

/// Every file named `marker` under `dir`, its contents.
fn markers(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = snapshot(dir)
        .into_iter()
        .filter(|(k, _)| k.ends_with("marker"))
        .map(|(_, b)| String::from_utf8(b).unwrap())
        .collect();
    v.sort();
    v
}

/// Item 4: a second re-run of `compare` after a config change deleted the original runs (only
/// one `.prev/` generation was kept). The trainings themselves fail here (no binary): what is
/// checked is the folders moved aside.
#[test]
fn lost_4_compare_keeps_every_earlier_generation() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("cmp");
    let args = compare_args(d.path(), &out);
    let exe = d.path().join("no-such-binary");
    for generation in ["first", "second"] {
        stale_run(&out, "gumbel", generation);
        let _ = compare(&exe, &args);
    }
    assert_eq!(markers(&out.join(".prev")), ["first", "second"]);
}

/// Item 5: the parameter count and the memory estimate are said first, and a model too large for
/// the machine is refused before it is built (it used to allocate for 45 s and abort).
#[test]
fn lost_5_a_model_too_large_for_the_machine_is_refused_before_it_is_built() {
    let huge = ["model.n_layer=200", "model.n_embd=1024", "model.moe.num_experts=8", "model.moe.expert_hidden=4096"];
    let mut cfg = tiny_config("gumbel", &huge);
    cfg.model.vocab_size = 65;
    let est = memory::estimate(&cfg);
    assert!(est.params > 10_000_000_000 && est.total() > 16 * est.params, "{est}");
    let e = memory::check(&cfg, Some((8 << 30, "a test's 8 GiB".into()))).unwrap_err().to_string();
    for want in ["too large", &est.params.to_string(), "8.0 GiB", "--ignore-memory-check"] {
        assert!(e.contains(want), "{want} not in: {e}");
    }
    assert!(memory::check(&tiny_config("gumbel", &[]).with_vocab(65), Some((8 << 30, "8 GiB".into()))).is_ok());
    // Through the trainer, with this machine's own figure (none off Linux: nothing to refuse).
    if memory::available().is_some_and(|(b, _)| b < est.total()) {
        let e = Trainer::new(tiny_config("gumbel", &huge), tempfile::tempdir().unwrap().path()).err().unwrap();
        assert!(first_line(&e).contains("too large"), "{e:#}");
    }
}

/// The count the estimate uses is the model's own, for every router and layout.
#[test]
fn lost_5_the_parameter_count_is_the_built_models() {
    let cases: [&[&str]; 7] = [
        &[],
        &["model.router.kind=noisy_topk", "model.tie_embeddings=false", "model.bias=false"],
        &["model.router.kind=sigmoid_bias", "model.norm=\"rms\"", "model.positions=\"rotary\""],
        &["model.router.kind=hash", "model.moe_every=2", "model.moe.activation=\"swiglu\""],
        &["model.router.kind=softmax_topk", "model.router.input=\"token\"", "model.n_kv_head=1"],
        &["model.moe_every=0"],
        &["model.router.kind=reinforce", "model.moe.expert_hidden=0"],
    ];
    for extra in cases {
        let t = Trainer::new(tiny_config("gumbel", extra), tempfile::tempdir().unwrap().path()).unwrap();
        assert_eq!(memory::param_count(&t.cfg), t.params.num_elements() as u64, "{extra:?}");
    }
}

trait WithVocab {
    fn with_vocab(self, v: usize) -> Self;
}

impl WithVocab for Config {
    fn with_vocab(mut self, v: usize) -> Self {
        self.model.vocab_size = v;
        self
    }
}

/// Item 6: `generate` printed nothing until the end and took any `--max-new-tokens`. Each
/// token's text now comes as it is sampled, and the request is bounded.
#[test]
fn lost_6_generate_streams_each_token_and_bounds_the_request() {
    let d = tempfile::tempdir().unwrap();
    let t = Trainer::new(tiny_config("gumbel", &[]), d.path()).unwrap();
    let s = SampleConfig { max_new_tokens: 20, temperature: 0.8, top_k: 0, seed: 3 };
    let mut pieces: Vec<String> = Vec::new();
    let text = generate_streaming(&t.model, &t.tokenizer, "ROMEO:", &s, &t.device, Ctx::eval(1, 1.0), &mut |p| {
        pieces.push(p.to_string());
        Ok(())
    })
    .unwrap();
    assert_eq!(pieces.len(), 21, "the prompt, then one piece per token");
    assert_eq!(pieces[0], "ROMEO:");
    assert_eq!(pieces.concat(), text);
    let (ok, out) = cli(
        d.path(),
        &["generate", "--checkpoint", "nope", "--prompt", "a", "--max-new-tokens", &u64::MAX.to_string()],
    );
    assert!(!ok && out.contains(&format!("maximum of {MAX_NEW_TOKENS}")), "{out}");
}

// ---------------------------------------------------------------------------------------------
// Unclear or misleading errors

/// Item 1: an index whose shards point outside the model folder was accepted.
#[test]
fn says_1_import_hf_refuses_shards_outside_the_model_folder() {
    let d = tempfile::tempdir().unwrap();
    let (model, other) = (d.path().join("m"), d.path().join("other"));
    std::fs::create_dir_all(&model).unwrap();
    std::fs::create_dir_all(&other).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(qwen().join(f), model.join(f)).unwrap();
    }
    std::fs::copy(qwen().join("model.safetensors"), other.join("model.safetensors")).unwrap();
    let index = serde_json::json!({"metadata": {}, "weight_map": {"lm_head.weight": "../other/model.safetensors"}});
    std::fs::write(model.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let e = import_to(&model, &d.path().join("ck")).unwrap_err();
    assert!(first_line(&e).contains("outside the model folder"), "{e:#}");
    assert!(!d.path().join("ck").exists());
}

/// Item 2: a tokenizer.json that is valid JSON but not a tokenizer was reported as a syntax error.
#[test]
fn says_2_valid_json_that_is_not_a_tokenizer_is_called_so() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("tokenizer.json");
    std::fs::write(&p, r#"{"hello": 1}"#).unwrap();
    let e = Tokenizer::load(&p, &TokenizerKind::Hf).err().unwrap();
    assert!(first_line(&e).contains("valid JSON but not a Hugging Face tokenizer"), "{e:#}");
}

/// Item 3: a NaN in the input model was blamed on training ("training diverged") under our name.
#[test]
fn says_3_import_hf_blames_a_nan_on_the_input_and_names_the_hf_tensor() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("m");
    copy_dir(&qwen(), &model);
    let file = model.join("model.safetensors");
    let mut m = candle_core::safetensors::load(&file, &candle_core::Device::Cpu).unwrap();
    let nan = (m["model.norm.weight"].ones_like().unwrap() * f64::NAN).unwrap();
    m.insert("model.norm.weight".into(), nan);
    let mut v: Vec<(String, candle_core::Tensor)> = m.into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    write_safetensors(&file, &v).unwrap();
    let e = import_to(&model, &d.path().join("ck")).unwrap_err();
    let line = first_line(&e);
    assert!(line.contains("model.norm.weight") && line.contains("input model") && !line.contains("diverged"), "{e:#}");
}

/// Item 4: `export-hf --tied` on an untied model exited 0, silently ignoring the flag.
#[test]
fn says_4_export_hf_tied_on_an_untied_model_refuses() {
    let d = tempfile::tempdir().unwrap();
    let ck = d.path().join("ck");
    import_to(&mixtral(), &ck).unwrap();
    let e = export_hf(&ck, &d.path().join("ex"), &ExportOptions { tied: true, ..Default::default() }).unwrap_err();
    assert!(first_line(&e).contains("--tied") && first_line(&e).contains("untied"), "{e:#}");
    assert!(!d.path().join("ex").exists());
}

/// Item 5: an unknown `--set` value was blamed on the config file (or the checkpoint's config.json).
#[test]
fn says_5_an_unknown_set_value_names_the_set_and_the_known_values() {
    let set = ["model.router.kind=bogus".to_string()];
    for r in [Config::default_recipe(&set), Config::resolve("", "CKPT/config.json", &set)] {
        let e = r.unwrap_err();
        let line = first_line(&e);
        assert!(line.starts_with("--set model.router.kind=bogus") && line.contains("known:"), "{e:#}");
        assert!(!line.contains("config.json") && !line.contains(".toml"), "{e:#}");
    }
    // A bad value in the file itself is still the file's.
    let e = Config::resolve("[model.router]\nkind = \"bogus\"\n", "my.toml", &set[..0]).unwrap_err();
    assert!(first_line(&e).starts_with("my.toml"), "{e:#}");
}

/// Item 6: `train.lr = inf` passed validation and died at step 1 as "training diverged".
#[test]
fn says_6_an_infinite_learning_rate_is_refused_naming_the_key() {
    for set in ["train.lr=inf", "train.min_lr=inf", "train.weight_decay=nan", "train.grad_clip=inf"] {
        let e = Config::default_recipe(&[set.to_string()]).unwrap_err();
        let key = set.split('=').next().unwrap();
        assert!(first_line(&e).contains(key), "{set}: {e:#}");
    }
}

/// Item 7: the weights were written 0600 whatever the umask (the other files 0644), and another
/// user's read failed as "unreadable (truncated or not safetensors)".
#[cfg(unix)]
#[test]
fn says_7_checkpoint_weights_respect_the_umask_and_denial_is_said_first() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let ck = d.path().join("ck");
    import_to(&qwen(), &ck).unwrap();
    let mode = |f: &str| std::fs::metadata(ck.join(f)).unwrap().permissions().mode() & 0o777;
    for f in ["model.safetensors", "optimizer.safetensors"] {
        assert_eq!(mode(f), mode("config.json"), "{f}: {:o} vs config.json {:o}", mode(f), mode("config.json"));
    }
    let w = ck.join("model.safetensors");
    std::fs::set_permissions(&w, std::fs::Permissions::from_mode(0o000)).unwrap();
    if std::fs::File::open(&w).is_ok() {
        eprintln!("running as root: a mode-000 file is still readable, the denial cannot be checked here");
        return;
    }
    let l = checkpoint::load(&ck).unwrap();
    let Err(e) = gumbel_moe::hf::export::load_model(&l.dir, &l.cfg) else { panic!("a mode-000 file was read") };
    assert!(first_line(&e).starts_with("permission denied"), "{e:#}");
}

/// Item 8: `compare --jobs 0` silently ran one job.
#[test]
fn says_8_compare_refuses_jobs_0() {
    let d = tempfile::tempdir().unwrap();
    let mut args = compare_args(d.path(), &d.path().join("cmp"));
    args.jobs = 0;
    let Err(e) = compare(&d.path().join("no-such-binary"), &args) else { panic!("--jobs 0 accepted") };
    assert!(first_line(&e).contains("--jobs"), "{e:#}");
}

/// Item 9: `compare --steps 10 --set train.max_iters=20`: --steps silently won.
#[test]
fn says_9_compare_refuses_steps_with_a_set_of_the_budget() {
    for set in ["train.max_iters=20", "train.lr_decay_iters=20"] {
        let e = plan_runs(&["gumbel".into()], &[], &[set.into()], Some(10)).unwrap_err();
        assert!(first_line(&e).contains("--steps 10") && first_line(&e).contains(set), "{e:#}");
    }
    assert!(plan_runs(&["gumbel".into()], &[], &["train.lr=0.01".into()], Some(10)).is_ok());
}

/// Item 10: `compare --out` into a training run's folder replaced its val_loss.png and
/// train_loss.png.
#[test]
fn says_10_compare_refuses_to_write_into_a_training_run() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::write(run.join("metrics.jsonl"), "{}\n").unwrap();
    std::fs::write(run.join("val_loss.png"), "the run's own plot").unwrap();
    let before = snapshot(&run);
    let Err(e) = compare(&d.path().join("no-such-binary"), &compare_args(d.path(), &run)) else { panic!("accepted") };
    assert!(first_line(&e).contains("training run"), "{e:#}");
    assert!(before == snapshot(&run));
}
