//! The training loop: nanoGPT's train.py for the MoE model. Seeded and deterministic on the CPU:
//! batches, Gumbel noise and dropout are Philox draws keyed by the step, so a run resumed from a
//! checkpoint continues bit for bit where it stopped.

use super::checkpoint::{self, TrainerState};
use super::data_parallel;
use super::fs_steps::FsSteps;
use super::grad_sum::{clip_scale, sum_grads, sum_grads_with};
use super::metrics::MetricsWriter;
use super::optim::{AdamW, AdamWConfig};
use super::parallel::{worker_count, Workers};
use super::run_data::RunData;
use super::run_dir::{self, IfRunExists};
use super::schedule::{lr_at, tau_at};
use super::sharded::{self, Shards};
pub use super::step::clip_grads;
use super::step::{eval_batch_loss, micro_step, MicroOut};
use super::telemetry::{StepRouting, Telemetry};
use crate::config::{Config, DeviceKind, RouterKind};
use crate::data::{Batcher, Tokenizer};
use crate::dist::Comm;
use crate::model::Gpt;
use crate::moe::{ExpertGroup, RouterFactory};
use crate::nn::{Ctx, Params};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Batches for evaluation are keyed far from any training step.
const EVAL_KEY: u64 = 1 << 40;

/// "cpu", "cuda", "cuda:N" or "metal".
pub fn device_from_str(s: &str) -> Result<Device> {
    open_device(s.parse()?)
}

/// The Candle device `train.device` names.
pub fn open_device(d: DeviceKind) -> Result<Device> {
    Ok(match d {
        DeviceKind::Cpu => Device::Cpu,
        // Without an ordinal, the rank's GPU on its machine under a launcher (local rank), else 0.
        DeviceKind::Cuda(n) => Device::new_cuda(n.unwrap_or_else(crate::dist::launch::local_rank))?,
        DeviceKind::Metal => Device::new_metal(0)?,
    })
}

/// A model with its parameters, tokenizer and data, ready to train, evaluate or sample.
pub struct Trainer {
    pub cfg: Config,
    pub device: Device,
    pub params: Params,
    pub model: Gpt,
    pub opt: AdamW,
    pub tokenizer: Tokenizer,
    pub train: Option<Batcher>,
    pub val: Batcher,
    pub state: TrainerState,
    pub out_dir: PathBuf,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
    /// Threads that run micro-batches and evaluation batches side by side.
    pub workers: Workers,
    /// The file-system steps of every save and prune ([`FsSteps::failing_at`] stops one, for the
    /// crash tests).
    pub fs: FsSteps,
    /// The ranks this run trains on ([`crate::dist::world`]; one process: [`crate::dist::Single`]).
    /// Rank 0 alone writes files.
    pub comm: Arc<dyn Comm>,
    /// What identifies the training data, compared across ranks at the start.
    data_id: String,
    /// Several ranks on the CPU: each rank's range of parameters in the shared optimizer step
    /// ([`super::sharded`]).
    shards: Option<Shards>,
}

/// Outcome of `Trainer::fit`.
#[derive(Clone, Debug)]
pub struct FitSummary {
    pub step: u64,
    pub val_loss: f64,
    pub wall_s: f64,
    pub tok_per_s: f64,
}

impl Trainer {
    /// A fresh run from `cfg`, writing to `out_dir`. Refuses a directory that already holds a run
    /// (see [`run_dir`]).
    pub fn new(cfg: Config, out_dir: &Path) -> Result<Self> {
        Self::new_with(cfg, out_dir, &crate::moe::build_router, IfRunExists::Refuse)
    }

    /// A fresh run with user-defined routers (refusing a directory that holds a run).
    pub fn new_with_router(cfg: Config, out_dir: &Path, router: &RouterFactory) -> Result<Self> {
        Self::new_with(cfg, out_dir, router, IfRunExists::Refuse)
    }

    /// A fresh run; `if_exists` says what to do when `out_dir` holds an earlier run. With
    /// [`IfRunExists::Overwrite`] that run's files are deleted once the model is built.
    pub fn new_with(cfg: Config, out_dir: &Path, router: &RouterFactory, if_exists: IfRunExists) -> Result<Self> {
        Self::new_on(cfg, out_dir, router, if_exists, crate::dist::world()?)
    }

    /// [`Trainer::new_with`] on the ranks of `comm` (each rank calls it; rank 0 checks and clears
    /// the directory).
    pub fn new_on(
        cfg: Config,
        out_dir: &Path,
        router: &RouterFactory,
        if_exists: IfRunExists,
        comm: Arc<dyn Comm>,
    ) -> Result<Self> {
        let lead = comm.rank() == 0;
        if lead && if_exists == IfRunExists::Refuse {
            run_dir::refuse_if_run(out_dir)?;
        }
        let t = Self::build_on(cfg, out_dir, None, router, comm)?;
        if lead && if_exists == IfRunExists::Overwrite {
            run_dir::clear(out_dir, &t.fs)?;
        }
        Ok(t)
    }

    /// Loads a checkpoint for evaluation or generation (no training data needed beyond validation).
    /// Refuses weights with a NaN or an infinity, naming the tensor.
    pub fn for_inference(ckpt: &Path, device: Option<&str>) -> Result<Self> {
        let loaded = checkpoint::load(ckpt)?;
        let mut cfg = loaded.cfg.clone();
        if let Some(d) = device {
            cfg.train.device = d.parse()?;
        }
        let out = loaded.dir.clone();
        let comm = crate::dist::world()?;
        let mut t = Self::build_inner(cfg, &out, Some(loaded.tokenizer), &crate::moe::build_router, false, comm)?;
        checkpoint::load_weights(&loaded.dir.join(checkpoint::MODEL_FILE), &t.params)?;
        t.state = loaded.state;
        Ok(t)
    }

    /// Steps left before `train.max_iters` (0 when the run is already there or past it).
    pub fn steps_left(&self) -> u64 {
        (self.cfg.train.max_iters as u64).saturating_sub(self.state.step)
    }

    pub(super) fn build(cfg: Config, out_dir: &Path, tok: Option<Tokenizer>, router: &RouterFactory) -> Result<Self> {
        Self::build_on(cfg, out_dir, tok, router, crate::dist::world()?)
    }

    pub(super) fn build_on(
        cfg: Config,
        out_dir: &Path,
        tok: Option<Tokenizer>,
        router: &RouterFactory,
        comm: Arc<dyn Comm>,
    ) -> Result<Self> {
        Self::build_inner(cfg, out_dir, tok, router, true, comm)
    }

    fn build_inner(
        mut cfg: Config,
        out_dir: &Path,
        tok: Option<Tokenizer>,
        router: &RouterFactory,
        with_train: bool,
        comm: Arc<dyn Comm>,
    ) -> Result<Self> {
        if with_train {
            super::data_parallel::check_layout(&cfg, comm.as_ref())?;
        }
        // This rank's micro-batches of a step.
        let mine = cfg.train.grad_accum / comm.size();
        if comm.size() > 1 && cfg.train.device == DeviceKind::Cpu {
            super::parallel::share_cores_with_local_ranks();
        }
        // Before the first tensor op: with several workers, Candle's own ops run single-threaded.
        // With expert parallel a rank's micro-batches run one at a time (their moves are collectives).
        let cpu_workers = cfg.train.device == DeviceKind::Cpu && !(with_train && cfg.train.expert_parallel > 1);
        let n_workers = if cpu_workers { worker_count(cfg.train.threads, mine) } else { 1 };
        let workers = Workers::new(n_workers)?;
        let device = open_device(cfg.train.device)?;
        #[cfg(feature = "nccl")]
        let comm: Arc<dyn Comm> = if device.is_cuda() && comm.size() > 1 {
            Arc::new(crate::dist::nccl::NcclComm::over(comm, &device)?)
        } else {
            comm
        };
        if device.is_cuda() {
            // A process-wide cuBLAS setting in Candle: the last trainer built decides.
            candle_core::cuda::set_gemm_reduced_precision_f32(cfg.train.tf32);
        }
        let data = RunData::open(&cfg.data.source, cfg.data.train_fraction)?;
        let tokenizer = data.tokenizer(tok, &mut cfg)?;
        if cfg.model.vocab_size == 0 {
            cfg.model.vocab_size = tokenizer.vocab_size();
        } else if cfg.model.vocab_size < tokenizer.vocab_size() {
            bail!("model.vocab_size = {} is below the tokenizer's {}", cfg.model.vocab_size, tokenizer.vocab_size());
        }
        if with_train {
            // Said (and a model too large refused) before anything big is allocated.
            let est = super::memory::check(&cfg, super::memory::available())?;
            if comm.rank() == 0 {
                eprintln!("model: {est}");
            }
        }
        let (bs, bsz) = (cfg.model.block_size, cfg.train.batch_size);
        let val = data.batcher(false, &tokenizer, bs, bsz, cfg.seed ^ 0x5a5a)?;
        let train = if with_train { Some(data.batcher(true, &tokenizer, bs, bsz, cfg.seed)?) } else { None };
        let params = Params::new();
        let vb = params.var_builder(cfg.seed, DType::F32, &device);
        let mut model = Gpt::new_with_router(&cfg, vb, router)?;
        if with_train && cfg.train.expert_parallel > 1 {
            model.set_expert_group(&ExpertGroup::new(comm.clone(), cfg.train.expert_parallel)?)?;
        }
        let t = &cfg.train;
        let mut opt = AdamW::new(
            params.named(),
            AdamWConfig { beta1: t.beta1, beta2: t.beta2, eps: t.eps, weight_decay: t.weight_decay },
        )?;
        opt.set_lr_scale(".moe.router.", cfg.model.router.lr_scale);
        opt.set_decay_scale(".moe.router.", cfg.model.router.decay_scale);
        let state = TrainerState {
            step: 0,
            best_val_loss: None,
            rng_seed: cfg.seed,
            rng_next_step: 0,
            tokens_seen: 0,
            wall_s: 0.0,
            reinforce_baseline: None,
            dataset: data.dataset(),
        };
        let data_id = if comm.size() > 1 { data.identity() } else { String::new() };
        // Not with expert parallel: there an expert's gradient is on one rank only, so the plain
        // exchange already sends it once, and a shared step would send its weights back each step.
        let shared_step = with_train && comm.size() > 1 && device.is_cpu() && cfg.train.expert_parallel == 1;
        let shards = shared_step.then(|| Shards::new(&params.named(), comm.size()));
        let mut t = Self {
            cfg,
            device,
            params,
            model,
            opt,
            tokenizer,
            train,
            val,
            state,
            out_dir: out_dir.to_path_buf(),
            progress: true,
            workers,
            fs: FsSteps::new(),
            comm,
            data_id,
            shards,
        };
        t.release_foreign_moments();
        Ok(t)
    }

    /// Mean loss (cross-entropy only) over `n` random batches of `b` keyed by EVAL_KEY.
    pub fn estimate_loss(&self, b: &Batcher, n: usize) -> Result<f64> {
        let tau = tau_at(&self.cfg.model.router, self.state.step as usize);
        let ctx = Ctx::eval(self.cfg.seed, tau);
        let (model, device, rows) = (&self.model, &self.device, b.batch_size());
        // Batches dealt out over the ranks; summed in batch order.
        let losses = data_parallel::map_dealt(self.comm.as_ref(), n, |mine| {
            self.workers.map(mine.len(), |j| {
                let (x, y) = b.try_random_batch(EVAL_KEY + mine[j] as u64, 0)?;
                Ok((eval_batch_loss(model, device, &x, &y, rows, &ctx)?, 0.0))
            })
        })?;
        Ok(losses.iter().map(|l| l.0).sum::<f64>() / n as f64)
    }

    /// Exact mean loss over every token of the validation split (non-overlapping windows).
    pub fn full_val_loss(&self) -> Result<f64> {
        let tau = tau_at(&self.cfg.model.router, self.state.step as usize);
        let ctx = Ctx::eval(self.cfg.seed, tau);
        let batches = self.val.try_sequential_batches()?;
        let (model, device) = (&self.model, &self.device);
        let sums = data_parallel::map_dealt(self.comm.as_ref(), batches.len(), |mine| {
            self.workers.map(mine.len(), |j| {
                let (x, y, rows) = &batches[mine[j]];
                Ok((eval_batch_loss(model, device, x, y, *rows, &ctx)? * y.len() as f64, y.len() as f64))
            })
        })?;
        let (sum, count) = sums.iter().fold((0.0, 0usize), |(s, c), &(x, n)| (s + x, c + n as usize));
        Ok(sum / count.max(1) as f64)
    }

    /// One optimizer step (all micro-batches, side by side on the workers). Returns (mean loss,
    /// mean aux loss, grad norm, the routing of each MoE layer).
    pub fn train_step(&mut self) -> Result<(f64, f64, f64, StepRouting)> {
        let step = self.state.step;
        let train = self.train.as_ref().context("trainer built without training data")?;
        let accum = self.cfg.train.grad_accum;
        let tau = tau_at(&self.cfg.model.router, step as usize);
        let named = self.params.named();
        let (model, cfg, device) = (&self.model, &self.cfg, &self.device);
        let baseline0 = self.state.reinforce_baseline;
        let micro = |i: usize, baseline: Option<f64>| {
            micro_step(
                model,
                train,
                cfg,
                device,
                &named,
                Ctx { train: true, step, tau, seed: cfg.seed, micro: i as u32 },
                baseline,
            )
        };
        // This rank's block of the step's micro-batches (all of them in one process).
        let (first, count) = crate::dist::my_share(accum, self.comm.rank(), self.comm.size());
        let outs: Vec<MicroOut> = if self.sequential_micro_batches() {
            // Router state moves after each micro-batch (one rank only: see
            // data_parallel::check_layout), or expert parallel's collectives: in order, one worker.
            self.workers.install(|| -> Result<Vec<MicroOut>> {
                let mut outs = Vec::with_capacity(count);
                let mut baseline = baseline0;
                for i in first..first + count {
                    let o = micro(i, baseline)?;
                    baseline = o.baseline;
                    outs.push(o);
                }
                Ok(outs)
            })?
        } else {
            self.workers.map(count, |j| micro(first + j, baseline0))?
        };
        let (mut loss_sum, mut aux_sum) = (0.0, 0.0);
        let e = self.cfg.model.moe.num_experts;
        let moe_layers = (0..self.cfg.model.n_layer).filter(|&l| self.cfg.is_moe_layer(l)).count();
        let mut routing = StepRouting::new(moe_layers, e);
        let mut parts = Vec::with_capacity(outs.len());
        let mut scalars = Vec::with_capacity(outs.len());
        for out in outs {
            if let Some(b) = out.baseline {
                self.state.reinforce_baseline = Some(b);
            }
            parts.push(out.grads);
            scalars.push((out.ce, out.aux, out.moe_stats));
        }
        // Every micro-batch's losses and routing, on every rank, in micro-batch order.
        for (ce, aux, stats) in data_parallel::all_gather_scalars(self.comm.as_ref(), scalars, &self.device)? {
            loss_sum += ce;
            aux_sum += aux;
            routing.add(&stats, accum, &self.device)?;
        }
        let lr = lr_at(&self.cfg.train, step as usize);
        let (clip, opt, n, comm) = (self.cfg.train.grad_clip, &mut self.opt, named.len(), self.comm.as_ref());
        let shards = self.shards.as_ref();
        let norm = self.workers.install(move || -> Result<f64> {
            // Summed by a fixed tree over the micro-batches, whatever the number of workers and
            // ranks; clipped inside AdamW. On several CPU ranks each sums and updates its range
            // of the parameters, then they exchange the updated parameters.
            let (grads, norm) = if comm.size() == 1 {
                sum_grads(parts, n)?
            } else {
                let (partial, _) = sum_grads_with(parts, n, false)?;
                match shards {
                    Some(sh) => sharded::reduce_scatter(comm, partial, &named, sh)?,
                    None => data_parallel::all_reduce_grads(comm, partial, &named)?,
                }
            };
            opt.step_scaled(&grads, lr, clip_scale(norm, clip))?;
            if let Some(sh) = shards {
                sharded::all_gather_params(comm, &named, sh)?;
            }
            Ok(norm)
        })?;
        self.model.after_step()?;
        self.state.step += 1;
        self.state.rng_next_step = self.state.step;
        Ok((loss_sum / accum as f64, aux_sum / accum as f64, norm, routing))
    }

    /// Every rank trains the same config, data, executable and weights (before the first step).
    fn check_ranks_agree(&self) -> Result<()> {
        if self.comm.size() == 1 {
            return Ok(());
        }
        data_parallel::check_same(
            self.comm.as_ref(),
            &[
                ("config", self.cfg.to_json()?),
                ("data", self.data_id.clone()),
                ("executable", data_parallel::code_hash()?),
                ("step", self.state.step.to_string()),
                ("weights", data_parallel::weights_hash(&self.params.named())?),
            ],
        )
    }

    /// With a shared step, frees the optimizer state of the parameters other ranks update (after
    /// start-up, a resume's load, and each checkpoint: [`Trainer::with_whole_optimizer`]).
    pub(super) fn release_foreign_moments(&mut self) {
        if let Some(sh) = &self.shards {
            self.opt.release_moments(sh.range(self.comm.rank()));
        }
    }

    /// `write` (rank 0 writing a checkpoint) with the whole optimizer state on rank 0: after shared
    /// steps the ranks' ranges are gathered there first, and freed again after. Every rank calls
    /// it.
    fn with_whole_optimizer(&mut self, write: impl FnOnce(&Self) -> Result<()>) -> Result<()> {
        if let Some(sh) = &self.shards {
            sharded::gather_moments(self.comm.as_ref(), &mut self.opt, sh)?;
        }
        write(self)?;
        self.release_foreign_moments();
        Ok(())
    }

    /// Every rank's weights are still the same bits (before each checkpoint).
    fn check_weights_agree(&self) -> Result<()> {
        if self.comm.size() == 1 {
            return Ok(());
        }
        let hash = data_parallel::weights_hash(&self.params.named())?;
        data_parallel::check_same(
            self.comm.as_ref(),
            &[("weights", format!("sha256 {hash} after step {}", self.state.step))],
        )
    }

    /// Whether the micro-batches run in order: REINFORCE's baseline moves from one to the next, and
    /// expert parallel's moves are collectives that every rank calls in the same order. (The
    /// sigmoid router's bias moves only after the step, from integer counts, so its micro-batches
    /// could run side by side; they run in order, as they are timed.)
    fn sequential_micro_batches(&self) -> bool {
        matches!(self.cfg.model.router.kind, RouterKind::Reinforce | RouterKind::SigmoidBias)
            || self.cfg.train.expert_parallel > 1
    }

    fn tokens_per_step(&self) -> u64 {
        let t = &self.cfg.train;
        (t.batch_size * t.grad_accum * self.cfg.model.block_size) as u64
    }

    /// Saves checkpoint `name` of the run directory; a parameter or moment with a NaN or an
    /// infinity stops training with an error naming it, and nothing is saved.
    fn save_checkpoint(&self, name: &str) -> Result<()> {
        let dir = self.out_dir.join(name);
        checkpoint::save(&dir, &self.params, &self.opt, &self.cfg, &self.tokenizer, &self.state, &self.fs)
            .with_context(|| format!("training stopped at step {}", self.state.step))
    }

    /// Writes the run's config.json (through a temporary file, so it is never half written).
    fn write_run_config(&self) -> Result<()> {
        let path = self.out_dir.join(checkpoint::CONFIG_FILE);
        let tmp = self.out_dir.join(format!(".tmp-{}", checkpoint::CONFIG_FILE));
        std::fs::write(&tmp, self.cfg.to_json()?).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot replace {}", path.display()))
    }

    /// Trains until `train.max_iters`, logging, evaluating and checkpointing as configured.
    pub fn fit(&mut self) -> Result<FitSummary> {
        // Rank 0 alone writes; every rank first checks it trains what the others train.
        let lead = self.comm.rank() == 0;
        self.check_ranks_agree()?;
        let mut metrics = None;
        if lead {
            std::fs::create_dir_all(&self.out_dir)
                .with_context(|| format!("cannot create {}", self.out_dir.display()))?;
            // Temporary directories of a save that was cut short (and a best/ renamed aside) first.
            run_dir::recover(&self.out_dir, &self.fs)?;
            self.write_run_config()?;
            metrics = Some(MetricsWriter::open(&self.out_dir)?);
        }
        let t = self.cfg.train.clone();
        let max = t.max_iters as u64;
        let pb = if self.progress && lead { ProgressBar::new(max) } else { ProgressBar::hidden() };
        pb.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]")
                .expect("static template"),
        );
        pb.set_position(self.state.step);
        let run_start = Instant::now();
        let wall0 = self.state.wall_s;
        let mut last_log = (Instant::now(), self.state.step, self.comm.bytes_sent());
        let mut last_val = f64::NAN;
        // Router telemetry of the steps since the last log line; restarts on resume.
        let mut telemetry = Telemetry::new(t.dead_expert_window);
        while self.state.step < max {
            let step = self.state.step;
            let (loss, aux, norm, routing) = self.train_step()?;
            telemetry.record(step, &routing)?;
            self.state.tokens_seen += self.tokens_per_step();
            let done = self.state.step;
            pb.set_position(done);
            let mut line = serde_json::Map::new();
            if done.is_multiple_of(t.log_interval as u64) || done == max || step == 0 {
                let dt = last_log.0.elapsed().as_secs_f64();
                let tok_s = (done - last_log.1) as f64 * self.tokens_per_step() as f64 / dt.max(1e-9);
                let sent = self.comm.bytes_sent();
                let mib = (sent - last_log.2) as f64 / (done - last_log.1).max(1) as f64 / (1u64 << 20) as f64;
                last_log = (Instant::now(), done, sent);
                let tau = tau_at(&self.cfg.model.router, step as usize);
                let lr = lr_at(&t, step as usize);
                let summary = telemetry.summary()?;
                let msg = format!("loss {loss:.4} tok/s {tok_s:.0} tau {tau:.3} {}", summary.progress());
                pb.set_message(msg.trim_end().to_string());
                line.insert("step".into(), json!(done));
                line.insert("train_loss".into(), json!(loss));
                line.insert("lr".into(), json!(lr));
                line.insert("tau".into(), json!(tau));
                line.insert("aux_loss".into(), json!(aux));
                line.insert("grad_norm".into(), json!(norm));
                line.insert("tok_per_s".into(), json!(tok_s));
                if self.comm.size() > 1 {
                    // Sent by rank 0 to the others, per step since the last line (MiB).
                    line.insert("sent_mib_per_step".into(), json!(mib));
                }
                line.extend(summary.to_json());
            }
            if done.is_multiple_of(t.eval_interval as u64) || done == max {
                let val = self.estimate_loss(&self.val, t.eval_iters)?;
                let tr = match &self.train {
                    Some(b) => self.estimate_loss(b, t.eval_iters)?,
                    None => f64::NAN,
                };
                last_val = val;
                line.insert("step".into(), json!(done));
                line.insert("val_loss".into(), json!(val));
                line.insert("train_eval_loss".into(), json!(tr));
                let msg = format!("step {done}: train {tr:.4}, val {val:.4}");
                if lead && pb.is_hidden() {
                    eprintln!("{msg}");
                } else if lead {
                    pb.println(msg);
                }
                if self.state.best_val_loss.is_none_or(|b| val < b) {
                    self.state.best_val_loss = Some(val);
                    self.state.wall_s = wall0 + run_start.elapsed().as_secs_f64();
                    self.with_whole_optimizer(|t| if lead { t.save_checkpoint("best") } else { Ok(()) })?;
                }
            }
            if let (Some(m), false) = (metrics.as_mut(), line.is_empty()) {
                m.write(&serde_json::Value::Object(line))?;
            }
            if (t.ckpt_interval > 0 && done.is_multiple_of(t.ckpt_interval as u64)) || done == max {
                self.state.wall_s = wall0 + run_start.elapsed().as_secs_f64();
                self.check_weights_agree()?;
                self.with_whole_optimizer(|t| {
                    if lead {
                        t.save_checkpoint(&format!("ckpt-{done:07}"))?;
                        run_dir::prune(&t.out_dir, t.cfg.train.keep_last, &t.fs)?;
                    }
                    Ok(())
                })?;
            }
        }
        pb.finish_and_clear();
        let val_loss = if t.final_full_eval {
            self.full_val_loss()?
        } else if last_val.is_finite() {
            last_val
        } else {
            self.estimate_loss(&self.val, t.eval_iters)?
        };
        let wall_s = wall0 + run_start.elapsed().as_secs_f64();
        let tok_per_s = self.state.tokens_seen as f64 / wall_s.max(1e-9);
        if let Some(m) = metrics.as_mut() {
            m.write(&json!({"event": "done", "step": self.state.step, "val_loss": val_loss,
                "val_loss_kind": if t.final_full_eval { "full_split" } else { "eval_iters" },
                "wall_s": wall_s, "tok_per_s": tok_per_s}))?;
        }
        Ok(FitSummary { step: self.state.step, val_loss, wall_s, tok_per_s })
    }
}
