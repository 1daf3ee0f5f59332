//! Hugging Face interop against fixtures made by transformers (scripts/make_hf_fixtures.py): a
//! tiny Mixtral (GQA, top-2, untied) and a tiny Qwen2-MoE (GQA, a dense block, Switch top-1, tied),
//! with the logits and the greedy decoding transformers computes. No network, no Python.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use gumbel_moe::data::HubOptions;
use gumbel_moe::generate::{generate_ids, SampleConfig};
use gumbel_moe::hf::export::{load_model, plan, write_safetensors, LOGITS_FILE};
use gumbel_moe::hf::{export_hf, import_hf, ExportOptions, Format, ImportOptions};
use gumbel_moe::nn::Ctx;
use gumbel_moe::train::checkpoint;
use gumbel_moe::train::schedule::tau_at;
use gumbel_moe::{Config, Gpt};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const TOL: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn hub_cache() -> HubOptions {
    HubOptions { cache_dir: Some(fixture("hf-cache/hub")), offline: true }
}

/// The Mixtral fixture: its files live in the hub cache layout (one copy), read here as a folder.
fn mixtral_dir() -> PathBuf {
    let snaps = fixture("hf-cache/hub/models--gumbel-moe-fixtures--tiny-mixtral/snapshots");
    std::fs::read_dir(snaps).unwrap().next().unwrap().unwrap().path()
}

fn expected(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("expected.safetensors"), &Device::Cpu).unwrap()
}

fn import(from: &str, router: Option<&str>, sets: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("ckpt");
    let opts = ImportOptions {
        router: router.map(String::from),
        sets: sets.iter().map(|s| s.to_string()).collect(),
        hub: hub_cache(),
    };
    import_hf(from, &out, &opts).unwrap();
    (d, out)
}

fn model_of(ckpt: &Path) -> (Config, Gpt, Ctx) {
    let l = checkpoint::load(ckpt).unwrap();
    let (_p, model) = load_model(&l.dir, &l.cfg).unwrap();
    let ctx = Ctx::eval(l.cfg.seed, tau_at(&l.cfg.model.router, l.state.step as usize));
    (l.cfg, model, ctx)
}

/// Our logits (B, T, V) for (B, T) i64 ids.
fn logits(ckpt: &Path, ids: &Tensor) -> Tensor {
    let (_, model, ctx) = model_of(ckpt);
    model.forward(&ids.to_dtype(DType::U32).unwrap(), &ctx).unwrap().logits
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

fn check_logits(ckpt: &Path, fixture_name: &str) -> f32 {
    let e = expected(fixture_name);
    let d = max_diff(&logits(ckpt, &e["input_ids"]), &e["logits"]);
    assert!(d <= TOL, "{fixture_name}: max |logit difference| {d} > {TOL}");
    eprintln!("{fixture_name}: max |logit difference| to transformers {d:.2e}");
    d
}

#[test]
fn mixtral_import_matches_transformers_on_both_attention_paths() {
    let dir = mixtral_dir().display().to_string();
    for sets in [&[][..], &["model.fused_layers=false", "model.router.impl=reference"][..]] {
        let (_d, ckpt) = import(&dir, None, sets);
        let cfg = checkpoint::load(&ckpt).unwrap().cfg;
        assert_eq!((cfg.model.n_head, cfg.n_kv_head(), cfg.model.tie_embeddings), (4, 2, false));
        assert_eq!(
            (cfg.model.router.kind.as_str(), cfg.model.router.top_m, cfg.model.norm_eps),
            ("softmax_topk", 2, 1e-5)
        );
        check_logits(&ckpt, "hf-tiny-mixtral");
    }
    // The fixture's router choices are far from ties: a wrong detail is far off (eps here).
    let (_d, ckpt) = import(&dir, None, &["model.norm_eps=1e-3"]);
    let e = expected("hf-tiny-mixtral");
    assert!(max_diff(&logits(&ckpt, &e["input_ids"]), &e["logits"]) > 1e-3);
}

#[test]
fn qwen2_moe_import_matches_transformers() {
    let (_d, ckpt) = import(&fixture("hf-tiny-qwen2-moe").display().to_string(), None, &[]);
    let cfg = checkpoint::load(&ckpt).unwrap().cfg;
    assert_eq!((cfg.model.moe_every, cfg.model.tie_embeddings, cfg.model.norm_eps), (2, true, 1e-6));
    assert_eq!((cfg.model.router.kind.as_str(), cfg.model.router.top_m), ("softmax_topk", 1));
    check_logits(&ckpt, "hf-tiny-qwen2-moe");
}

#[test]
fn gumbel_router_import_keeps_the_routing() {
    let (_d, ckpt) = import(&mixtral_dir().display().to_string(), Some("gumbel"), &[]);
    let cfg = checkpoint::load(&ckpt).unwrap().cfg;
    assert_eq!((cfg.model.router.kind.as_str(), cfg.model.router.hard, cfg.model.router.top_m), ("gumbel", false, 2));
    check_logits(&ckpt, "hf-tiny-mixtral");
}

fn tensors(path: &Path) -> Vec<(String, Vec<usize>, Vec<u8>, safetensors::Dtype)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<_> =
        st.tensors().into_iter().map(|(n, t)| (n, t.shape().to_vec(), t.data().to_vec(), t.dtype())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn metadata(path: &Path) -> Option<HashMap<String, String>> {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    meta.metadata().clone()
}

#[test]
fn hub_import_offline_equals_folder_import() {
    let (_a, from_hub) = import("hf://gumbel-moe-fixtures/tiny-mixtral", None, &[]);
    let (_b, from_dir) = import(&mixtral_dir().display().to_string(), None, &[]);
    let (h, d) = (tensors(&from_hub.join("model.safetensors")), tensors(&from_dir.join("model.safetensors")));
    assert_eq!(h, d);
    check_logits(&from_hub, "hf-tiny-mixtral");
    let err = import_hf(
        "hf://gumbel-moe-fixtures/no-such-model",
        Path::new("/nonexistent/x"),
        &ImportOptions { hub: hub_cache(), ..Default::default() },
    );
    assert!(err.is_err());
}

#[test]
fn import_then_export_reproduces_the_fixtures_bit_for_bit() {
    for (dir, tied, format) in [(mixtral_dir(), false, "mixtral"), (fixture("hf-tiny-qwen2-moe"), true, "qwen2_moe")] {
        let (d, ckpt) = import(&dir.display().to_string(), None, &[]);
        let out = d.path().join("export");
        let opts = ExportOptions { format: None, tied, ..Default::default() };
        assert_eq!(export_hf(&ckpt, &out, &opts).unwrap().format.model_type(), format);
        assert_eq!(tensors(&out.join("model.safetensors")), tensors(&dir.join("model.safetensors")), "{format}");
        assert_eq!(metadata(&out.join("model.safetensors")).unwrap()["format"], "pt");
        let read =
            |p: PathBuf| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap() };
        let (ours, theirs) = (read(out.join("config.json")), read(dir.join("config.json")));
        for key in [
            "model_type",
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "hidden_act",
            "rms_norm_eps",
            "rope_parameters",
            "num_experts_per_tok",
            "tie_word_embeddings",
            "num_local_experts",
            "num_experts",
            "moe_intermediate_size",
            "decoder_sparse_step",
            "norm_topk_prob",
            "shared_expert_intermediate_size",
            "qkv_bias",
            "router_aux_loss_coef",
            "bos_token_id",
            "eos_token_id",
            "max_position_embeddings",
        ] {
            assert_eq!(ours.get(key), theirs.get(key), "{format}: config.json key {key}");
        }
        assert_eq!(ours["rope_theta"], 10000.0);
        assert!(ours["sliding_window"].is_null());
        assert!(out.join("tokenizer.json").is_file() && out.join("tokenizer_config.json").is_file());
    }
}

#[test]
fn fused_expert_names_import_as_the_per_expert_ones() {
    let src = mixtral_dir();
    let d = tempfile::tempdir().unwrap();
    let fused = d.path().join("fused");
    std::fs::create_dir(&fused).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), fused.join(f)).unwrap();
    }
    let map = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut out: Vec<(String, Tensor)> = Vec::new();
    for (name, t) in &map {
        if !name.contains("block_sparse_moe") {
            out.push((name.clone(), t.clone()));
        }
    }
    for i in 0..2 {
        let p = format!("model.layers.{i}.block_sparse_moe");
        let w = |e: usize, n: &str| map[&format!("{p}.experts.{e}.{n}.weight")].clone();
        let gate_up: Vec<Tensor> = (0..4).map(|e| Tensor::cat(&[w(e, "w1"), w(e, "w3")], 0).unwrap()).collect();
        let down: Vec<Tensor> = (0..4).map(|e| w(e, "w2")).collect();
        out.push((format!("model.layers.{i}.mlp.experts.gate_up_proj"), Tensor::stack(&gate_up, 0).unwrap())); // (E, 2I, C)
        out.push((format!("model.layers.{i}.mlp.experts.down_proj"), Tensor::stack(&down, 0).unwrap())); // (E, C, I)
        out.push((format!("model.layers.{i}.mlp.gate.weight"), map[&format!("{p}.gate.weight")].clone()));
    }
    write_safetensors(&fused.join("model.safetensors"), &out).unwrap();
    let (_a, a) = import(&fused.display().to_string(), None, &[]);
    let (_b, b) = import(&src.display().to_string(), None, &[]);
    assert_eq!(tensors(&a.join("model.safetensors")), tensors(&b.join("model.safetensors")));
}

/// A copy of the imported Mixtral fixture with its config changed by `edit`.
fn with_config(ckpt: &Path, dir: &Path, edit: impl Fn(&mut Config)) -> PathBuf {
    let out = dir.join(format!("ckpt-{}", std::fs::read_dir(dir).unwrap().count()));
    std::fs::create_dir(&out).unwrap();
    for f in std::fs::read_dir(ckpt).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, out.join(f.file_name().unwrap())).unwrap();
    }
    let mut cfg = checkpoint::load(ckpt).unwrap().cfg;
    edit(&mut cfg);
    std::fs::write(out.join("config.json"), cfg.to_json().unwrap()).unwrap();
    out
}

#[test]
fn exports_of_other_routers_reimport_with_the_same_eval_logits() {
    let (d, ckpt) = import(&mixtral_dir().display().to_string(), None, &[]);
    let ids = &expected("hf-tiny-mixtral")["input_ids"];
    type Case = (&'static str, Box<dyn Fn(&mut Config)>, Format, Option<&'static str>);
    let cases: Vec<Case> = vec![
        (
            "soft gumbel tau 0.5",
            Box::new(|c: &mut Config| {
                let r = &mut c.model.router;
                (r.kind, r.hard, r.top_m, r.prefilter, r.tau0, r.tau_min) =
                    ("gumbel".parse().unwrap(), false, 2, 3, 0.5, 0.5);
            }),
            Format::Mixtral,
            None,
        ),
        (
            "hard gumbel m=1",
            Box::new(|c: &mut Config| {
                let r = &mut c.model.router;
                (r.kind, r.hard, r.top_m) = ("gumbel".parse().unwrap(), true, 1);
            }),
            Format::Mixtral,
            Some("gumbel"),
        ),
        ("switch m=1", Box::new(|c: &mut Config| c.model.router.top_m = 1), Format::Qwen2Moe, None),
        ("dense", Box::new(|c: &mut Config| c.model.router.kind = "dense".parse().unwrap()), Format::Mixtral, None),
    ];
    for (name, edit, format, router) in cases {
        let ours = with_config(&ckpt, d.path(), edit);
        let want = logits(&ours, ids);
        let out = d.path().join(format!("export-{name}"));
        let p = export_hf(&ours, &out, &ExportOptions::default()).unwrap();
        assert_eq!(p.format, format, "{name}");
        let back = d.path().join(format!("back-{name}"));
        let opts = ImportOptions { router: router.map(String::from), hub: hub_cache(), ..Default::default() };
        import_hf(&out.display().to_string(), &back, &opts).unwrap();
        let diff = max_diff(&logits(&back, ids), &want);
        assert!(diff <= TOL, "{name}: {diff}");
    }
}

#[test]
fn export_refusals_name_the_key() {
    let (_d, ckpt) = import(&mixtral_dir().display().to_string(), None, &[]);
    let base = checkpoint::load(&ckpt).unwrap().cfg;
    type Edit = fn(&mut Config);
    let cases: [(&str, Edit, Option<Format>); 13] = [
        ("model.norm", |c| c.model.norm = "layer".parse().unwrap(), None),
        ("model.bias", |c| c.model.bias = true, None),
        ("model.positions", |c| c.model.positions = "learned".parse().unwrap(), None),
        ("model.moe.activation", |c| c.model.moe.activation = "gelu".parse().unwrap(), None),
        ("model.moe.capacity_factor", |c| c.model.moe.capacity_factor = 1.25, None),
        ("model.router.input", |c| c.model.router.input = "token".parse().unwrap(), None),
        ("model.router.kind", |c| c.model.router.kind = "hash".parse().unwrap(), None),
        ("model.router.kind", |c| c.model.router.kind = "sigmoid_bias".parse().unwrap(), None),
        (
            "model.router.eval_mode",
            |c| {
                (c.model.router.kind, c.model.router.eval_mode) = ("gumbel".parse().unwrap(), "sample".parse().unwrap())
            },
            None,
        ),
        ("model.router.hard", |c| (c.model.router.kind, c.model.router.hard) = ("gumbel".parse().unwrap(), true), None),
        ("model.moe_every", |c| c.model.moe_every = 2, Some(Format::Mixtral)),
        ("model.router.top_m", |c| c.model.router.top_m = 1, Some(Format::Mixtral)),
        ("model.moe_every", |c| c.model.moe_every = 0, None),
    ];
    assert!(plan(&base, Some(Format::Mixtral), 0).is_ok());
    for (key, edit, format) in cases {
        let mut cfg = base.clone();
        edit(&mut cfg);
        let err = plan(&cfg, format, 0).unwrap_err().to_string();
        assert!(err.contains(&format!("`{key}`")), "{key}: {err}");
    }
}

/// A copy of fixture folder `src` with its config.json edited (and optionally its tensors).
fn edited(src: &Path, dir: &Path, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let out = dir.join(format!("hf-{}", std::fs::read_dir(dir).unwrap().count()));
    std::fs::create_dir(&out).unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.join(f), out.join(f)).unwrap();
    }
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(out.join("config.json"), v.to_string()).unwrap();
    out
}

#[test]
fn import_refusals_name_the_key() {
    let d = tempfile::tempdir().unwrap();
    let (mix, qwen) = (mixtral_dir(), fixture("hf-tiny-qwen2-moe"));
    type Edit = fn(&mut serde_json::Value);
    let cases: [(&Path, &str, Edit); 10] = [
        (&mix, "hidden_act", |v| v["hidden_act"] = "gelu".into()),
        (&mix, "rope_parameters.rope_type", |v| v["rope_parameters"]["rope_type"] = "yarn".into()),
        (&mix, "rope_scaling", |v| v["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 2.0})),
        (&mix, "head_dim", |v| v["head_dim"] = 16.into()),
        (&mix, "sliding_window", |v| v["sliding_window"] = 32.into()),
        (&mix, "model_type", |v| v["model_type"] = "qwen3_moe".into()),
        (&mix, "num_experts_per_tok", |v| v["num_experts_per_tok"] = 1.into()),
        (&qwen, "norm_topk_prob", |v| v["num_experts_per_tok"] = 2.into()),
        (&qwen, "mlp_only_layers", |v| v["mlp_only_layers"] = serde_json::json!([0])),
        (&qwen, "intermediate_size", |v| v["intermediate_size"] = 64.into()),
    ];
    for (i, (src, key, edit)) in cases.into_iter().enumerate() {
        let from = edited(src, d.path(), edit);
        let err = import_hf(&from.display().to_string(), &d.path().join(format!("out-{i}")), &ImportOptions::default())
            .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(&format!("`{key}`")), "{key}: {msg}");
    }
    // A live shared expert or attention bias cannot be dropped.
    let map = candle_core::safetensors::load(qwen.join("model.safetensors"), &Device::Cpu).unwrap();
    for (name, key) in [
        ("model.layers.1.mlp.shared_expert.down_proj.weight", "shared_expert_intermediate_size"),
        ("model.layers.0.self_attn.q_proj.bias", "qkv_bias"),
    ] {
        let from = edited(&qwen, d.path(), |_| {});
        let mut t: Vec<(String, Tensor)> = map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let shape = if name.ends_with("bias") { vec![32] } else { map[name].dims().to_vec() };
        t.retain(|(k, _)| k != name);
        t.push((name.into(), Tensor::ones(shape, DType::F32, &Device::Cpu).unwrap()));
        if name.ends_with("bias") {
            // The other layers' absent biases are fine; one non-zero bias is refused.
        } else {
            for p in ["gate_proj", "up_proj"] {
                let n = format!("model.layers.1.mlp.shared_expert.{p}.weight");
                t.retain(|(k, _)| *k != n);
                t.push((n, Tensor::ones((1, 32), DType::F32, &Device::Cpu).unwrap()));
            }
        }
        write_safetensors(&from.join("model.safetensors"), &t).unwrap();
        let err =
            import_hf(&from.display().to_string(), &d.path().join(format!("out-{key}")), &ImportOptions::default())
                .unwrap_err();
        assert!(format!("{err:#}").contains(&format!("`{key}`")), "{key}: {err:#}");
    }
}

#[test]
fn greedy_decoding_matches_transformers() {
    for (dir, name) in [(mixtral_dir(), "hf-tiny-mixtral"), (fixture("hf-tiny-qwen2-moe"), "hf-tiny-qwen2-moe")] {
        let (_d, ckpt) = import(&dir.display().to_string(), None, &[]);
        let (_, model, ctx) = model_of(&ckpt);
        let e = expected(name);
        let to_u32 = |t: &Tensor| -> Vec<u32> { t.i(0).unwrap().to_dtype(DType::U32).unwrap().to_vec1().unwrap() };
        let (prompt, want) = (to_u32(&e["prompt_ids"]), to_u32(&e["greedy_ids"]));
        let s = SampleConfig { max_new_tokens: want.len() - prompt.len(), temperature: 0.0, top_k: 0, seed: 0 };
        assert_eq!(generate_ids(&model, &prompt, &s, &Device::Cpu, ctx).unwrap(), want, "{name}");
    }
}

#[test]
fn export_with_logits_writes_our_logits_and_greedy_ids() {
    let (d, ckpt) = import(&mixtral_dir().display().to_string(), None, &[]);
    let out = d.path().join("export");
    export_hf(&ckpt, &out, &ExportOptions { with_logits: true, ..Default::default() }).unwrap();
    let l = candle_core::safetensors::load(out.join(LOGITS_FILE), &Device::Cpu).unwrap();
    assert_eq!(l["input_ids"].dims(), &[2, 32]);
    assert_eq!(max_diff(&logits(&ckpt, &l["input_ids"]), &l["logits"]), 0.0);
    assert_eq!(l["greedy_ids"].dims(), &[1, 32]);
    assert_eq!(
        l["greedy_ids"].i((0, ..8)).unwrap().to_vec1::<i64>().unwrap(),
        l["prompt_ids"].i(0).unwrap().to_vec1::<i64>().unwrap()
    );
}

#[test]
fn a_tokenizer_of_another_kind_imports_as_hf() {
    let d = tempfile::tempdir().unwrap();
    let from = edited(&fixture("hf-tiny-qwen2-moe"), d.path(), |_| {});
    // A word-level vocabulary of 65 tokens split on whitespace: not a char vocabulary.
    let mut vocab: serde_json::Map<String, serde_json::Value> = serde_json::Map::new();
    for (i, w) in ["<unk>", "the", "cat", "sat"].iter().enumerate() {
        vocab.insert(w.to_string(), i.into());
    }
    for i in vocab.len()..60 {
        vocab.insert(format!("w{i}"), i.into());
    }
    let tok = serde_json::json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}});
    std::fs::write(from.join("tokenizer.json"), tok.to_string()).unwrap();
    let out = d.path().join("ckpt");
    import_hf(&from.display().to_string(), &out, &ImportOptions::default()).unwrap();
    let l = checkpoint::load(&out).unwrap();
    assert_eq!(l.cfg.data.tokenizer.as_str(), "hf");
    // 60 tokens for a vocabulary of 65 rows: a padded vocabulary loads.
    assert_eq!((l.tokenizer.vocab_size(), l.cfg.model.vocab_size), (60, 65));
    assert_eq!(l.tokenizer.encode("the cat  sat w7 dog").unwrap(), vec![1, 2, 3, 7, 0]);
    check_logits(&out, "hf-tiny-qwen2-moe");
    // It is never trained on a text.
    let err = gumbel_moe::data::Tokenizer::train(&gumbel_moe::data::TokenizerKind::Hf, "some text").unwrap_err();
    assert!(err.to_string().contains("data.tokenizer = \"hf\""), "{err}");
}

#[test]
fn the_cli_imports_exports_and_refuses_naming_the_key() {
    let d = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_gumbel-moe")).args(args).output().unwrap();
        (o.status.success(), String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr))
    };
    let (ck, ex) = (d.path().join("ck"), d.path().join("ex"));
    let qwen = fixture("hf-tiny-qwen2-moe").display().to_string();
    let (ok, out) = run(&["import-hf", "--from", &qwen, "--out", ck.to_str().unwrap()]);
    assert!(ok && out.contains("\"model_type\":\"qwen2_moe\""), "{out}");
    let (ok, out) =
        run(&["export-hf", "--checkpoint", ck.to_str().unwrap(), "--out", ex.to_str().unwrap(), "--format", "mixtral"]);
    assert!(!ok && out.contains("`model.moe_every`"), "{out}");
    let (ok, out) = run(&["export-hf", "--checkpoint", ck.to_str().unwrap(), "--out", ex.to_str().unwrap(), "--tied"]);
    assert!(ok && out.contains("\"model_type\":\"qwen2_moe\""), "{out}");
    assert_eq!(
        tensors(&ex.join("model.safetensors")),
        tensors(&fixture("hf-tiny-qwen2-moe").join("model.safetensors"))
    );
}
