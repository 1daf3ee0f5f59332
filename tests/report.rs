//! `compare` and `plot`: run planning, the reuse decision, the report table against a direct
//! computation from synthetic metrics files, valid PNG plots, and one tiny end-to-end comparison.

mod common;
use gumbel_moe::report::colours::series_colours;
use gumbel_moe::report::plot::{ema, load_heatmap, train_loss_chart, val_loss_chart};
use gumbel_moe::report::{plan_runs, plot_run, run_state, Report, RunPlan, RunState, RunSummary};
use gumbel_moe::Config;
use serde_json::{json, Value};
use std::path::Path;

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn plans_routers_variants_sets_and_steps() {
    let runs = plan_runs(
        &strings(&["gumbel", "dense_ffn"]),
        &strings(&["tau03:model.router.tau_min=0.3,model.router.tau0=2"]),
        &strings(&["seed=7"]),
        Some(50),
    )
    .unwrap();
    let common = ["seed=7", "train.max_iters=50", "train.lr_decay_iters=50"];
    let want = vec![
        RunPlan { name: "gumbel".into(), overrides: strings(&[&common[..], &["model.router.kind=gumbel"]].concat()) },
        RunPlan { name: "dense_ffn".into(), overrides: strings(&[&common[..], &["model.moe_every=0"]].concat()) },
        RunPlan {
            name: "tau03".into(),
            overrides: strings(&[&common[..], &["model.router.tau_min=0.3", "model.router.tau0=2"]].concat()),
        },
    ];
    assert_eq!(runs, want);
    // Without --steps the budget is the base config's; a comma inside a value stays in it.
    let r = plan_runs(&[], &strings(&["v:data.source=\"a,b.txt\""]), &[], None).unwrap();
    assert_eq!(r[0].overrides, ["data.source=\"a,b.txt\""]);
    // Errors name the problem.
    for (routers, variants, msg) in [
        (vec![], vec![], "nothing to compare"),
        (vec!["gumbel", "gumbel"], vec![], "given twice"),
        (vec!["gumbel"], vec!["gumbel:seed=1"], "given twice"),
        (vec![], vec!["noname"], "NAME:key=value"),
        (vec![], vec!["x:seed"], "not key=value"),
        (vec!["../up"], vec![], "run name `../up`"),
        (vec![], vec![".hidden:seed=1"], "run name `.hidden`"),
    ] {
        let e = format!("{:#}", plan_runs(&strings(&routers), &strings(&variants), &[], None).unwrap_err());
        assert!(e.contains(msg), "{routers:?} {variants:?}: {e}");
    }
    assert!(plan_runs(&strings(&["gumbel"]), &[], &[], Some(0)).is_err());
}

fn done_line(val: f64) -> Value {
    json!({"event": "done", "step": 20, "val_loss": val, "val_loss_kind": "full_split", "wall_s": 12.5, "tok_per_s": 2300.0})
}

fn write_run(dir: &Path, cfg: &Config, lines: &[Value]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), cfg.to_json().unwrap()).unwrap();
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(dir.join("metrics.jsonl"), text).unwrap();
}

#[test]
fn reuse_needs_the_done_line_and_the_same_config() {
    let d = tempfile::tempdir().unwrap();
    let cfg = common::tiny_config("gumbel", &[]);
    let run = d.path().join("gumbel");
    assert_eq!(run_state(&run, &cfg), RunState::New);
    // The trainer stores the tokenizer's vocabulary size; the planned config has 0 (= take it).
    let mut stored = cfg.clone();
    stored.model.vocab_size = 65;
    write_run(&run, &stored, &[json!({"step": 10, "val_loss": 2.0}), done_line(1.9)]);
    assert_eq!(run_state(&run, &cfg), RunState::Finished);
    // Another config: retrain.
    let other = common::tiny_config("gumbel", &["model.router.tau_min=0.3"]);
    assert!(matches!(run_state(&run, &other), RunState::Stale(_)));
    // No done line: resume when there is a checkpoint, otherwise retrain.
    write_run(&run, &stored, &[json!({"step": 10, "val_loss": 2.0})]);
    assert!(matches!(run_state(&run, &cfg), RunState::Stale(_)));
    std::fs::create_dir_all(run.join("ckpt-0000010")).unwrap();
    assert_eq!(run_state(&run, &cfg), RunState::Partial);
    // A folder without config.json (a run that failed before training).
    let broken = d.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    assert!(matches!(run_state(&broken, &cfg), RunState::Stale(why) if why.contains("config.json")));
}

/// A telemetry log line of a 2-layer model.
fn tele(step: u64, cv: [f64; 2], ent: [f64; 2], top1: [f64; 2], drop: [f64; 2], dead: [u64; 2], tpe: Value) -> Value {
    json!({"step": step, "train_loss": 2.0, "tau": 0.7, "load_cv": cv, "router_entropy": ent, "top1_prob": top1,
           "dropped_pct": drop, "dead_experts": dead, "tokens_per_expert": tpe})
}

#[test]
fn report_table_matches_direct_computation() {
    let d = tempfile::tempdir().unwrap();
    let g = common::tiny_config("gumbel", &[]);
    let dense = common::tiny_config("gumbel", &["model.moe_every=0"]);
    let sm = common::tiny_config("softmax_topk", &[]);
    let tpe = json!([[5, 3, 0, 8], [4, 4, 4, 4]]);
    write_run(
        &d.path().join("gumbel"),
        &g,
        &[
            tele(10, [0.9, 0.9], [1.0, 1.0], [0.3, 0.3], [9.0, 9.0], [3, 3], tpe.clone()),
            json!({"step": 10, "val_loss": 2.5}),
            tele(20, [0.4, 0.2], [1.2, 0.8], [0.6, 0.4], [1.0, 3.0], [1, 2], tpe.clone()),
            json!({"step": 20, "val_loss": 2.1}),
            done_line(2.05),
        ],
    );
    write_run(
        &d.path().join("dense_ffn"),
        &dense,
        &[json!({"step": 20, "train_loss": 2.2, "tau": 1.0}), done_line(2.15)],
    );
    // softmax_topk failed: no done line.
    write_run(&d.path().join("softmax_topk"), &sm, &[tele(10, [0.1; 2], [1.0; 2], [0.5; 2], [0.0; 2], [0; 2], tpe)]);
    let rows: Vec<RunSummary> = ["gumbel", "dense_ffn", "softmax_topk", "missing"]
        .iter()
        .map(|n| RunSummary::from_dir(n, &d.path().join(n)))
        .collect();
    let r = Report::new("test", rows);
    let gr = &r.runs[0];
    assert_eq!((gr.router.as_str(), gr.status.as_str()), ("gumbel", "ok"));
    assert_eq!(gr.val_loss, Some(2.05));
    assert_eq!(gr.val_loss_kind.as_deref(), Some("full_split"));
    assert_eq!((gr.tok_per_s, gr.wall_s, gr.steps), (Some(2300.0), Some(12.5), Some(20)));
    // The last telemetry line, mean over layers (dead: summed).
    let close = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1e-12);
    assert!(close(gr.load_cv, 0.3) && close(gr.router_entropy, 1.0) && close(gr.top1_prob, 0.5), "{gr:?}");
    assert!(close(gr.dropped_pct, 2.0) && gr.dead_experts == Some(3), "{gr:?}");
    assert!(close(gr.delta_vs_dense_ffn, 2.05 - 2.15));
    let dr = &r.runs[1];
    assert_eq!((dr.router.as_str(), dr.val_loss, dr.load_cv, dr.dead_experts), ("dense_ffn", Some(2.15), None, None));
    assert_eq!(dr.delta_vs_dense_ffn, Some(0.0));
    for (i, name) in [(2, "softmax_topk"), (3, "missing")] {
        assert_eq!(r.runs[i].status, "failed");
        assert!(r.runs[i].log.as_deref().unwrap().ends_with(&format!("{name}/train.log")));
    }
    assert_eq!((r.best.as_deref(), r.baseline.as_deref()), (Some("gumbel"), Some("dense_ffn")));
    let md = r.to_markdown();
    assert!(
        md.contains("| gumbel | gumbel | 2.0500 | -0.1000 | 2300 | 0.300 | 1.000 | 0.500 | 2.00 | 3 | 12.5 |"),
        "{md}"
    );
    assert!(md.contains("| softmax_topk | softmax_topk | failed: see `"), "{md}");
    assert!(
        md.contains("Best run: **gumbel**")
            && md.contains("gumbel -0.1000")
            && md.contains("Failed: softmax_topk, missing")
    );
    r.write(d.path()).unwrap();
    let js: Value = serde_json::from_str(&std::fs::read_to_string(d.path().join("report.json")).unwrap()).unwrap();
    assert_eq!(js["best"], "gumbel");
    assert_eq!(js["runs"][0]["dead_experts"], 3);
    assert_eq!(js["runs"][2]["status"], "failed");
}

/// Width and height from a PNG's IHDR, after checking the signature.
fn png_dims(path: &Path) -> (u32, u32) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "{} is not a PNG", path.display());
    assert_eq!(&b[12..16], b"IHDR");
    assert!(b.len() > 5000, "{}: only {} bytes", path.display(), b.len());
    let be = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    (be(16), be(20))
}

#[test]
fn plots_are_valid_pngs() {
    let d = tempfile::tempdir().unwrap();
    let curves = vec![
        ("gumbel".to_string(), vec![(0, 4.2), (10, 3.1), (20, 2.6)]),
        ("dense_ffn".to_string(), vec![(0, 4.2), (10, 3.3), (20, 2.8)]),
        ("failed".to_string(), vec![]),
    ];
    val_loss_chart(&d.path().join("v.png"), &curves).unwrap();
    assert_eq!(png_dims(&d.path().join("v.png")), (960, 600));
    let steps = [1, 10, 20, 30];
    let load: Vec<Vec<Vec<u64>>> = (0..4).map(|i| vec![vec![10, 5 * i, 0, 1], vec![4, 4, 4, 4 + i]]).collect();
    load_heatmap(&d.path().join("l.png"), "run: expert load", &steps, &load).unwrap();
    let (w, h) = png_dims(&d.path().join("l.png"));
    assert!(w == 1000 && h > 300, "{w}x{h}");
    // Training loss: every log line of several runs, smoothed.
    let noisy = |phase: f64| -> Vec<(u64, f64)> {
        (1..=200u64).map(|s| (s, 4.0 / (1.0 + s as f64 / 50.0) + 0.2 * (s as f64 * 1.7 + phase).sin())).collect()
    };
    let runs: Vec<(String, Vec<(u64, f64)>)> = (0..12).map(|i| (format!("run{i}"), noisy(i as f64))).collect();
    train_loss_chart(&d.path().join("t.png"), &runs).unwrap();
    assert_eq!(png_dims(&d.path().join("t.png")), (960, 600));
    // Nothing to draw is an error, not an empty picture.
    assert!(val_loss_chart(&d.path().join("e.png"), &[("x".into(), vec![])]).is_err());
    assert!(train_loss_chart(&d.path().join("e.png"), &[("x".into(), vec![(1, f64::NAN)])]).is_err());
    assert!(load_heatmap(&d.path().join("e.png"), "t", &[], &[]).is_err());
}

/// Every series of a chart has its own colour, for any number of runs; the first ten (the usual
/// comparison) are also far apart.
#[test]
fn series_colours_are_distinct() {
    for n in 1..=60 {
        let c = series_colours(n);
        assert_eq!(c.len(), n);
        for i in 0..n {
            for j in 0..i {
                assert_ne!(c[i], c[j], "{n} series: {i} and {j} share {:?}", c[i]);
            }
        }
    }
    let c = series_colours(10);
    let dist = |a: &plotters::style::RGBColor, b: &plotters::style::RGBColor| {
        let d = |x: u8, y: u8| (x as f64 - y as f64).powi(2);
        (d(a.0, b.0) + d(a.1, b.1) + d(a.2, b.2)).sqrt()
    };
    for i in 0..10 {
        for j in 0..i {
            assert!(dist(&c[i], &c[j]) > 60.0, "{i} {:?} and {j} {:?} are too close", c[i], c[j]);
        }
    }
}

/// The smoothing starts at the first value (no pull toward 0) and follows a step change.
#[test]
fn train_loss_ema_is_bias_corrected() {
    let pts: Vec<(f64, f64)> = (0..40).map(|i| (i as f64, if i < 20 { 3.0 } else { 1.0 })).collect();
    let s = ema(&pts, 0.8);
    assert_eq!(s.len(), 40);
    assert!((s[0].1 - 3.0).abs() < 1e-12 && (s[19].1 - 3.0).abs() < 1e-12, "{:?}", &s[..2]);
    assert!(s[20].1 < 3.0 && s[20].1 > 2.0, "one step after the change: {}", s[20].1);
    assert!((s[39].1 - 1.0).abs() < 0.05, "{}", s[39].1);
}

#[test]
fn plot_command_draws_both_plots_and_names_a_missing_file() {
    let d = tempfile::tempdir().unwrap();
    let cfg = common::tiny_config("gumbel", &[]);
    let tpe = json!([[5, 3, 0, 8], [4, 4, 4, 4]]);
    write_run(
        d.path(),
        &cfg,
        &[
            tele(1, [0.9; 2], [1.0; 2], [0.3; 2], [0.0; 2], [1; 2], tpe.clone()),
            json!({"step": 3, "val_loss": 3.0}),
            tele(3, [0.4; 2], [1.2; 2], [0.6; 2], [0.0; 2], [1; 2], tpe),
            json!({"step": 6, "val_loss": 2.7}),
        ],
    );
    let wrote = plot_run(d.path()).unwrap();
    assert_eq!(wrote, [d.path().join("val_loss.png"), d.path().join("train_loss.png"), d.path().join("load.png")]);
    for p in wrote {
        png_dims(&p);
    }
    let e = format!("{:#}", plot_run(&d.path().join("nope")).unwrap_err());
    assert!(e.contains("nope") && e.contains("metrics.jsonl"), "{e}");
}

/// The binary end to end: two 2-step runs, then a second `compare` reuses both.
#[test]
fn compare_trains_reports_and_reuses() {
    let d = tempfile::tempdir().unwrap();
    let src = common::shakespeare_path();
    let base = d.path().join("tiny.toml");
    std::fs::write(
        &base,
        format!(
            "[data]\nsource = {:?}\n[model]\nblock_size = 16\nn_layer = 2\nn_head = 2\nn_embd = 32\n\
             [model.moe]\nnum_experts = 4\nexpert_hidden = 64\n[model.router]\nprefilter = 3\n\
             [train]\nbatch_size = 4\nwarmup_iters = 1\neval_interval = 1\neval_iters = 1\nlog_interval = 1\n\
             final_full_eval = false\n",
            src.display().to_string()
        ),
    )
    .unwrap();
    let out = d.path().join("cmp");
    let run = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_gumbel-moe"))
            .args(["compare", "--config"])
            .arg(&base)
            .args(["--routers", "gumbel,dense_ffn", "--steps", "2", "--jobs", "2", "--out"])
            .arg(&out)
            .env("RAYON_NUM_THREADS", "1")
            .output()
            .unwrap()
    };
    let o = run();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    for f in [
        "report.md",
        "report.json",
        "val_loss.png",
        "train_loss.png",
        "gumbel/load.png",
        "gumbel/train.log",
        "dense_ffn/metrics.jsonl",
    ] {
        assert!(out.join(f).exists(), "{f} missing; stderr: {err}");
    }
    assert!(!out.join("dense_ffn/load.png").exists());
    let js: Value = serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(js["runs"].as_array().unwrap().len(), 2);
    assert_eq!(js["runs"][0]["status"], "ok");
    assert_eq!(js["runs"][0]["steps"], 2);
    assert_eq!(js["baseline"], "dense_ffn");
    let o = run();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success() && err.contains("gumbel: finished with this config, reused"), "{err}");
    assert!(!err.contains("training ->"), "{err}");
}
