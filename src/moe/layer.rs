//! The MoE feed-forward layer: router -> dispatch (group tokens by expert) -> experts -> weighted
//! combine, plus the auxiliary losses and routing statistics of the call.

use super::dispatch::{capacity, plan};
use super::expert_parallel::ExpertGroup;
use super::finite::{check_on_host, nonfinite_flag};
use super::losses::{load_balance, load_balance_fused, z_loss};
use super::{RouteCtx, Router, RouterFactory, Routing};
use crate::config::{Config, RouterImpl};
use crate::nn::{Ctx, Mlp};
use crate::ops::expert_sort::expert_sort_with_flags;
use crate::ops::{combine, gather_rows, split_rows, ExpertGrads};
use candle_core::{DType, Result, Tensor, D};
use candle_nn::VarBuilder;

pub struct MoeLayer {
    router: Box<dyn Router>,
    experts: Vec<Mlp>,
    capacity_factor: f64,
    balance_coef: f64,
    z_coef: f64,
    layer: u32,
    /// model.router.impl == "fused": the balance loss through the `ops::balance_stats` kernels.
    fused_balance: bool,
    /// model.router.impl == "fused": dispatch / combine through the `ops::{expert_sort, gather_rows,
    /// combine}` kernels instead of index_select / index_add.
    fused_dispatch: bool,
    /// Expert parallel: the ranks this layer's experts are split over (training steps only).
    group: Option<ExpertGroup>,
}

/// (y (N, C), kept slots per expert, dropped slots) of one dispatch.
type Step = (Tensor, Vec<u32>, usize);

/// Routing statistics of one call: host counts from the dispatch plan, device scalars.
#[derive(Clone, Debug, Default)]
pub struct MoeStats {
    pub tokens_per_expert: Vec<u32>,
    pub dropped: usize,
    /// Token-slots routed (T * m).
    pub routed: usize,
    /// Scalar tensors, detached: load-balance loss, z-loss, mean router entropy (nats), mean
    /// top-1 probability of the noise-free softmax over all E experts.
    pub balance: Option<Tensor>,
    pub z: Option<Tensor>,
    pub entropy: Option<Tensor>,
    pub top1_prob: Option<Tensor>,
}

pub struct MoeOutput {
    /// (B, T, C)
    pub y: Tensor,
    /// Scalar: balance_coef * load_balance + z_coef * z_loss (+ the router's own loss, if any).
    pub aux_loss: Tensor,
    pub stats: MoeStats,
    /// (N,) log-probability of each token's chosen expert, N = B*T rows in (B, T) order, when the
    /// router learns by a score-function estimator (reinforce); see `model::router_surrogate`.
    pub score_logp: Option<Tensor>,
    /// The experts' gradients, handed out of band by the training form of the expert op
    /// ([`MoeLayer::forward_train`] on the CPU only): see [`ExpertGrads::grads`].
    pub expert_grads: Option<ExpertGrads>,
}

impl MoeLayer {
    pub fn new(cfg: &Config, layer: usize, vb: VarBuilder, router: &RouterFactory) -> Result<Self> {
        let m = &cfg.model.moe;
        let router = router(cfg, layer, vb.pp("router"))?;
        if router.num_experts() != m.num_experts {
            candle_core::bail!(
                "router of layer {layer} has {} experts, model.moe.num_experts = {}",
                router.num_experts(),
                m.num_experts
            );
        }
        let experts = (0..m.num_experts)
            .map(|e| Mlp::new(cfg, cfg.expert_hidden(), vb.pp("experts").pp(e)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            router,
            experts,
            capacity_factor: m.capacity_factor,
            balance_coef: m.balance_coef,
            z_coef: m.z_coef,
            layer: layer as u32,
            fused_balance: cfg.model.router.implementation == RouterImpl::Fused,
            fused_dispatch: cfg.model.router.implementation == RouterImpl::Fused,
            group: None,
        })
    }

    /// Splits the experts of the training steps' forwards over `group` ([`ExpertGroup`]); the
    /// plain forward (evaluation, generation) keeps running every expert here.
    pub fn set_expert_group(&mut self, group: ExpertGroup) -> Result<()> {
        let e = self.experts.len();
        if !self.fused_dispatch || !e.is_multiple_of(group.size()) {
            candle_core::bail!(
                "layer {}: expert parallel needs model.router.impl = \"fused\" and a number of experts ({e}) that \
                 the {} ranks of a group divide",
                self.layer,
                group.size()
            );
        }
        self.group = Some(group);
        Ok(())
    }

    pub fn num_experts(&self) -> usize {
        self.experts.len()
    }

    /// The router's hook after each optimizer step ([`Router::after_step`]).
    pub fn after_step(&self) -> Result<()> {
        self.router.after_step()
    }

    /// x: (B, T, C) -> y: (B, T, C) and the aux loss (no token ids: the hash router refuses).
    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<MoeOutput> {
        self.forward_with_ids(x, ctx, None)
    }

    /// x: (B, T, C), token_ids: (B, T) or (N,) u32 input ids of the same tokens -> y: (B, T, C)
    /// and the aux loss.
    pub fn forward_with_ids(&self, x: &Tensor, ctx: &Ctx, token_ids: Option<&Tensor>) -> Result<MoeOutput> {
        self.forward_impl(x, ctx, token_ids, false)
    }

    /// [`MoeLayer::forward_with_ids`] for a training step: the fused experts read their weights in
    /// place and a backward from the output hands each active expert's gradients out of band
    /// ([`MoeOutput::expert_grads`]), with no copy of the weights and no gradient buffer as large as
    /// all experts. Their gradients are NOT in the `GradStore`: take them with [`ExpertGrads::grads`].
    pub fn forward_train(&self, x: &Tensor, ctx: &Ctx, token_ids: Option<&Tensor>) -> Result<MoeOutput> {
        self.forward_impl(x, ctx, token_ids, true)
    }

    fn forward_impl(&self, x: &Tensor, ctx: &Ctx, token_ids: Option<&Tensor>, pack: bool) -> Result<MoeOutput> {
        let (b, t, c) = x.dims3()?;
        let n = b * t;
        let xf = x.reshape((n, c))?; // (N, C)
        let token_ids = token_ids.map(|ids| ids.flatten_all()).transpose()?; // (N,)
        let r = self.router.route(&xf, &RouteCtx { ctx: *ctx, layer: self.layer, token_ids })?;
        if r.indices.dims() != [n, r.m] {
            candle_core::bail!("router of layer {}: indices {:?} for {n} tokens", self.layer, r.indices.dims());
        }
        let e = self.experts.len();
        let cap = capacity(self.capacity_factor, n * r.m, e);
        // Non-finite logits, flagged on the device as (1,) u32; the flag comes back with the plan.
        let flag = nonfinite_flag(&r.logits)?;
        // Dispatch -> experts -> weighted combine: y (N, C), kept slots per expert, dropped slots.
        let ((y, tokens_per_expert, dropped), expert_grads) = if self.fused_dispatch {
            self.experts_fused(&xf, &r, cap, &flag, ctx, pack)?
        } else {
            (self.experts_reference(&xf, &r, cap, &flag, ctx)?, None)
        };
        let balance = if self.fused_balance {
            load_balance_fused(&r.logits, &r.indices)?
        } else {
            load_balance(&r.probs, &r.indices)?
        };
        let z = z_loss(&r.logits)?;
        let mut aux_loss = ((&balance * self.balance_coef)? + (&z * self.z_coef)?)?;
        if let Some(extra) = &r.aux_loss {
            aux_loss = (aux_loss + extra.to_dtype(balance.dtype())?)?;
        }
        let pd = r.probs.detach(); // (N, E)
        let ent = (pd.clone() * pd.clamp(1e-12, 1.0)?.log()?)?.sum(D::Minus1)?.neg()?.mean_all()?;
        let top1 = pd.max(D::Minus1)?.mean_all()?;
        let stats = MoeStats {
            tokens_per_expert,
            dropped,
            routed: n * r.m,
            balance: Some(balance.detach().to_dtype(DType::F32)?),
            z: Some(z.detach().to_dtype(DType::F32)?),
            entropy: Some(ent.to_dtype(DType::F32)?),
            top1_prob: Some(top1.to_dtype(DType::F32)?),
        };
        Ok(MoeOutput { y: y.reshape((b, t, c))?, aux_loss, stats, score_logp: r.log_prob, expert_grads })
    }

    /// The fused path: sort the slots by expert on the device, gather the rows to that order, run
    /// each expert on its contiguous block (on the rank that holds it, with expert parallel), and
    /// combine with the routing weights. Only the E + 1 offsets and the non-finite `flag` come to
    /// the host, in one copy. xf (N, C) -> (y (N, C), kept slots per expert, dropped slots).
    fn experts_fused(
        &self,
        xf: &Tensor,
        r: &Routing,
        cap: usize,
        flag: &Tensor,
        ctx: &Ctx,
        pack: bool,
    ) -> Result<(Step, Option<ExpertGrads>)> {
        let e = self.experts.len();
        let (order, flags) = expert_sort_with_flags(&r.indices, e, cap, flag)?;
        if flags[0] != 0 {
            check_on_host(&r.logits, ctx.step, self.layer)?;
        }
        let xs = gather_rows(xf, &order)?; // (N_kept, C), grouped by expert
        let counts = (order.tokens_per_expert(), order.dropped());
        let (ys, grads) = match (&self.group, pack) {
            (Some(group), true) => {
                // This rank's experts on the rows of every rank of its group, the outputs sent
                // back (every rank takes part, with or without rows).
                let (xs_mine, offsets, route) =
                    group.dispatch(&xs, &order.offsets).map_err(candle_core::Error::wrap)?;
                let (ys_mine, grads) = Self::run_experts(&xs_mine, &self.experts[group.mine(e)], &offsets, pack)?;
                (group.collect(&ys_mine, &route)?, grads) // (N_kept, C)
            }
            _ if xs.dim(0)? == 0 => return Ok(((xf.zeros_like()?, counts.0, counts.1), None)),
            _ => Self::run_experts(&xs, &self.experts, &order.offsets, pack)?,
        };
        let y = combine(&ys, &r.weights, &order)?; // (N, C)
        Ok(((y, counts.0, counts.1), grads))
    }

    /// `experts` on their blocks of xs (N, C) (`offsets`: one block each) -> (N, C), and the
    /// out-of-band gradients of the training form. Rows that reach no expert (N = 0) come back as
    /// xs itself, so the graph still links the output to the input.
    fn run_experts(xs: &Tensor, experts: &[Mlp], offsets: &[u32], pack: bool) -> Result<(Tensor, Option<ExpertGrads>)> {
        if xs.dim(0)? == 0 {
            return Ok((xs.clone(), None));
        }
        let grouped: Option<Vec<_>> = experts.iter().map(|x| x.expert_params()).collect();
        if let Some(params) = grouped {
            return if pack {
                crate::ops::expert_mlp_train(xs, &params, offsets)
            } else {
                Ok((crate::ops::expert_mlp(xs, &params, offsets)?, None))
            };
        }
        let mut outs = Vec::with_capacity(experts.len());
        for (expert, rows) in experts.iter().zip(split_rows(xs, offsets)?) {
            if let Some(rows) = rows {
                outs.push(expert.forward(&rows)?); // (n_e, C)
            }
        }
        Ok((Tensor::cat(&outs, 0)?, None))
    }

    /// The reference path: host plan (the indices and the non-finite `flag` copied in one
    /// transfer), index_select per expert, weights, one index_add back.
    fn experts_reference(&self, xf: &Tensor, r: &Routing, cap: usize, flag: &Tensor, ctx: &Ctx) -> Result<Step> {
        let (n, e) = (xf.dim(0)?, self.experts.len());
        let mut host = Tensor::cat(&[&r.indices.flatten_all()?, flag], 0)?.to_vec1::<u32>()?;
        if host.pop() != Some(0) {
            check_on_host(&r.logits, ctx.step, self.layer)?;
        }
        if let Some(f) = host.iter().position(|&i| i as usize >= e) {
            candle_core::bail!(
                "router of layer {}: expert {} of token {}, slot {} is out of range (E = {e})",
                self.layer,
                host[f],
                f / r.m,
                f % r.m
            );
        }
        let p = plan(&host, n, r.m, e, cap);
        let w_flat = r.weights.flatten_all()?; // (N * m)
        let mut outs = Vec::with_capacity(e);
        let mut rows = Vec::with_capacity(n * r.m);
        for (ex, expert) in self.experts.iter().enumerate() {
            if p.tokens[ex].is_empty() {
                continue;
            }
            let tok = Tensor::new(p.tokens[ex].as_slice(), xf.device())?;
            let slots = Tensor::new(p.slots[ex].as_slice(), xf.device())?;
            let xe = xf.index_select(&tok, 0)?; // (n_e, C)
            let we = w_flat.index_select(&slots, 0)?.unsqueeze(1)?; // (n_e, 1)
            outs.push(expert.forward(&xe)?.broadcast_mul(&we)?); // (n_e, C)
            rows.extend_from_slice(&p.tokens[ex]);
        }
        let y = if outs.is_empty() {
            xf.zeros_like()?
        } else {
            // One deterministic scatter-add of every expert's rows back to their tokens.
            let rows = Tensor::new(rows.as_slice(), xf.device())?;
            xf.zeros_like()?.index_add(&rows, &Tensor::cat(&outs, 0)?, 0)?
        };
        Ok((y, p.tokens.iter().map(|v| v.len() as u32).collect(), p.dropped))
    }
}
