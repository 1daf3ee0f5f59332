//! Data parallelism across ranks (processes through MPI, or threads in the tests), with the bits
//! of one process.
//!
//! - A step's `grad_accum` micro-batches are split into one contiguous block per rank
//!   ([`crate::dist::my_share`]); each rank sums its block by the tree of
//!   [`super::grad_sum::tree_split`], the ranks' partial sums are all-gathered, and every rank sums
//!   them by the same rule. When the block is a power of two (1, 2, 4 ... micro-batches per
//!   rank), each addition is the one a single process makes, so the gradient, its norm and every
//!   parameter after the step have the same bits as one process with any number of threads.
//! - Losses and routing statistics of every micro-batch are all-gathered too, so rank 0 logs what
//!   one process logs.
//! - Evaluation batches are dealt out round-robin and their losses gathered in batch order.
//! - At the start every rank compares its config, data and executable with rank 0's; at every
//!   checkpoint, its weights.
//!
//! Moved per step and rank: the gradients it has (4 bytes a parameter, plus one flag a parameter)
//! to every other rank, and a few numbers per micro-batch. With expert parallel a rank has no
//! gradient for the experts it does not hold, so it sends none: an expert's gradient comes from
//! the rank of each group that holds it.

use super::grad_sum::sum_grads;
use super::in_place::Reads;
use crate::config::{Config, RouterKind};
use crate::dist::Comm;
use crate::moe::layer::MoeStats;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use sha2::{Digest, Sha256};

/// The ranks' partial gradient sums (`partial[i]`: parameter i's, None when this rank's
/// micro-batches gave it none), reduced: the summed gradients on every rank and their global
/// norm. `named` gives each parameter's shape.
pub fn all_reduce_grads(
    comm: &dyn Comm,
    partial: Vec<Option<Tensor>>,
    named: &[(String, Var)],
) -> Result<(Vec<Option<Tensor>>, f64)> {
    if let Some(dev) = named.first().map(|(_, v)| v.device().clone()).filter(|d| !d.is_cpu()) {
        return all_reduce_grads_on_device(comm, partial, named, &dev);
    }
    // A parameter without a gradient here (an expert of another rank, or one that got no tokens)
    // costs nothing to send.
    let mut buf = Vec::new();
    pack_grads(&partial, named, &mut buf)?;
    let (all, counts) = comm.all_gather_f32_varcount(&buf)?;
    drop(buf);
    let me = comm.rank();
    let mut parts = Vec::with_capacity(comm.size());
    let mut own = Some(partial);
    for (r, got) in unpack_grads(all, &counts, named, me)?.into_iter().enumerate() {
        parts.push(match got {
            Some(g) => g,
            None => own.take().with_context(|| format!("rank {r}: own partial taken twice"))?,
        });
    }
    sum_grads(parts, named.len())
}

/// Appends to `out` the block one rank sends of `grads` (one per parameter of `named`): [a
/// presence flag (1.0 or 0.0) per parameter] ++ [the gradients present, in parameter order], each
/// copied once, straight from its storage.
fn pack_grads(grads: &[Option<Tensor>], named: &[(String, Var)], out: &mut Vec<f32>) -> Result<()> {
    let mut present = Vec::with_capacity(grads.len());
    for (g, (name, _)) in grads.iter().zip(named) {
        if let Some(g) = g {
            present.push((name.as_str(), g.contiguous()?));
        }
    }
    let reads = Reads::new(present.iter().map(|(name, g)| (*name, g)))?;
    let slices = reads.slices()?;
    out.reserve(grads.len() + slices.iter().map(|v| v.len()).sum::<usize>());
    out.extend(grads.iter().map(|g| if g.is_some() { 1f32 } else { 0.0 }));
    slices.iter().for_each(|v| out.extend_from_slice(v));
    Ok(())
}

/// The blocks of [`pack_grads`] that every rank but `me` sent, received as `all` (blocks of
/// `counts[r]` numbers in rank order), as gradients of `named` that are views of one tensor (no
/// further copy); None at `me`.
#[allow(clippy::type_complexity)]
fn unpack_grads(
    all: Vec<f32>,
    counts: &[usize],
    named: &[(String, Var)],
    me: usize,
) -> Result<Vec<Option<Vec<Option<Tensor>>>>> {
    let p = named.len();
    let starts: Vec<usize> = counts.iter().scan(0, |acc, &c| Some(std::mem::replace(acc, *acc + c))).collect();
    if let Some(r) = (0..counts.len()).find(|&r| r != me && counts[r] < p) {
        bail!("rank {r} sent {} numbers, fewer than its {p} gradient flags", counts[r]);
    }
    let flags: Vec<Vec<bool>> = (0..counts.len())
        .map(|r| if r == me { Vec::new() } else { all[starts[r]..starts[r] + p].iter().map(|&f| f != 0.0).collect() })
        .collect();
    let all = Tensor::from_vec(all, counts.iter().sum::<usize>(), &Device::Cpu)?;
    let mut out = Vec::with_capacity(counts.len());
    for (r, flags) in flags.iter().enumerate() {
        if r == me {
            out.push(None);
            continue;
        }
        let (mut off, mut grads) = (starts[r] + p, Vec::with_capacity(p));
        for ((name, v), &flag) in named.iter().zip(flags) {
            if !flag {
                grads.push(None);
                continue;
            }
            let k = v.elem_count();
            if off + k > starts[r] + counts[r] {
                bail!("rank {r} sent {} numbers, fewer than its gradients flagged (at {name})", counts[r]);
            }
            grads.push(Some(all.narrow(0, off, k)?.reshape(v.shape())?));
            off += k;
        }
        out.push(Some(grads));
    }
    Ok(out)
}

/// [`all_reduce_grads`] for gradients on a GPU: packed there, all-gathered by the communicator
/// (NCCL, or MPI through host memory), unpacked as views. Not run on a GPU yet.
fn all_reduce_grads_on_device(
    comm: &dyn Comm,
    partial: Vec<Option<Tensor>>,
    named: &[(String, Var)],
    dev: &Device,
) -> Result<(Vec<Option<Tensor>>, f64)> {
    let mut pieces = Vec::with_capacity(named.len() + 1);
    for (g, (_, v)) in partial.iter().zip(named) {
        pieces.push(match g {
            Some(g) => g.to_dtype(DType::F32)?.flatten_all()?,
            None => Tensor::zeros(v.elem_count(), DType::F32, dev)?,
        });
    }
    let flags: Vec<f32> = partial.iter().map(|g| if g.is_some() { 1.0 } else { 0.0 }).collect();
    pieces.push(Tensor::from_vec(flags, named.len(), dev)?);
    let all = comm.all_gather_tensor(&Tensor::cat(&pieces, 0)?)?; // (ranks, n + params)
    let n: usize = named.iter().map(|(_, v)| v.elem_count()).sum();
    let mut parts = Vec::with_capacity(comm.size());
    for r in 0..comm.size() {
        let row = all.get(r)?;
        let flags = row.narrow(0, n, named.len())?.to_vec1::<f32>()?;
        let (mut off, mut grads) = (0, Vec::with_capacity(named.len()));
        for (i, (_, v)) in named.iter().enumerate() {
            let k = v.elem_count();
            let g = row.narrow(0, off, k)?.reshape(v.shape())?.to_dtype(v.dtype())?;
            grads.push((flags[i] != 0.0).then_some(g));
            off += k;
        }
        parts.push(grads);
    }
    sum_grads(parts, named.len())
}

/// Per micro-batch: (cross-entropy, aux loss, the routing statistics of each MoE layer).
pub type MicroScalars = (f64, f64, Vec<MoeStats>);

/// Every rank's micro-batch scalars, in micro-batch order (ranks hold consecutive blocks).
pub fn all_gather_scalars(comm: &dyn Comm, mine: Vec<MicroScalars>, dev: &Device) -> Result<Vec<MicroScalars>> {
    if comm.size() == 1 {
        return Ok(mine);
    }
    let shape: Vec<usize> =
        mine.first().map(|m| m.2.iter().map(|s| s.tokens_per_expert.len()).collect()).unwrap_or_default();
    let mut buf = Vec::new();
    for (ce, aux, stats) in &mine {
        buf.push(*ce);
        buf.push(*aux);
        for s in stats {
            encode_stats(s, &mut buf)?;
        }
    }
    let per_micro = 2 + shape.iter().map(|e| e + 4).sum::<usize>();
    let all = comm.all_gather_f64(&buf)?;
    let mut out = Vec::with_capacity(all.len() / per_micro.max(1));
    for m in all.chunks_exact(per_micro) {
        let mut at = 2;
        let mut stats = Vec::with_capacity(shape.len());
        for &e in &shape {
            stats.push(decode_stats(&m[at..at + e + 4], e, dev)?);
            at += e + 4;
        }
        out.push((m[0], m[1], stats));
    }
    Ok(out)
}

/// [tokens per expert..., dropped, routed, entropy, top-1 prob] (NaN for a statistic not kept).
fn encode_stats(s: &MoeStats, buf: &mut Vec<f64>) -> Result<()> {
    buf.extend(s.tokens_per_expert.iter().map(|&c| c as f64));
    buf.push(s.dropped as f64);
    buf.push(s.routed as f64);
    for t in [&s.entropy, &s.top1_prob] {
        buf.push(match t {
            Some(t) => t.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64,
            None => f64::NAN,
        });
    }
    Ok(())
}

fn decode_stats(v: &[f64], e: usize, dev: &Device) -> Result<MoeStats> {
    let scalar =
        |x: f64| -> Result<Option<Tensor>> { Ok(if x.is_nan() { None } else { Some(Tensor::new(x as f32, dev)?) }) };
    Ok(MoeStats {
        tokens_per_expert: v[..e].iter().map(|&c| c as u32).collect(),
        dropped: v[e] as usize,
        routed: v[e + 1] as usize,
        balance: None,
        z: None,
        entropy: scalar(v[e + 2])?,
        top1_prob: scalar(v[e + 3])?,
    })
}

/// `f(i)` for the evaluation batches this rank owns (i = rank, rank + size, ...), then every
/// batch's result on every rank, in batch order.
pub fn map_dealt(
    comm: &dyn Comm,
    n: usize,
    f: impl Fn(&[usize]) -> Result<Vec<(f64, f64)>>,
) -> Result<Vec<(f64, f64)>> {
    let (me, size) = (comm.rank(), comm.size());
    let mine: Vec<usize> = (me..n).step_by(size).collect();
    let got = f(&mine)?;
    if size == 1 {
        return Ok(got);
    }
    let mut buf = vec![f64::NAN; 2 * n];
    for (&i, (a, b)) in mine.iter().zip(&got) {
        buf[2 * i] = *a;
        buf[2 * i + 1] = *b;
    }
    let all = comm.all_gather_f64(&buf)?;
    Ok((0..n)
        .map(|i| {
            let r = i % size;
            (all[r * 2 * n + 2 * i], all[r * 2 * n + 2 * i + 1])
        })
        .collect())
}

/// What every rank must agree on before training: (what, its text). Compared with rank 0's.
pub fn check_same(comm: &dyn Comm, items: &[(&str, String)]) -> Result<()> {
    if comm.size() == 1 {
        return Ok(());
    }
    let mine = serde_json::to_vec(&items.iter().map(|(k, v)| (k.to_string(), v.clone())).collect::<Vec<_>>())?;
    let all = comm.all_gather_bytes(&mine)?;
    let lead: Vec<(String, String)> = serde_json::from_slice(&all[0]).context("rank 0's start-up check")?;
    for (r, b) in all.iter().enumerate().skip(1) {
        let theirs: Vec<(String, String)> =
            serde_json::from_slice(b).with_context(|| format!("rank {r}'s start-up check"))?;
        for ((what, a), (_, b)) in lead.iter().zip(&theirs) {
            if a != b {
                bail!(
                    "rank {r}'s {what} differs from rank 0's: {}; every rank must train the same run",
                    first_difference(a, b)
                );
            }
        }
    }
    Ok(())
}

/// The first line where two texts differ, shown from both sides (for configs), or their hashes.
fn first_difference(a: &str, b: &str) -> String {
    for (x, y) in a.lines().zip(b.lines()) {
        if x != y {
            return format!("rank 0 has `{}`, it has `{}`", x.trim(), y.trim());
        }
    }
    format!("sha256 {} vs {}", short_hash(a.as_bytes()), short_hash(b.as_bytes()))
}

/// The first 16 hex digits of a SHA-256.
pub fn short_hash(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 (16 hex digits) of this process's executable, so ranks built from different code are
/// refused.
pub fn code_hash() -> Result<String> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let bytes = std::fs::read(&exe).with_context(|| format!("reading {}", exe.display()))?;
    Ok(short_hash(&bytes))
}

/// SHA-256 (16 hex digits) of the parameters' bytes, in name order.
pub fn weights_hash(named: &[(String, Var)]) -> Result<String> {
    let mut h = Sha256::new();
    for (name, v) in named {
        h.update(name.as_bytes());
        let t = v.as_tensor().flatten_all()?.to_dtype(DType::F32)?;
        h.update(crate::dist::bytes::as_bytes(&t.to_vec1::<f32>()?));
    }
    Ok(h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect())
}

/// Refuses a run that cannot be split over the ranks of `comm`, saying why.
pub fn check_layout(cfg: &Config, comm: &dyn Comm) -> Result<()> {
    let (w, a, g) = (comm.size(), cfg.train.grad_accum, cfg.train.expert_parallel);
    if g > 1 && w % g != 0 {
        bail!(
            "train.expert_parallel = {g} splits the experts over groups of {g} ranks, and this run has {w} rank(s) \
             (launch a multiple of {g}: mpirun -np {g} gumbel-moe train ...)"
        );
    }
    if w == 1 {
        return Ok(());
    }
    if a % w != 0 {
        bail!(
            "train.grad_accum = {a} micro-batches cannot be shared by {w} ranks: each rank runs the same number \
             (set train.grad_accum to a multiple of {w}, with train.batch_size to keep the tokens per step)"
        );
    }
    if matches!(cfg.model.router.kind, RouterKind::Reinforce | RouterKind::SigmoidBias) {
        bail!(
            "model.router.kind = {:?} keeps state that moves with each micro-batch, which {w} ranks would each see \
             only in part; data parallel training supports the other routers (train it in one process)",
            cfg.model.router.kind
        );
    }
    Ok(())
}

/// Whether a multi-rank run has the bits of one process: each rank's block of micro-batches is
/// a power of two ([`super::grad_sum::tree_split`]).
pub fn exact_split(accum: usize, ranks: usize) -> bool {
    (accum / ranks.max(1)).is_power_of_two()
}
