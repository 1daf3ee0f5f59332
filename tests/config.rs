//! Config files, overrides and validation errors.

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
    // The MoE keeps the dense twin's active compute: m experts of width h = one 4 x n_embd MLP.
    assert_eq!(m.router.top_m * c.expert_hidden(), 4 * m.n_embd, "active compute differs from the dense twin");
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
    assert_eq!(c.model.router.kind, "dense");
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
