//! The decoder: nanoGPT's GPT with an MoE feed-forward. Token embeddings (+ learned positions or
//! rotary), pre-norm blocks of causal self-attention and a feed-forward that is an MoE layer in
//! every `moe_every`-th block and a dense MLP elsewhere, a final norm and an LM head tied to the
//! token embedding (as GPT-2/nanoGPT) or, with `model.tie_embeddings = false`, its own.
//!
//! Parameter names (stable; the checkpoint format):
//! `wte.weight`, `wpe.weight` (learned positions), `h.{i}.ln_1.{weight,bias}`,
//! `h.{i}.attn.c_attn.{weight,bias}`, `h.{i}.attn.c_proj.*`, `h.{i}.ln_2.*`,
//! dense blocks: `h.{i}.mlp.c_fc.*`, `h.{i}.mlp.c_proj.*` (`c_gate` for SwiGLU),
//! MoE blocks: `h.{i}.moe.router.weight` (E, C), `h.{i}.moe.experts.{e}.c_fc.*`, `...c_proj.*`,
//! `ln_f.*`, `lm_head.weight` (V, C) when untied. Linear weights are (out, in) as in PyTorch;
//! `c_attn` rows are [q; k; v], (n_head + 2 n_kv_head) * head_size of them.

use crate::config::{Config, Positions};
use crate::moe::layer::MoeStats;
use crate::moe::{build_router, MoeLayer, RouterFactory};
use crate::nn::{ops, CausalSelfAttention, Ctx, Mlp, Norm};
use crate::ops::ExpertGrads;
use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use candle_nn::{Embedding, Init, Module, VarBuilder};
use std::collections::HashMap;

enum Ffn {
    Dense(Mlp),
    Moe(MoeLayer),
}

struct Block {
    ln_1: Norm,
    attn: CausalSelfAttention,
    ln_2: Norm,
    ffn: Ffn,
}

pub struct Gpt {
    wte: Embedding,
    wpe: Option<Embedding>,
    blocks: Vec<Block>,
    ln_f: Norm,
    /// (V, C) untied output layer (`model.tie_embeddings = false`); None: the LM head is `wte`.
    lm_head: Option<Tensor>,
    dropout: f64,
    block_size: usize,
    vocab_size: usize,
    fused: bool,
}

/// What one forward pass returns.
pub struct GptOutput {
    /// (B, T, V)
    pub logits: Tensor,
    /// Scalar: the sum over MoE layers of their aux losses (zero without MoE).
    pub aux_loss: Tensor,
    /// One entry per MoE layer.
    pub moe_stats: Vec<MoeStats>,
    /// One (B*T,) tensor per MoE layer whose router learns by a score-function estimator
    /// (reinforce, training only): the log-probability of each token's sampled expert. Empty
    /// otherwise. See [`router_surrogate`].
    pub score_logps: Vec<Tensor>,
    /// [`Gpt::forward_train`] only: each MoE layer's expert gradients, handed out of band.
    pub expert_grads: Vec<ExpertGrads>,
}

impl GptOutput {
    /// The gradient of each of `params` from the `GradStore` of a backward through this output, the
    /// experts' from [`GptOutput::expert_grads`] (None: no gradient, e.g. an expert without rows).
    pub fn param_grads(&self, gs: &GradStore, params: &[(String, Var)]) -> Result<Vec<Option<Tensor>>> {
        let mut cut = HashMap::new();
        for p in &self.expert_grads {
            cut.extend(p.grads());
        }
        Ok(params
            .iter()
            .map(|(_, v)| gs.get(v.as_tensor()).cloned().or_else(|| cut.remove(&v.as_tensor().id())))
            .collect())
    }
}

impl Gpt {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        Self::new_with_router(cfg, vb, &build_router)
    }

    /// Builds the model with routers from `router` (the hook for user-defined routers).
    pub fn new_with_router(cfg: &Config, vb: VarBuilder, router: &RouterFactory) -> Result<Self> {
        let m = &cfg.model;
        if m.vocab_size == 0 {
            candle_core::bail!("model.vocab_size is 0: set it from the tokenizer before building the model");
        }
        let emb = |n: usize, name: &str| -> Result<Embedding> {
            let w =
                vb.get_with_hints((n, m.n_embd), &format!("{name}.weight"), Init::Randn { mean: 0.0, stdev: 0.02 })?;
            Ok(Embedding::new(w, m.n_embd))
        };
        let wte = emb(m.vocab_size, "wte")?;
        let wpe = if m.positions == Positions::Learned { Some(emb(m.block_size, "wpe")?) } else { None };
        let mut blocks = Vec::with_capacity(m.n_layer);
        for i in 0..m.n_layer {
            let vb = vb.pp("h").pp(i);
            let ffn = if cfg.is_moe_layer(i) {
                Ffn::Moe(MoeLayer::new(cfg, i, vb.pp("moe"), router)?)
            } else {
                Ffn::Dense(Mlp::new(cfg, 4 * m.n_embd, vb.pp("mlp"))?)
            };
            blocks.push(Block {
                ln_1: Norm::new(m.n_embd, m.norm, m.bias, m.fused_layers, vb.pp("ln_1"))?.with_eps(m.norm_eps),
                attn: CausalSelfAttention::new(cfg, i, vb.pp("attn"))?,
                ln_2: Norm::new(m.n_embd, m.norm, m.bias, m.fused_layers, vb.pp("ln_2"))?.with_eps(m.norm_eps),
                ffn,
            });
        }
        let ln_f = Norm::new(m.n_embd, m.norm, m.bias, m.fused_layers, vb.pp("ln_f"))?.with_eps(m.norm_eps);
        let lm_head = if m.tie_embeddings { None } else { Some(emb(m.vocab_size, "lm_head")?.embeddings().clone()) };
        Ok(Self {
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
            dropout: m.dropout,
            block_size: m.block_size,
            vocab_size: m.vocab_size,
            fused: m.fused_layers,
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Every MoE layer's [`MoeLayer::after_step`]: the trainer calls it once after each optimizer
    /// step (router state outside the gradient, e.g. the sigmoid router's balancing bias).
    pub fn after_step(&self) -> Result<()> {
        for block in &self.blocks {
            if let Ffn::Moe(moe) = &block.ffn {
                moe.after_step()?;
            }
        }
        Ok(())
    }

    /// Splits every MoE layer's experts over the ranks of `group` in the training forward
    /// ([`Gpt::forward_train`]; see [`crate::moe::expert_parallel`]).
    pub fn set_expert_group(&mut self, group: &crate::moe::ExpertGroup) -> Result<()> {
        for block in &mut self.blocks {
            if let Ffn::Moe(moe) = &mut block.ffn {
                moe.set_expert_group(group.clone())?;
            }
        }
        Ok(())
    }

    /// idx: (B, T) u32 token ids, T <= block_size -> logits (B, T, V) and aux losses.
    pub fn forward(&self, idx: &Tensor, ctx: &Ctx) -> Result<GptOutput> {
        self.forward_impl(idx, ctx, false)
    }

    /// [`Gpt::forward`] as the training step runs it: the fused experts of each MoE layer read their
    /// weights in place and hand their gradients out of band ([`MoeLayer::forward_train`]), so a
    /// step's expert work grows with the experts its tokens reach. Take the parameters' gradients
    /// with [`GptOutput::param_grads`]: the experts' are not in the `GradStore`.
    pub fn forward_train(&self, idx: &Tensor, ctx: &Ctx) -> Result<GptOutput> {
        self.forward_impl(idx, ctx, true)
    }

    fn forward_impl(&self, idx: &Tensor, ctx: &Ctx, pack: bool) -> Result<GptOutput> {
        let (_b, t) = idx.dims2()?;
        if t > self.block_size {
            candle_core::bail!("sequence length {t} exceeds model.block_size {}", self.block_size);
        }
        let dev = idx.device();
        let mut x = self.wte.forward(idx)?; // (B, T, C)
        if let Some(wpe) = &self.wpe {
            let pos = Tensor::arange(0u32, t as u32, dev)?;
            x = x.broadcast_add(&wpe.forward(&pos)?)?; // + (T, C)
        }
        x = ops::dropout(&x, self.dropout, ctx.train, ctx.seed, ctx.step, ctx.micro, 0xffff)?;
        let mask = ops::causal_mask(t, x.dtype(), dev)?; // (T, T)
        let mut aux = Tensor::zeros((), x.dtype(), dev)?;
        let mut moe_stats = Vec::new();
        let mut score_logps = Vec::new();
        let mut expert_grads = Vec::new();
        for (i, block) in self.blocks.iter().enumerate() {
            x = (&x + block.attn.forward(&block.ln_1.forward(&x)?, &mask, ctx)?)?;
            let h = block.ln_2.forward(&x)?;
            let f = match &block.ffn {
                Ffn::Dense(mlp) => {
                    let (y, grads) = mlp.forward_block(&h, pack)?;
                    expert_grads.extend(grads);
                    y
                }
                Ffn::Moe(moe) => {
                    // The token ids go along for routers that route by id (hash layers).
                    let out = if pack {
                        moe.forward_train(&h, ctx, Some(idx))?
                    } else {
                        moe.forward_with_ids(&h, ctx, Some(idx))?
                    };
                    expert_grads.extend(out.expert_grads);
                    aux = (aux + out.aux_loss)?;
                    moe_stats.push(out.stats);
                    score_logps.extend(out.score_logp);
                    out.y
                }
            };
            let f = ops::dropout(&f, self.dropout, ctx.train, ctx.seed, ctx.step, ctx.micro, 4 * i as u32 + 2)?;
            x = (x + f)?;
        }
        let x = self.ln_f.forward(&x)?;
        // LM head, tied to the token embedding unless untied: (B*T, C) x (C, V) -> (B, T, V).
        let head = self.lm_head.as_ref().unwrap_or(self.wte.embeddings()); // (V, C)
        let logits = if self.fused {
            crate::ops::linear(&x, head, None)? // (B, T, V)
        } else {
            crate::ops::linear_reference(&x, head, None)?
        };
        Ok(GptOutput { logits, aux_loss: aux, moe_stats, score_logps, expert_grads })
    }
}

/// Mean cross-entropy of logits (B, T, V) against targets (B, T), differentiable.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    per_token_cross_entropy(logits, targets)?.mean_all()
}

/// Cross-entropy of each position: logits (B, T, V), targets (B, T) -> (B*T,) in (B, T) order,
/// the order of the rows an MoE layer routes.
pub fn per_token_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let logp = ops::log_softmax(&logits.reshape((b * t, v))?)?; // (N, V)
    logp.gather(&targets.reshape((b * t, 1))?, 1)?.neg()?.flatten_all() // (N,)
}

/// The REINFORCE surrogate of a training forward pass, to ADD to the loss before `backward`:
/// sum over the layers in `out.score_logps` of sum_t (L_t - b) * log p(chosen_t) / N, with L_t the
/// detached per-token cross-entropy against `targets` (B, T). `baseline` is the moving average b
/// (start at `f64::NAN`, keep it across steps, and save it with the trainer state for an exact
/// resume); `decay` is `model.router.reinforce_baseline_decay`. None when no layer has score
/// log-probs (every router but reinforce, and eval passes).
pub fn router_surrogate(out: &GptOutput, targets: &Tensor, baseline: &mut f64, decay: f64) -> Result<Option<Tensor>> {
    if out.score_logps.is_empty() {
        return Ok(None);
    }
    let per_token = per_token_cross_entropy(&out.logits.detach(), targets)?; // (N,)
    crate::moe::losses::score_function_surrogate(&out.score_logps, &per_token, baseline, decay)
}
