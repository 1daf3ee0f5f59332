//! Router telemetry: the per-log-line numbers against a direct computation from every step's
//! routing, and the keys a short training run writes to metrics.jsonl.

mod common;
use candle_core::{Device, Tensor};
use common::tiny_config;
use gumbel_moe::train::metrics;
use gumbel_moe::train::telemetry::{load_cv, LayerStep, StepRouting, Telemetry};
use gumbel_moe::train::Trainer;

/// One layer's synthetic step: its counts and its router scores.
struct Layer {
    tokens: Vec<u64>,
    entropy: f64,
    top1: f64,
    dropped: u64,
    routed: u64,
}

/// The routing the trainer would record: host counts, scores as an (L, 2) f64 tensor.
fn recorded(layers: &[Layer]) -> StepRouting {
    let counts =
        layers.iter().map(|l| LayerStep { tokens: l.tokens.clone(), dropped: l.dropped, routed: l.routed }).collect();
    let scores: Vec<f64> = layers.iter().flat_map(|l| [l.entropy, l.top1]).collect();
    StepRouting { layers: counts, scores: Some(Tensor::from_vec(scores, (layers.len(), 2), &Device::Cpu).unwrap()) }
}

/// A deterministic pseudo-random routing: layer 1's expert 3 only gets tokens until step 4.
fn step_routing(step: u64, layers: usize, experts: usize) -> Vec<Layer> {
    (0..layers)
        .map(|l| {
            let tokens: Vec<u64> = (0..experts)
                .map(|e| if l == 1 && e == 3 && step >= 4 { 0 } else { (step * 7 + l as u64 * 3 + e as u64 * 5) % 11 })
                .collect();
            Layer {
                tokens,
                entropy: 0.1 * (step as f64 + l as f64),
                top1: 0.5 + 0.01 * step as f64,
                dropped: step % 3 + l as u64,
                routed: 64,
            }
        })
        .collect()
}

#[test]
fn summary_matches_direct_computation() {
    let (layers, experts, window, log_every) = (2, 5, 3u64, 4u64);
    let mut t = Telemetry::new(window as usize);
    let all: Vec<Vec<Layer>> = (0..13).map(|s| step_routing(s, layers, experts)).collect();
    let mut from = 0u64;
    for step in 0..13u64 {
        t.record(step, &recorded(&all[step as usize])).unwrap();
        if (step + 1) % log_every != 0 && step != 12 {
            continue;
        }
        let s = t.summary().unwrap();
        let span = &all[from as usize..=step as usize];
        let mut frac = (0u64, 0u64);
        for l in 0..layers {
            let tokens: Vec<u64> = (0..experts).map(|e| span.iter().map(|r| r[l].tokens[e]).sum()).collect();
            assert_eq!(s.tokens_per_expert[l], tokens, "step {step} layer {l}");
            let mean = tokens.iter().sum::<u64>() as f64 / experts as f64;
            let std = (tokens.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / experts as f64).sqrt();
            assert!((s.load_cv[l] - std / mean).abs() < 1e-12, "cv {} vs {}", s.load_cv[l], std / mean);
            let n = span.len() as f64;
            let ent = span.iter().map(|r| r[l].entropy).sum::<f64>() / n;
            let top1 = span.iter().map(|r| r[l].top1).sum::<f64>() / n;
            assert!((s.router_entropy[l] - ent).abs() < 1e-12);
            assert!((s.top1_prob[l] - top1).abs() < 1e-12);
            let (d, r) =
                (span.iter().map(|r| r[l].dropped).sum::<u64>(), span.iter().map(|r| r[l].routed).sum::<u64>());
            assert!((s.dropped_pct[l] - 100.0 * d as f64 / r as f64).abs() < 1e-12);
            frac = (frac.0 + d, frac.1 + r);
            // Dead: no token in the steps (step - window, step] (all steps so far when fewer).
            let lo = (step + 1).saturating_sub(window) as usize;
            let dead = (0..experts).filter(|&e| all[lo..=step as usize].iter().all(|r| r[l].tokens[e] == 0)).count();
            assert_eq!(s.dead_experts[l], dead, "dead at step {step} layer {l}");
        }
        assert!((s.dropped_frac - frac.0 as f64 / frac.1 as f64).abs() < 1e-12);
        from = step + 1;
    }
    // Layer 1's expert 3 is empty from step 4 on (and the synthetic counts hit 0 now and then).
    let mut t = Telemetry::new(3);
    for s in 0..7 {
        t.record(s, &recorded(&all[s as usize])).unwrap();
    }
    assert!(t.summary().unwrap().dead_experts[1] >= 1);
}

#[test]
fn cv_edge_cases_and_progress_line() {
    assert_eq!(load_cv(&[]), 0.0);
    assert_eq!(load_cv(&[0, 0, 0]), 0.0);
    assert_eq!(load_cv(&[4, 4, 4, 4]), 0.0);
    // mean 2, std 2 -> 1.
    assert!((load_cv(&[4, 0, 4, 0]) - 1.0).abs() < 1e-12);
    let mut t = Telemetry::new(100);
    t.record(0, &recorded(&[Layer { tokens: vec![4, 0, 4, 0], entropy: 1.0, top1: 0.5, dropped: 1, routed: 8 }]))
        .unwrap();
    let s = t.summary().unwrap();
    assert_eq!(s.dead_experts, [2]);
    assert_eq!(s.progress(), "cv 1.00 dead 2 drop 12.5%");
    // A new interval starts empty; no MoE layer gives no progress text.
    assert_eq!(Telemetry::new(5).summary().unwrap().progress(), "");
}

/// A short run logs every telemetry key, one entry per MoE layer, and the load sums to the
/// tokens routed since the previous log line.
#[test]
fn training_writes_the_telemetry_keys() {
    let d = tempfile::tempdir().unwrap();
    let cfg =
        tiny_config("softmax_topk", &["train.max_iters=4", "train.log_interval=2", "model.moe.capacity_factor=1.0"]);
    let mut t = Trainer::new(cfg, d.path()).unwrap();
    t.progress = false;
    t.fit().unwrap();
    let m = metrics::read(&d.path().join("metrics.jsonl")).unwrap();
    let logs: Vec<_> = m.iter().filter(|v| v.get("train_loss").is_some()).collect();
    assert_eq!(logs.iter().map(|v| v["step"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 2, 4]);
    for v in &logs {
        for key in ["tokens_per_expert", "load_cv", "dead_experts", "router_entropy", "top1_prob", "dropped_pct"] {
            assert_eq!(v[key].as_array().map(Vec::len), Some(2), "{key} in {v}");
        }
        assert!(v["tau"].is_number() && v["dropped_frac"].is_number());
        let p = v["top1_prob"][0].as_f64().unwrap();
        assert!(p > 0.25 && p <= 1.0, "top-1 prob {p}");
    }
    // Line at step 4 covers steps 3 and 4: 2 steps x 4 rows x 16 tokens, minus the dropped.
    let kept: u64 = logs[2]["tokens_per_expert"][0].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).sum();
    let dropped = logs[2]["dropped_pct"][0].as_f64().unwrap() / 100.0 * 128.0;
    assert_eq!(kept as f64 + dropped.round(), 128.0);
}
