//! How much memory training a config takes, said before anything big is allocated, and a refusal
//! when it cannot fit: a model too large for the machine would otherwise allocate for minutes and
//! die in an allocation failure or the kernel's OOM kill, with no word on why.
//!
//! The estimate is the parameters (counted from the config, exactly as `Gpt::new` builds them)
//! times 16 bytes (f32 weights, gradients, AdamW m and v) plus the activations one micro-batch
//! keeps for the backward pass (a rough count of the f32 tensors each block saves, doubled for
//! their gradients). The machine's memory is /proc/meminfo's MemAvailable (else MemTotal), capped
//! by a cgroup v2 limit; elsewhere there is no check. `train --ignore-memory-check` skips it.

use crate::config::{Activation, Config, DeviceKind, Positions, RouterInput, RouterKind};
use anyhow::{bail, Result};
use std::sync::atomic::{AtomicBool, Ordering};

static IGNORE: AtomicBool = AtomicBool::new(false);

/// Skips the refusal (the estimate is still printed): `train --ignore-memory-check`.
pub fn ignore_check(yes: bool) {
    IGNORE.store(yes, Ordering::SeqCst);
}

/// A config's parameter count and estimated training memory, in bytes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Estimate {
    pub params: u64,
    /// Weights, gradients and AdamW's two moments: 16 bytes a parameter.
    pub state_bytes: u64,
    /// Activations of one micro-batch, kept for backward, and their gradients.
    pub activation_bytes: u64,
}

impl Estimate {
    pub fn total(&self) -> u64 {
        self.state_bytes + self.activation_bytes
    }
}

/// Bytes in GiB, or MiB below 1 GiB.
fn gib(b: u64) -> String {
    match b {
        0..0x4000_0000 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        _ => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
    }
}

/// `n` exactly and in millions or billions: "8394975008 (8.39 B)".
fn count(n: u64) -> String {
    match n {
        0..1_000_000 => n.to_string(),
        1_000_000..1_000_000_000 => format!("{n} ({:.2} M)", n as f64 / 1e6),
        _ => format!("{n} ({:.2} B)", n as f64 / 1e9),
    }
}

impl std::fmt::Display for Estimate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} parameters; estimated training memory {} (weights, gradients and AdamW moments {} + activations \
             of one micro-batch ~{})",
            count(self.params),
            gib(self.total()),
            gib(self.state_bytes),
            gib(self.activation_bytes)
        )
    }
}

/// Parameters of the model `cfg` describes (`model.vocab_size` must be set).
pub fn param_count(cfg: &Config) -> u64 {
    let m = &cfg.model;
    let (c, v, e) = (m.n_embd as u64, m.vocab_size as u64, m.moe.num_experts as u64);
    let b = u64::from(m.bias);
    let norm = c + if m.bias && m.norm != crate::config::NormKind::Rms { c } else { 0 };
    let kv = (cfg.n_kv_head() * (m.n_embd / m.n_head)) as u64;
    let linear = |i: u64, o: u64| i * o + b * o;
    let gates = if m.moe.activation == Activation::Swiglu { 2 } else { 1 };
    let mlp = |h: u64| gates * linear(c, h) + linear(h, c);
    let r = &m.router;
    let gate = if r.input == RouterInput::Token { v * e } else { e * c };
    let router = match r.kind {
        RouterKind::Hash => 0,
        RouterKind::NoisyTopk => gate + e * c, // the noise projection reads the hidden state
        RouterKind::SigmoidBias => gate + e,
        _ => gate,
    };
    let mut n = v * c + if m.positions == Positions::Learned { m.block_size as u64 * c } else { 0 };
    for i in 0..m.n_layer {
        n += 2 * norm + linear(c, c + 2 * kv) + linear(c, c);
        n += if cfg.is_moe_layer(i) { router + e * mlp(cfg.expert_hidden() as u64) } else { mlp(4 * c) };
    }
    n + norm + if m.tie_embeddings { 0 } else { v * c }
}

/// The estimate for `cfg` (vocab_size set).
pub fn estimate(cfg: &Config) -> Estimate {
    let m = &cfg.model;
    let params = param_count(cfg);
    let (bt, c, t) = ((cfg.train.batch_size * m.block_size) as u64, m.n_embd as u64, m.block_size as u64);
    let kv = (cfg.n_kv_head() * (m.n_embd / m.n_head)) as u64;
    let gates = if m.moe.activation == Activation::Swiglu { 3 } else { 2 };
    let mut floats = 0u64;
    for i in 0..m.n_layer {
        // Norms, residuals, attention in and out, q/k/v before and after rotary; the scores and
        // their softmax (B, heads, T, T).
        floats += bt * (8 * c + 2 * (c + 2 * kv)) + 2 * cfg.train.batch_size as u64 * m.n_head as u64 * t * t;
        floats += if cfg.is_moe_layer(i) {
            let (rows, e) = (bt * m.router.top_m as u64, m.moe.num_experts as u64);
            bt * 4 * e + rows * (2 * c + gates * cfg.expert_hidden() as u64)
        } else {
            bt * gates * 4 * c
        };
    }
    floats += 3 * bt * m.vocab_size as u64; // logits, their softmax and its gradient
    Estimate { params, state_bytes: 16 * params, activation_bytes: 2 * 4 * floats }
}

/// The memory this process may use, in bytes, and where the figure comes from (None: unknown).
pub fn available() -> Option<(u64, String)> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| {
        info.lines().find_map(|l| l.strip_prefix(name)?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
    };
    let (mut bytes, mut what) = match field("MemAvailable:") {
        Some(kb) => (kb * 1024, "MemAvailable in /proc/meminfo".to_string()),
        None => (field("MemTotal:")? * 1024, "MemTotal in /proc/meminfo".to_string()),
    };
    let read = |f: &str| std::fs::read_to_string(f).ok().and_then(|s| s.trim().parse::<u64>().ok());
    if let Some(max) = read("/sys/fs/cgroup/memory.max") {
        let free = max.saturating_sub(read("/sys/fs/cgroup/memory.current").unwrap_or(0));
        if free < bytes {
            (bytes, what) = (free, "the cgroup's memory.max less memory.current".into());
        }
    }
    Some((bytes, what))
}

/// The parameter count and the estimate (printed by the caller); on the CPU, refuses when the
/// estimate exceeds `avail` (unless [`ignore_check`]). Called before the model is built.
pub fn check(cfg: &Config, avail: Option<(u64, String)>) -> Result<Estimate> {
    let est = estimate(cfg);
    if cfg.train.device != DeviceKind::Cpu || IGNORE.load(Ordering::SeqCst) {
        return Ok(est);
    }
    if let Some((bytes, what)) = avail.filter(|(b, _)| est.total() > *b) {
        bail!(
            "the model is too large for this machine: training it needs an estimated {} ({} parameters: \
             weights, gradients and AdamW moments {}, activations of one micro-batch ~{}) but {} is available \
             ({what}); shrink model.n_layer, model.n_embd, model.moe.* or train.batch_size, or pass \
             --ignore-memory-check to try anyway",
            gib(est.total()),
            count(est.params),
            gib(est.state_bytes),
            gib(est.activation_bytes),
            gib(bytes)
        );
    }
    Ok(est)
}
