//! Semantic checks of a resolved config, after the schema (keys, types and names) has been read.

use super::{Config, Positions, RouterInput, RouterKind, TokenizerType};
use anyhow::{bail, Result};

impl Config {
    /// Semantic checks; each error names the key.
    pub fn validate(&self) -> Result<()> {
        let m = &self.model;
        let r = &m.router;
        let e = m.moe.num_experts;
        if r.input == RouterInput::Token && r.kind == RouterKind::Hash {
            bail!("model.router.input = \"token\" needs a learned router; `hash` has no parameters (it maps token ids itself)");
        }
        for (k, v) in [
            ("model.block_size", m.block_size),
            ("model.n_layer", m.n_layer),
            ("model.n_head", m.n_head),
            ("model.n_embd", m.n_embd),
            ("train.batch_size", self.train.batch_size),
            ("train.grad_accum", self.train.grad_accum),
        ] {
            if v == 0 {
                bail!("config key `{k}` must be > 0");
            }
        }
        if !m.n_embd.is_multiple_of(m.n_head) {
            bail!("model.n_embd = {} must be divisible by model.n_head = {}", m.n_embd, m.n_head);
        }
        if m.positions == Positions::Rotary && !(m.n_embd / m.n_head).is_multiple_of(2) {
            bail!("model.positions = \"rotary\" needs an even head size, got {}", m.n_embd / m.n_head);
        }
        if !(0.0..1.0).contains(&m.dropout) {
            bail!("model.dropout = {} must be in [0, 1)", m.dropout);
        }
        let ep = self.train.expert_parallel;
        if ep == 0 {
            bail!("train.expert_parallel = 0: it is the number of ranks a layer's experts are split over (1 = off)");
        }
        if ep > 1 && (m.moe_every == 0 || !e.is_multiple_of(ep)) {
            bail!(
                "train.expert_parallel = {ep} splits each MoE layer's experts over {ep} ranks: it needs MoE layers \
                 (model.moe_every > 0) and a number of experts it divides (model.moe.num_experts = {e})"
            );
        }
        if m.moe_every > 0 {
            if e == 0 {
                bail!("model.moe.num_experts must be > 0");
            }
            if r.top_m == 0 || r.top_m > e {
                bail!("model.router.top_m = {} must be in 1..=num_experts ({e})", r.top_m);
            }
            if r.kind == RouterKind::Gumbel {
                if r.prefilter > e {
                    bail!("model.router.prefilter K = {} exceeds model.moe.num_experts E = {e}", r.prefilter);
                }
                if r.prefilter < r.top_m {
                    bail!("model.router.prefilter K = {} is below model.router.top_m m = {}", r.prefilter, r.top_m);
                }
            }
            if !(r.tau0.is_finite() && r.tau0 > 0.0) {
                bail!("model.router.tau0 = {} must be > 0", r.tau0);
            }
            if !(r.tau_min.is_finite() && r.tau_min > 0.0) {
                bail!("model.router.tau_min = {} must be > 0", r.tau_min);
            }
            if r.lr_scale.is_nan() || r.lr_scale <= 0.0 {
                bail!("model.router.lr_scale = {} must be > 0", r.lr_scale);
            }
            if !(r.decay_scale >= 0.0 && r.decay_scale.is_finite()) {
                bail!("model.router.decay_scale = {} must be finite and >= 0", r.decay_scale);
            }
            if r.tau_decay < 0.0 {
                bail!("model.router.tau_decay = {} must be >= 0", r.tau_decay);
            }
            for (key, v) in [
                ("model.router.noise_init_std", r.noise_init_std),
                ("model.router.load_coef", r.load_coef),
                ("model.router.importance_coef", r.importance_coef),
                ("model.router.bias_update_rate", r.bias_update_rate),
            ] {
                if !(v >= 0.0 && v.is_finite()) {
                    bail!("{key} = {v} must be finite and >= 0");
                }
            }
            if !(0.0..1.0).contains(&r.reinforce_baseline_decay) {
                bail!("model.router.reinforce_baseline_decay = {} must be in [0, 1)", r.reinforce_baseline_decay);
            }
            if matches!(r.kind, RouterKind::Hash | RouterKind::Reinforce) && r.top_m != 1 {
                bail!(
                    "model.router.top_m = {} but the {} router sends each token to exactly 1 expert",
                    r.top_m,
                    r.kind
                );
            }
            if m.moe.capacity_factor < 0.0 {
                bail!("model.moe.capacity_factor = {} must be >= 0 (0 = dropless)", m.moe.capacity_factor);
            }
        }
        if !(self.data.train_fraction > 0.0 && self.data.train_fraction < 1.0) {
            bail!("data.train_fraction = {} must be in (0, 1)", self.data.train_fraction);
        }
        if self.data.tokenizer == TokenizerType::Bpe && self.data.bpe_vocab_size < 258 {
            bail!("data.bpe_vocab_size = {} must be >= 258 (256 bytes + specials)", self.data.bpe_vocab_size);
        }
        let t = &self.train;
        if t.lr.is_nan() || t.lr <= 0.0 || t.min_lr < 0.0 {
            bail!("train.lr = {} must be > 0 and train.min_lr = {} >= 0", t.lr, t.min_lr);
        }
        // An infinite rate or decay passes the comparisons above and diverges at step 1.
        for (key, v) in [
            ("train.lr", t.lr),
            ("train.min_lr", t.min_lr),
            ("train.weight_decay", t.weight_decay),
            ("train.eps", t.eps),
            ("train.grad_clip", t.grad_clip),
        ] {
            if !v.is_finite() {
                bail!("config key `{key}` = {v} must be a finite number");
            }
        }
        if !(0.0..1.0).contains(&t.beta1) || !(0.0..1.0).contains(&t.beta2) {
            bail!("train.beta1 = {} and train.beta2 = {} must be in [0, 1)", t.beta1, t.beta2);
        }
        if t.eval_interval == 0 || t.log_interval == 0 || t.eval_iters == 0 {
            bail!("train.eval_interval, train.log_interval and train.eval_iters must be > 0");
        }
        if m.n_kv_head > m.n_head || !m.n_head.is_multiple_of(self.n_kv_head()) {
            bail!("model.n_kv_head = {} must divide model.n_head = {} (0 = n_head)", m.n_kv_head, m.n_head);
        }
        if !(m.norm_eps > 0.0 && m.norm_eps.is_finite()) {
            bail!("model.norm_eps = {} must be finite and > 0", m.norm_eps);
        }
        Ok(())
    }
}
