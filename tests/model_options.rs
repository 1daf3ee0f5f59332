//! The Llama-style model options: grouped-query attention (`model.n_kv_head`) against a plain f64
//! reference (values and gradients), an untied LM head (`model.tie_embeddings = false`),
//! `model.norm_eps`, checkpoints written before these keys existed, a padded vocabulary, and
//! `train --init-from`.

mod common;

use candle_core::{DType, Device, Tensor};
use common::tiny_config;
use gumbel_moe::nn::{ops, CausalSelfAttention, Ctx, Params};
use gumbel_moe::train::{IfRunExists, Trainer};
use gumbel_moe::Config;

const T: usize = 6;
const C: usize = 16;
const NH: usize = 4;
const NKV: usize = 2;
const HS: usize = C / NH;

fn fill(n: usize, a: f64) -> Vec<f64> {
    (0..n).map(|i| ((i as f64 * a).sin() * 0.7 + (i as f64 * 0.37).cos() * 0.3) * 0.9).collect()
}

/// Causal GQA with half-split RoPE in f64: x (T, C), w_attn (C + 2 NKV HS, C), w_proj (C, C) -> (T, C).
fn reference(x: &[f64], w_attn: &[f64], w_proj: &[f64], theta: f64) -> Vec<f64> {
    let rows = C + 2 * NKV * HS;
    let proj = |r: usize, t: usize| -> f64 { (0..C).map(|j| w_attn[r * C + j] * x[t * C + j]).sum() };
    let rope = |v: Vec<f64>, t: usize| -> Vec<f64> {
        let half = HS / 2;
        let mut o = v.clone();
        for i in 0..half {
            let a = t as f64 * theta.powf(-2.0 * i as f64 / HS as f64);
            o[i] = v[i] * a.cos() - v[i + half] * a.sin();
            o[i + half] = v[i + half] * a.cos() + v[i] * a.sin();
        }
        o
    };
    assert_eq!(w_attn.len(), rows * C);
    let head = |base: usize, h: usize, t: usize| -> Vec<f64> { (0..HS).map(|d| proj(base + h * HS + d, t)).collect() };
    let mut y = vec![0.0; T * C];
    for h in 0..NH {
        let kv = h / (NH / NKV); // HF's repeat_kv: consecutive query heads share a kv head
        for t in 0..T {
            let q = rope(head(0, h, t), t);
            let s: Vec<f64> = (0..=t)
                .map(|u| {
                    let k = rope(head(C, kv, u), u);
                    q.iter().zip(&k).map(|(a, b)| a * b).sum::<f64>() / (HS as f64).sqrt()
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
            for (u, sv) in s.iter().enumerate() {
                let v = head(C + NKV * HS, kv, u);
                for d in 0..HS {
                    y[t * C + h * HS + d] += (sv - m).exp() / z * v[d];
                }
            }
        }
    }
    (0..T * C).map(|i| (0..C).map(|j| w_proj[(i % C) * C + j] * y[(i / C) * C + j]).sum()).collect()
}

fn gqa_config(fused: bool) -> Config {
    let f = format!("model.fused_layers={fused}");
    tiny_config(
        "softmax_topk",
        &["model.n_embd=16", "model.n_head=4", "model.n_kv_head=2", "model.positions=rotary", "model.bias=false", &f],
    )
}

/// The attention layer of `cfg` in `dtype` with the weights of `fill`: (layer, w_attn, w_proj, params).
fn attention(cfg: &Config, dtype: DType) -> (CausalSelfAttention, Vec<f64>, Vec<f64>, Params) {
    let params = Params::new();
    let attn = CausalSelfAttention::new(cfg, 0, params.var_builder(1, dtype, &Device::Cpu).pp("attn")).unwrap();
    let (wa, wp) = (fill((C + 2 * NKV * HS) * C, 1.3), fill(C * C, 0.71));
    let set = |name: &str, v: &[f64], rows: usize| {
        let t = Tensor::from_slice(v, (rows, C), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        params.get(name).unwrap().set(&t).unwrap();
    };
    set("attn.c_attn.weight", &wa, C + 2 * NKV * HS);
    set("attn.c_proj.weight", &wp, C);
    (attn, wa, wp, params)
}

#[test]
fn grouped_query_attention_matches_an_f64_reference() {
    let x = fill(T * C, 0.53);
    for fused in [true, false] {
        let cfg = gqa_config(fused);
        let (attn, wa, wp, params) = attention(&cfg, DType::F32);
        assert_eq!(params.get("attn.c_attn.weight").unwrap().dims(), &[C + 2 * NKV * HS, C]);
        let xt = Tensor::from_slice(&x, (1, T, C), &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
        let mask = ops::causal_mask(T, DType::F32, &Device::Cpu).unwrap();
        let y = attn.forward(&xt, &mask, &Ctx::eval(0, 1.0)).unwrap();
        let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        let want = reference(&x, &wa, &wp, cfg.model.rope_theta);
        let err = y.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
        assert!(err < 1e-5, "fused = {fused}: max error {err}");
        // Tiling the kv heads (kv = h % NKV) instead of repeating them would be far off.
        assert!(want.iter().map(|v| v.abs()).fold(0.0, f64::max) > 0.1);
    }
}

#[test]
fn grouped_query_attention_gradients_match_finite_differences() {
    let cfg = gqa_config(false);
    let (attn, wa, wp, params) = attention(&cfg, DType::F64);
    let x = fill(T * C, 0.53);
    let r = fill(T * C, 0.29); // L = sum(y * r)
    let xt = Tensor::from_slice(&x, (1, T, C), &Device::Cpu).unwrap();
    let mask = ops::causal_mask(T, DType::F64, &Device::Cpu).unwrap();
    let ctx = Ctx { train: true, step: 0, tau: 1.0, seed: 0, micro: 0 };
    let y = attn.forward(&xt, &mask, &ctx).unwrap();
    let loss = (y * Tensor::from_slice(&r, (1, T, C), &Device::Cpu).unwrap()).unwrap().sum_all().unwrap();
    let w = params.get("attn.c_attn.weight").unwrap();
    let g: Vec<f64> = loss.backward().unwrap().get(w.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let l =
        |wa: &[f64]| -> f64 { reference(&x, wa, &wp, cfg.model.rope_theta).iter().zip(&r).map(|(a, b)| a * b).sum() };
    // Entries in the q, k and v blocks (k and v rows are shared by two query heads each).
    for idx in [3, C * C + 5, C * C + 9 * C + 2, (C + NKV * HS) * C + 7, (C + NKV * HS) * C + 6 * C + 15] {
        let (mut p, mut m) = (wa.clone(), wa.clone());
        p[idx] += 1e-5;
        m[idx] -= 1e-5;
        let fd = (l(&p) - l(&m)) / 2e-5;
        assert!(
            (fd - g[idx]).abs() < 1e-6 * (1.0 + fd.abs()),
            "entry {idx}: autograd {} vs finite difference {fd}",
            g[idx]
        );
    }
}

fn trained(extra: &[&str], dir: &std::path::Path) -> Trainer {
    let mut t = Trainer::new(tiny_config("softmax_topk", extra), dir).unwrap();
    t.progress = false;
    t.fit().unwrap();
    t
}

fn eval_logits(t: &Trainer) -> Tensor {
    let x = Tensor::from_slice(&[1u32, 5, 9, 2, 7, 3], (1, 6), &t.device).unwrap();
    t.model.forward(&x, &Ctx::eval(t.cfg.seed, 1.0)).unwrap().logits
}

#[test]
fn an_untied_head_is_saved_loaded_and_used() {
    let d = tempfile::tempdir().unwrap();
    let t = trained(&["model.tie_embeddings=false", "model.n_kv_head=1", "model.norm_eps=1e-6"], d.path());
    let head = t.params.get("lm_head.weight").expect("an untied model has lm_head.weight");
    assert_eq!(head.dims(), &[t.cfg.model.vocab_size, 32]);
    let back = Trainer::for_inference(&d.path().join("best"), None).unwrap();
    assert_eq!((back.cfg.n_kv_head(), back.cfg.model.tie_embeddings, back.cfg.model.norm_eps), (1, false, 1e-6));
    let diff = (eval_logits(&t) - eval_logits(&back)).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    // The logits come from lm_head, not from the token embedding.
    back.params.get("lm_head.weight").unwrap().set(&head.zeros_like().unwrap()).unwrap();
    let max = eval_logits(&back).abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(max, 0.0);
    let tied = trained(&[], &d.path().join("tied"));
    assert!(tied.params.get("lm_head.weight").is_none());
}

#[test]
fn checkpoints_without_the_new_keys_load_unchanged() {
    let d = tempfile::tempdir().unwrap();
    let t = trained(&[], d.path());
    let ckpt = d.path().join("best");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("config.json")).unwrap()).unwrap();
    for k in ["n_kv_head", "tie_embeddings", "norm_eps"] {
        assert!(json["model"].as_object_mut().unwrap().remove(k).is_some(), "{k}");
    }
    std::fs::write(ckpt.join("config.json"), json.to_string()).unwrap();
    let back = Trainer::for_inference(&ckpt, None).unwrap();
    assert_eq!((back.cfg.model.n_kv_head, back.cfg.model.tie_embeddings, back.cfg.model.norm_eps), (0, true, 1e-5));
    let diff = (eval_logits(&t) - eval_logits(&back)).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    // A resume may not change them.
    let err = Trainer::resume(&ckpt, &["model.n_kv_head=1".into()], Some(&d.path().join("b"))).err().unwrap();
    assert!(err.to_string().contains("model.n_kv_head = 1"), "{err}");
    let err = Config::resolve("[model]\nn_kv_head = 3", "x", &[]).unwrap_err();
    assert!(format!("{err:#}").contains("model.n_kv_head = 3"), "{err:#}");
}

#[test]
fn a_padded_vocabulary_loads() {
    let d = tempfile::tempdir().unwrap();
    let t = trained(&["model.vocab_size=80"], d.path());
    assert!(t.tokenizer.vocab_size() < 80);
    let back = Trainer::for_inference(&d.path().join("best"), None).unwrap();
    assert_eq!(back.cfg.model.vocab_size, 80);
    assert_eq!(eval_logits(&back).dims(), &[1, 6, 80]);
}

#[test]
fn init_from_takes_the_weights_and_starts_afresh() {
    let d = tempfile::tempdir().unwrap();
    let src = trained(&["model.tie_embeddings=false"], &d.path().join("src"));
    let ckpt = d.path().join("src/best");
    let sets: Vec<String> = vec!["train.max_iters=3".into(), "model.router.kind=gumbel".into()];
    let t = Trainer::init_from(&ckpt, None, &sets, &d.path().join("new"), IfRunExists::Refuse).unwrap();
    assert_eq!((t.state.step, t.opt.step_count(), t.cfg.model.router.kind.as_str()), (0, 0, "gumbel"));
    for (name, v) in src.params.named() {
        let w = t.params.get(&name).unwrap();
        let diff = (v.as_tensor() - w.as_tensor()).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{name}");
    }
    // A shape change is refused naming the tensor and both shapes.
    let bad: Vec<String> = vec!["model.n_kv_head=1".into()];
    let err = Trainer::init_from(&ckpt, None, &bad, &d.path().join("bad"), IfRunExists::Refuse).err().unwrap();
    let msg = format!("{err:#}");
    assert!(msg.contains("tensor h.0.attn.c_attn.") && msg.contains("[96") && msg.contains("[64"), "{msg}");
    // A missing tensor is named too.
    let tied: Vec<String> = vec!["model.tie_embeddings=true".into()];
    let err = Trainer::init_from(&ckpt, None, &tied, &d.path().join("tied"), IfRunExists::Refuse).err().unwrap();
    assert!(format!("{err:#}").contains("lm_head.weight"), "{err:#}");
}
