//! Config files, overrides and validation errors.

use gumbel_moe::config::{
    Activation, DeviceKind, EvalMode, NormKind, Positions, RouterImpl, RouterInput, RouterKind, TokenizerType,
};
use gumbel_moe::Config;
use std::path::Path;

fn configs_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("configs")
}

fn err(text: &str, overrides: &[&str]) -> String {
    let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    format!("{:#}", Config::resolve(text, "test.toml", &o).expect_err("expected an error"))
}

#[test]
fn every_config_file_parses_and_validates() {
    let mut n = 0;
    for entry in std::fs::read_dir(configs_dir()).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "toml") {
            let cfg = Config::from_file(&p, &[]).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
            // The file's values really override the defaults: round-trip through the TOML text.
            let text = std::fs::read_to_string(&p).unwrap();
            let raw: toml::Table = toml::from_str(&text).unwrap();
            if let Some(m) = raw.get("model").and_then(|m| m.get("n_embd")) {
                assert_eq!(cfg.model.n_embd as i64, m.as_integer().unwrap(), "{}", p.display());
            }
            n += 1;
        }
    }
    assert!(n >= 8, "expected at least 8 configs, found {n}");
}

#[test]
fn the_cpu_recipe_is_nanogpts() {
    let c = Config::from_file(&configs_dir().join("shakespeare-char-cpu.toml"), &[]).unwrap();
    let m = &c.model;
    assert_eq!((m.block_size, m.n_layer, m.n_head, m.n_embd), (64, 4, 4, 128));
    // nanoGPT's 12 sequences per step (as micro-batches that run side by side).
    assert_eq!((c.train.batch_size * c.train.grad_accum, c.train.max_iters), (12, 2000));
    assert_eq!((c.train.lr, c.train.min_lr, m.dropout), (1e-3, 1e-4, 0.0));
    // The MoE's active compute per token is at most nanoGPT's MLP's: m experts of width h, with
    // 3 matrices each for SwiGLU (2 for GELU), against 2 matrices of 4 x n_embd.
    let mats = if m.moe.activation == gumbel_moe::config::Activation::Swiglu { 3 } else { 2 };
    assert!(m.router.top_m * mats * c.expert_hidden() <= 2 * 4 * m.n_embd, "more active compute than the dense MLP");
    let v1 = Config::from_file(&configs_dir().join("shakespeare-char-cpu-v1.toml"), &[]).unwrap();
    assert_eq!(v1.model.router.top_m * v1.expert_hidden(), 4 * v1.model.n_embd, "v1: the dense twin's compute");
    assert!(m.router.top_m <= m.router.prefilter && m.router.prefilter <= m.moe.num_experts);
    assert_eq!((m.router.kind.as_str(), m.router.hard), ("gumbel", true));
    let g = Config::from_file(&configs_dir().join("shakespeare-char-gpu.toml"), &[]).unwrap();
    assert_eq!((g.model.block_size, g.model.n_layer, g.model.n_head, g.model.n_embd), (256, 6, 6, 384));
    assert_eq!((g.train.batch_size, g.train.max_iters, g.model.dropout, g.model.moe.num_experts), (64, 5000, 0.2, 16));
    // TF32 matmuls as in nanoGPT's GPU recipe; the CPU recipe keeps the default (off).
    assert!(g.train.tf32 && !c.train.tf32);
}

#[test]
fn overrides_apply_with_types() {
    let c = Config::resolve(
        "",
        "t",
        &[
            "model.router.tau_min=0.3".into(),
            "model.router.kind=dense".into(),
            "train.lr=1".into(),
            "model.router.hard=false".into(),
        ],
    )
    .unwrap();
    assert_eq!(c.model.router.tau_min, 0.3);
    assert_eq!(c.model.router.kind, RouterKind::Dense);
    assert_eq!(c.train.lr, 1.0); // an integer is accepted for a float
    assert!(!c.model.router.hard);
}

#[test]
fn unknown_keys_and_wrong_types_name_the_key() {
    assert!(err("", &["model.router.tau_mn=0.3"]).contains("model.router.tau_mn"));
    assert!(err("[model]\nn_layers = 3\n", &[]).contains("model.n_layers"));
    let e = err("", &["model.n_layer=abc"]);
    assert!(e.contains("model.n_layer") && e.contains("integer"), "{e}");
    let e = err("[train]\nlr = \"fast\"\n", &[]);
    assert!(e.contains("train.lr") && e.contains("float"), "{e}");
    assert!(err("", &["novalue"]).contains("key=value"));
}

#[test]
fn invalid_router_settings_are_rejected_by_name() {
    assert!(err("", &["model.router.tau0=0"]).contains("tau0"));
    assert!(err("", &["model.router.tau_min=-1"]).contains("tau_min"));
    let e = err("", &["model.router.prefilter=9"]);
    assert!(e.contains("prefilter") && e.contains("exceeds"), "{e}");
    let e = err("", &["model.router.top_m=2", "model.router.prefilter=1"]);
    assert!(e.contains("prefilter") && e.contains("below"), "{e}");
    assert!(err("", &["model.router.top_m=9"]).contains("top_m"));
    assert!(err("", &["model.router.kind=magic"]).contains("model.router.kind"));
    assert!(err("", &["model.n_head=3"]).contains("divisible"));
}

#[test]
fn checkpoint_configs_from_older_versions_take_new_defaults() {
    let cfg = Config::default();
    let mut json: serde_json::Value = serde_json::from_str(&cfg.to_json().unwrap()).unwrap();
    // A config.json written before `model.router.lr_scale` existed.
    json["model"]["router"].as_object_mut().unwrap().remove("lr_scale");
    json["model"]["n_layer"] = 3.into();
    let back = Config::from_json(&json.to_string(), "old.json").unwrap();
    assert_eq!(back.model.router.lr_scale, Config::default().model.router.lr_scale);
    assert_eq!(back.model.n_layer, 3);
    json["model"]["mystery"] = 1.into();
    let e = format!("{:#}", Config::from_json(&json.to_string(), "old.json").unwrap_err());
    assert!(e.contains("model.mystery"), "{e}");
}

/// Every key that takes a name, with its known values in the order the error lists them.
const NAMED_KEYS: [(&str, &str); 9] = [
    ("model.router.kind", "gumbel, softmax_topk, dense, noisy_topk, sigmoid_bias, hash, reinforce"),
    ("model.router.impl", "fused, reference"),
    ("model.router.eval_mode", "argmax, sample"),
    ("model.router.input", "hidden, token"),
    ("model.norm", "layer, rms"),
    ("model.moe.activation", "gelu, swiglu"),
    ("model.positions", "learned, rotary"),
    ("train.device", "cpu, cuda, cuda:N, metal"),
    ("data.tokenizer", "char, bpe, hf"),
];

#[test]
fn unknown_names_are_refused_naming_the_key_and_the_known_values() {
    for (key, known) in NAMED_KEYS {
        let want = format!("{key}: unknown value `foo` (known: {known})");
        let e = err("", &[format!("{key}=foo").as_str()]);
        assert!(e.contains(&want), "--set {key}: {e}");
        let (table, leaf) = key.rsplit_once('.').unwrap();
        let e = err(&format!("[{table}]\n{leaf} = \"foo\"\n"), &[]);
        assert!(e.contains(&want) && e.contains("test.toml"), "file {key}: {e}");
        // A checkpoint's config.json.
        let mut json: serde_json::Value = serde_json::from_str(&Config::default().to_json().unwrap()).unwrap();
        *json.pointer_mut(&format!("/{}", key.replace('.', "/"))).unwrap() = "foo".into();
        let e = format!("{:#}", Config::from_json(&json.to_string(), "old.json").unwrap_err());
        assert!(e.contains(&want) && e.contains("old.json"), "config.json {key}: {e}");
    }
    // The known names are the enums' own lists.
    let lists = [
        RouterKind::KNOWN,
        RouterImpl::KNOWN,
        EvalMode::KNOWN,
        RouterInput::KNOWN,
        NormKind::KNOWN,
        Activation::KNOWN,
        Positions::KNOWN,
        DeviceKind::KNOWN,
        TokenizerType::KNOWN,
    ];
    for ((key, known), list) in NAMED_KEYS.iter().zip(lists) {
        assert_eq!(list.join(", "), *known, "{key}");
    }
    let e = err("", &["train.device=cuda:x"]);
    assert!(e.contains("train.device: unknown value `cuda:x`"), "{e}");
    let e = err("", &["model.router.kind=expert_choice"]);
    assert!(e.contains(gumbel_moe::moe::EXPERT_CHOICE_REFUSAL) && !e.contains("unknown value"), "{e}");
}

#[test]
fn names_read_and_print_as_their_config_strings() {
    fn round_trip<T>(all: &[T], key: &str)
    where
        T: Copy + PartialEq + std::fmt::Debug + std::fmt::Display + std::str::FromStr + serde::Serialize,
        T::Err: std::fmt::Debug,
    {
        for &v in all {
            let s = v.to_string();
            assert_eq!(s.parse::<T>().unwrap(), v, "{key} = {s}");
            assert_eq!(serde_json::to_value(v).unwrap(), serde_json::Value::String(s.clone()), "{key}");
            assert_eq!(format!("{v:?}"), format!("{s:?}"), "{key}");
        }
    }
    round_trip(RouterKind::ALL, RouterKind::KEY);
    round_trip(RouterImpl::ALL, RouterImpl::KEY);
    round_trip(EvalMode::ALL, EvalMode::KEY);
    round_trip(RouterInput::ALL, RouterInput::KEY);
    round_trip(NormKind::ALL, NormKind::KEY);
    round_trip(Activation::ALL, Activation::KEY);
    round_trip(Positions::ALL, Positions::KEY);
    round_trip(TokenizerType::ALL, TokenizerType::KEY);
    let devices = [DeviceKind::Cpu, DeviceKind::Cuda(None), DeviceKind::Cuda(Some(3)), DeviceKind::Metal];
    round_trip(&devices, DeviceKind::KEY);
    for (v, s) in RouterKind::ALL.iter().zip(RouterKind::KNOWN) {
        assert_eq!(v.as_str(), *s);
    }
    assert_eq!(DeviceKind::Cuda(Some(1)).to_string(), "cuda:1");
    // Each value set by `--set` lands as that variant, and the resolved config writes it back as the same string.
    let c = Config::resolve(
        "",
        "t",
        &[
            "model.router.kind=sigmoid_bias".into(),
            "model.router.impl=reference".into(),
            "model.router.eval_mode=sample".into(),
            "model.router.input=token".into(),
            "model.norm=rms".into(),
            "model.moe.activation=swiglu".into(),
            "model.positions=rotary".into(),
            "train.device=cuda:2".into(),
            "data.tokenizer=bpe".into(),
        ],
    )
    .unwrap();
    let (m, r) = (&c.model, &c.model.router);
    assert_eq!(
        (r.kind, r.implementation, r.eval_mode, r.input),
        (RouterKind::SigmoidBias, RouterImpl::Reference, EvalMode::Sample, RouterInput::Token)
    );
    assert_eq!((m.norm, m.moe.activation, m.positions), (NormKind::Rms, Activation::Swiglu, Positions::Rotary));
    assert_eq!((c.train.device, c.data.tokenizer), (DeviceKind::Cuda(Some(2)), TokenizerType::Bpe));
    let json: serde_json::Value = serde_json::from_str(&c.to_json().unwrap()).unwrap();
    for (ptr, s) in [
        ("/model/router/kind", "sigmoid_bias"),
        ("/model/router/impl", "reference"),
        ("/model/router/eval_mode", "sample"),
        ("/model/router/input", "token"),
        ("/model/norm", "rms"),
        ("/model/moe/activation", "swiglu"),
        ("/model/positions", "rotary"),
        ("/train/device", "cuda:2"),
        ("/data/tokenizer", "bpe"),
    ] {
        assert_eq!(json.pointer(ptr).and_then(|v| v.as_str()), Some(s), "{ptr}");
    }
    assert_eq!(Config::from_json(&c.to_json().unwrap(), "c.json").unwrap(), c);
}

#[test]
fn every_config_file_survives_a_checkpoint_round_trip() {
    for entry in std::fs::read_dir(configs_dir()).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "toml") {
            let cfg = Config::from_file(&p, &[]).unwrap();
            let back = Config::from_json(&cfg.to_json().unwrap(), "config.json").unwrap();
            assert_eq!(back, cfg, "{}", p.display());
            // The names in the file are the names written back.
            let raw: toml::Table = toml::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            let json: serde_json::Value = serde_json::from_str(&cfg.to_json().unwrap()).unwrap();
            for (key, _) in NAMED_KEYS {
                let parts: Vec<&str> = key.split('.').collect();
                let mut v = Some(&toml::Value::Table(raw.clone()));
                for part in &parts {
                    v = v.and_then(|t| t.get(part));
                }
                if let Some(want) = v {
                    let got = json.pointer(&format!("/{}", parts.join("/"))).and_then(|v| v.as_str());
                    assert_eq!(got, want.as_str(), "{} {key}", p.display());
                }
            }
        }
    }
}
