//! Training end to end on a tiny model: gradient audit, overfitting, resume equivalence, divergence
//! handling, checkpoint errors and generation.

mod common;
use candle_core::{Tensor, Var};
use common::tiny_config;
use gumbel_moe::generate::{generate, SampleConfig};
use gumbel_moe::model::{cross_entropy, router_surrogate};
use gumbel_moe::nn::Ctx;
use gumbel_moe::train::{checkpoint, metrics, Trainer};

fn trainer(router: &str, extra: &[&str], dir: &std::path::Path) -> Trainer {
    let mut t = Trainer::new(tiny_config(router, extra), dir).expect("trainer");
    t.progress = false;
    t
}

/// Every trainable parameter receives a non-zero gradient after one training step's backward.
fn audit(router: &str, extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let t = trainer(router, extra, dir.path());
    let (x, y) = t.train.as_ref().unwrap().random_batch(0, 0);
    let x = Tensor::from_slice(&x, (4, 16), &t.device).unwrap();
    let y = Tensor::from_slice(&y, (4, 16), &t.device).unwrap();
    let ctx = Ctx { train: true, step: 0, tau: 1.0, seed: t.cfg.seed, micro: 0 };
    let out = t.model.forward(&x, &ctx).unwrap();
    let mut loss = (cross_entropy(&out.logits, &y).unwrap() + &out.aux_loss).unwrap();
    // The REINFORCE surrogate, as the trainer adds it.
    let mut baseline = f64::NAN;
    if let Some(s) = router_surrogate(&out, &y, &mut baseline, 0.99).unwrap() {
        loss = (loss + s).unwrap();
    }
    let grads = loss.backward().unwrap();
    let named = t.params.named();
    assert!(!named.is_empty());
    // sigmoid_bias's expert bias is moved by its balancing rule, never by a gradient.
    for (name, v) in named.into_iter().filter(|(n, _)| !n.ends_with("expert_bias")) {
        let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{router} {extra:?}: no gradient for {name}"));
        let s = g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(s > 0.0 && s.is_finite(), "{router} {extra:?}: gradient of {name} is {s}");
    }
}

/// The training step's gradients (`Gpt::forward_train`: the fused experts' handed out of band,
/// gathered by `GptOutput::param_grads`) equal autograd's through `Gpt::forward`, parameter by
/// parameter, and a parameter has one in both or in neither (an expert without rows).
fn training_grads_match_autograd(router: &str, extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let t = trainer(router, extra, dir.path());
    let (x, y) = t.train.as_ref().unwrap().random_batch(0, 0);
    let x = Tensor::from_slice(&x, (4, 16), &t.device).unwrap();
    let y = Tensor::from_slice(&y, (4, 16), &t.device).unwrap();
    let ctx = Ctx { train: true, step: 0, tau: 1.0, seed: t.cfg.seed, micro: 0 };
    let named = t.params.named();
    let grads = |packed: bool| {
        let out = if packed { t.model.forward_train(&x, &ctx) } else { t.model.forward(&x, &ctx) }.unwrap();
        assert_eq!(out.expert_grads.is_empty(), !packed, "out-of-band expert gradients only from forward_train");
        let loss = (cross_entropy(&out.logits, &y).unwrap() + &out.aux_loss).unwrap();
        let gs = loss.backward().unwrap();
        out.param_grads(&gs, &named).unwrap()
    };
    let (plain, packed) = (grads(false), grads(true));
    let mut experts = 0;
    for (((name, _), a), b) in named.iter().zip(&plain).zip(&packed) {
        if name.ends_with("expert_bias") {
            continue;
        }
        assert_eq!(a.is_some(), b.is_some(), "{router} {extra:?}: a gradient for {name} from one form only");
        let (Some(a), Some(b)) = (a, b) else { continue };
        assert_eq!(a.dims(), b.dims(), "{name}");
        let (va, vb) =
            (a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert_eq!(va, vb, "{router} {extra:?}: {name}");
        experts += name.contains(".experts.") as usize;
    }
    assert!(experts > 0, "{router} {extra:?}: the config has no expert parameters to pack");
}

#[test]
fn training_step_gradients_match_autograd() {
    training_grads_match_autograd("gumbel", &[]);
    training_grads_match_autograd("softmax_topk", &["model.router.top_m=2"]);
    training_grads_match_autograd("gumbel", &["model.bias=false"]);
    // More experts than a batch reaches: the experts without rows get no gradient in either form.
    training_grads_match_autograd("gumbel", &["model.moe.num_experts=64"]);
    // SwiGLU experts and a SwiGLU dense block (the default config's block): the fused expert op
    // with a gate, and the swiglu op.
    training_grads_match_autograd(
        "gumbel",
        &["model.moe.activation=\"swiglu\"", "model.moe_every=2", "model.bias=false"],
    );
    training_grads_match_autograd("gumbel", &["model.moe.activation=\"swiglu\"", "model.moe_every=2"]);
}

#[test]
fn gradient_audit_every_router_kind() {
    audit("gumbel", &[]);
    audit("gumbel", &["model.router.hard=false"]);
    audit("gumbel", &["model.router.top_m=2", "model.positions=\"learned\""]);
    audit("softmax_topk", &[]);
    audit("softmax_topk", &["model.router.top_m=2", "model.norm=\"rms\""]);
    audit("dense", &["model.moe_every=2", "model.moe.activation=\"swiglu\""]);
    audit("noisy_topk", &["model.router.top_m=2", "model.router.noise_init_std=0.02"]);
    audit("sigmoid_bias", &["model.router.top_m=2"]);
    audit("hash", &[]);
    // Every learned router can read the input token instead of the hidden state.
    audit("gumbel", &["model.router.input=token"]);
    audit("softmax_topk", &["model.router.input=token"]);
    audit("dense", &["model.router.input=token"]);
    audit("noisy_topk", &["model.router.input=token", "model.router.top_m=2", "model.router.noise_init_std=0.02"]);
    audit("sigmoid_bias", &["model.router.input=token", "model.router.top_m=2"]);
    audit("reinforce", &["model.router.input=token"]);
    audit("reinforce", &[]);
}

#[test]
fn overfits_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = trainer("gumbel", &["train.weight_decay=0"], dir.path());
    let (x, y) = t.train.as_ref().unwrap().random_batch(0, 0);
    let x = Tensor::from_slice(&x, (4, 16), &t.device).unwrap();
    let y = Tensor::from_slice(&y, (4, 16), &t.device).unwrap();
    let named = t.params.named();
    let (mut first, mut last) = (0.0, 0.0);
    for step in 0..150u64 {
        let ctx = Ctx { train: true, step, tau: 1.0, seed: 1, micro: 0 };
        let out = t.model.forward(&x, &ctx).unwrap();
        let ce = cross_entropy(&out.logits, &y).unwrap();
        let l = ce.to_scalar::<f32>().unwrap();
        if step == 0 {
            first = l;
        }
        last = l;
        let g = (ce + out.aux_loss).unwrap().backward().unwrap();
        let grads: Vec<Option<Tensor>> = named.iter().map(|(_, v)| g.get(v.as_tensor()).cloned()).collect();
        t.opt.step(&grads, 3e-3).unwrap();
    }
    assert!(first > 3.5, "initial loss {first} should be near ln(65) = 4.17");
    assert!(last < 0.3, "loss after 150 steps on one batch: {last} (from {first})");
}

fn losses(dir: &std::path::Path) -> Vec<String> {
    metrics::read(&dir.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .filter(|v| v.get("event").is_none())
        .map(|v| {
            format!(
                "{} {} {}",
                v["step"],
                v.get("train_loss").map(|x| x.to_string()).unwrap_or_default(),
                v.get("val_loss").map(|x| x.to_string()).unwrap_or_default()
            )
        })
        .collect()
}

fn weights(ckpt: &std::path::Path) -> Vec<(String, Vec<f32>)> {
    let m = candle_core::safetensors::load(ckpt.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let mut v: Vec<_> = m.into_iter().map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Training 2N steps in one go and N + resume N give bit-identical losses and weights.
#[test]
fn resume_is_bit_identical() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let extra = ["train.grad_accum=2", "model.dropout=0.1"];
    trainer("gumbel", &extra, a.path()).fit().unwrap();
    let mut half = extra.to_vec();
    half.push("train.max_iters=3");
    trainer("gumbel", &half, b.path()).fit().unwrap();
    let mut r = Trainer::resume(b.path(), &["train.max_iters=6".into()], None).unwrap();
    r.progress = false;
    assert_eq!(r.state.step, 3);
    r.fit().unwrap();
    let (la, lb) = (losses(a.path()), losses(b.path()));
    assert_eq!(la.len(), 6, "{la:?}");
    assert_eq!(la, lb);
    assert_eq!(weights(&a.path().join("ckpt-0000006")), weights(&b.path().join("ckpt-0000006")));
    // The state file says where the RNG stands.
    let st = checkpoint::load(&b.path().join("ckpt-0000006")).unwrap().state;
    assert_eq!((st.step, st.rng_next_step), (6, 6));
}

#[test]
fn checkpoints_keep_last_and_best() {
    let d = tempfile::tempdir().unwrap();
    let mut t = trainer("softmax_topk", &["train.max_iters=9", "train.keep_last=2"], d.path());
    t.fit().unwrap();
    let mut names: Vec<String> =
        std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    names.sort();
    assert_eq!(names, ["best", "ckpt-0000006", "ckpt-0000009", "config.json", "metrics.jsonl"]);
    let m = metrics::read(&d.path().join("metrics.jsonl")).unwrap();
    let done = m.last().unwrap();
    assert_eq!(done["event"], "done");
    assert_eq!(done["step"], 9);
    for key in ["train_loss", "lr", "tau", "aux_loss", "tok_per_s"] {
        assert!(m[0].get(key).is_some(), "first metrics line lacks {key}: {}", m[0]);
    }
    let best = checkpoint::load(&d.path().join("best")).unwrap().state.best_val_loss.unwrap();
    let min = m.iter().filter_map(|v| v.get("val_loss").and_then(|x| x.as_f64())).fold(f64::INFINITY, f64::min);
    assert_eq!(best, min);
}

/// A NaN in the router stops training at that step with an error naming it; the last good
/// checkpoint survives and loads.
#[test]
fn divergence_stops_with_a_clear_error_and_keeps_the_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let mut t = trainer("gumbel", &["train.max_iters=3"], d.path());
    t.fit().unwrap();
    let w: Var = t.params.get("h.0.moe.router.weight").unwrap();
    w.set(&(w.as_tensor() * f64::NAN).unwrap()).unwrap();
    t.cfg.train.max_iters = 6;
    let e = format!("{:#}", t.fit().unwrap_err());
    assert!(e.contains("non-finite router logit") && e.contains("step 3") && e.contains("layer 0"), "{e}");
    let ok = Trainer::for_inference(&d.path().join("ckpt-0000003"), None).unwrap();
    assert!(ok.full_val_loss().unwrap().is_finite());
}

#[test]
fn bad_checkpoints_name_the_problem() {
    let d = tempfile::tempdir().unwrap();
    trainer("gumbel", &["train.max_iters=3"], d.path()).fit().unwrap();
    let ck = d.path().join("ckpt-0000003");
    // A model of another width: the error names the tensor and both shapes. (Models built only to
    // load into get their own, empty, directories: `d` holds a run.)
    let scratch = tempfile::tempdir().unwrap();
    let other = trainer("gumbel", &["model.n_embd=48"], scratch.path());
    let e = format!("{:#}", checkpoint::load_weights(&ck.join("model.safetensors"), &other.params).unwrap_err());
    assert!(e.contains("h.0.attn.c_attn.bias") && e.contains("[96]") && e.contains("[144]"), "{e}");
    // A missing tensor.
    let mut m = candle_core::safetensors::load(ck.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    m.remove("ln_f.weight");
    let partial = d.path().join("partial.safetensors");
    candle_core::safetensors::save(&m, &partial).unwrap();
    let same = trainer("gumbel", &[], scratch.path());
    let e = format!("{:#}", checkpoint::load_weights(&partial, &same.params).unwrap_err());
    assert!(e.contains("missing tensor ln_f.weight"), "{e}");
    // A truncated file.
    let bytes = std::fs::read(ck.join("model.safetensors")).unwrap();
    std::fs::write(ck.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let e = format!("{:#}", Trainer::for_inference(&ck, None).err().expect("truncated checkpoint must fail"));
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");
    // Not a checkpoint at all.
    let e = format!("{:#}", Trainer::for_inference(&d.path().join("nope"), None).err().unwrap());
    assert!(e.contains("nope") && e.contains("does not exist"), "{e}");
}

#[test]
fn bad_text_sources_name_the_file() {
    let d = tempfile::tempdir().unwrap();
    let empty = d.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let src = format!("data.source={:?}", empty.display().to_string());
    let e = format!("{:#}", Trainer::new(tiny_config("gumbel", &[&src]), d.path()).err().unwrap());
    assert!(e.contains("empty.txt") && e.contains("empty"), "{e}");
    let bin = d.path().join("bin.txt");
    std::fs::write(&bin, b"abc\xff\xfedef").unwrap();
    let src = format!("data.source={:?}", bin.display().to_string());
    let e = format!("{:#}", Trainer::new(tiny_config("gumbel", &[&src]), d.path()).err().unwrap());
    assert!(e.contains("bin.txt") && e.contains("UTF-8"), "{e}");
}

#[test]
fn generation_is_seeded_and_continues_the_prompt() {
    let d = tempfile::tempdir().unwrap();
    trainer("gumbel", &["train.max_iters=3"], d.path()).fit().unwrap();
    let t = Trainer::for_inference(d.path(), None).unwrap();
    let s = SampleConfig { max_new_tokens: 40, temperature: 1.0, top_k: 10, seed: 5 };
    let ctx = Ctx::eval(t.cfg.seed, 1.0);
    let a = generate(&t.model, &t.tokenizer, "ROMEO:", &s, &t.device, ctx).unwrap();
    let b = generate(&t.model, &t.tokenizer, "ROMEO:", &s, &t.device, ctx).unwrap();
    assert_eq!(a, b);
    assert!(a.starts_with("ROMEO:") && a.chars().count() == 46, "{a:?}");
    let c = generate(&t.model, &t.tokenizer, "ROMEO:", &SampleConfig { seed: 6, ..s.clone() }, &t.device, ctx).unwrap();
    assert_ne!(a, c);
    assert!(generate(&t.model, &t.tokenizer, "", &s, &t.device, ctx).is_err());
}

/// The fused ops (router, balance statistics, dispatch / combine) and the plain-tensor reference
/// train to the same losses on the CPU: the same routing decisions, and losses equal to rounding
/// (the fused softmax `exp`, the chunked balance sums and the combine order round differently).
#[test]
fn fused_and_reference_routers_train_identically() {
    for hard in ["true", "false"] {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let h = format!("model.router.hard={hard}");
        trainer("gumbel", &["model.router.impl=\"fused\"", &h], a.path()).fit().unwrap();
        trainer("gumbel", &["model.router.impl=\"reference\"", &h], b.path()).fit().unwrap();
        let (ma, mb) = (
            metrics::read(&a.path().join("metrics.jsonl")).unwrap(),
            metrics::read(&b.path().join("metrics.jsonl")).unwrap(),
        );
        assert_eq!(ma.len(), mb.len());
        let mut n = 0;
        for (x, y) in ma.iter().zip(&mb) {
            if let Some(l) = x.get("train_loss") {
                let (l, r) = (l.as_f64().unwrap(), y["train_loss"].as_f64().unwrap());
                assert!((l - r).abs() <= 1e-5 * l.abs(), "hard = {hard}: train loss {l} vs {r}");
                assert_eq!(x["tokens_per_expert"], y["tokens_per_expert"], "hard = {hard}: routing differs");
                n += 1;
            }
            // Eval without noise: the soft path's softmax may differ in the last ulp (seen: 2e-8).
            if let Some(v) = x.get("val_loss") {
                let (v, w) = (v.as_f64().unwrap(), y["val_loss"].as_f64().unwrap());
                assert!((v - w).abs() <= 1e-6 * v.abs(), "hard = {hard}: val {v} vs {w}");
            }
        }
        assert_eq!(n, 6);
    }
}
