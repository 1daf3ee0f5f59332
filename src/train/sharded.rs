//! The ranks share the optimizer step (ZeRO stage 1, on the CPU): the parameters are cut into one
//! contiguous range per rank ([`Shards`]), each rank receives only its range's partial gradients
//! from the others (an all-to-all), sums them, updates its range with AdamW, and the ranks then
//! all-gather the updated parameters. Each rank adds and updates 1/N of the parameters instead of
//! all of them; the bytes moved are the same as an all-gather of the gradients.
//!
//! Same bits as one process: every sum is the pairwise tree in rank order, the global norm adds
//! every parameter's squared norm in parameter order (as [`super::grad_sum::sum_grads`] does), and
//! AdamW is element-wise. A rank holds the moments of its range only (ZeRO stage 1: 1/N of the
//! optimizer state); [`gather_moments`] brings them to rank 0 for a checkpoint.

use super::data_parallel::{pack_grads, unpack_grads, with_f32};
use super::grad_sum::sum_each;
use super::optim::AdamW;
use crate::dist::bytes::{from_bytes, to_bytes};
use crate::dist::Comm;
use anyhow::{bail, Context, Result};
use candle_core::{CpuStorage, InplaceOp1, Layout, Tensor, Var};
use std::ops::Range;
use std::sync::Mutex;

/// One contiguous range of parameters per rank, of about equal element counts.
pub struct Shards {
    bounds: Vec<usize>,
    /// The all-gathers' receive buffer, kept from step to step (no allocation, no zero fill).
    gathered: Mutex<Vec<f32>>,
}

impl Shards {
    pub fn new(named: &[(String, Var)], ranks: usize) -> Self {
        let total: usize = named.iter().map(|(_, v)| v.elem_count()).sum();
        let mut bounds = vec![0];
        let mut acc = 0;
        for (i, (_, v)) in named.iter().enumerate() {
            acc += v.elem_count();
            while bounds.len() < ranks && acc * ranks >= total * bounds.len() {
                bounds.push(i + 1);
            }
        }
        while bounds.len() <= ranks {
            bounds.push(named.len());
        }
        Self { bounds, gathered: Mutex::new(Vec::new()) }
    }

    /// The parameters of rank `r`.
    pub fn range(&self, r: usize) -> Range<usize> {
        self.bounds[r]..self.bounds[r + 1]
    }
}

/// This rank's share of the step's gradient: every rank's partial sums (`partial`, one per
/// parameter) of this rank's range, summed in rank order; None outside the range. And the global
/// norm of the whole summed gradient, with the bits of one process.
pub fn reduce_scatter(
    comm: &dyn Comm,
    partial: Vec<Option<Tensor>>,
    named: &[(String, Var)],
    shards: &Shards,
) -> Result<(Vec<Option<Tensor>>, f64)> {
    let (n, me) = (comm.size(), comm.rank());
    // One buffer, a block per other rank j in rank order: j's range of the gradients, packed.
    let mut send = Vec::new();
    let mut counts = vec![0; n];
    for (j, count) in counts.iter_mut().enumerate().filter(|(j, _)| *j != me) {
        let (r, start) = (shards.range(j), send.len());
        pack_grads(&partial[r.clone()], &named[r], &mut send)?;
        *count = send.len() - start;
    }
    let (got, got_counts) = comm.all_to_all_f32(&send, &counts)?;
    drop(send);
    let mine = shards.range(me);
    let k = mine.len();
    let mut own = Some(partial);
    let mut by_rank = Vec::with_capacity(n);
    for (s, got) in unpack_grads(got, &got_counts, &named[mine.clone()], me)?.into_iter().enumerate() {
        by_rank.push(match got {
            Some(g) => g,
            None => {
                let p = own.take().with_context(|| format!("rank {s}: own partial taken twice"))?;
                p.into_iter().skip(mine.start).take(k).collect()
            }
        });
    }
    let mut grads = vec![None; named.len()];
    let mut sq = Vec::with_capacity(k);
    for (t, s) in sum_each(by_rank, k, true)?.into_iter().enumerate() {
        sq.push(match s {
            Some((g, q)) => {
                grads[mine.start + t] = Some(g);
                q
            }
            None => 0.0,
        });
    }
    // Every parameter's squared norm, in parameter order (ranks hold consecutive ranges).
    let all = comm.all_gather_bytes(&to_bytes(&sq))?;
    let total: f64 = all.iter().flat_map(|b| from_bytes::<f64>(b)).sum();
    Ok((grads, total.sqrt()))
}

/// Writes a slice into a CPU f32 tensor's storage in place.
struct CopyIn<'a>(&'a [f32]);

impl InplaceOp1 for CopyIn<'_> {
    fn name(&self) -> &'static str {
        "copy-in"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(v) = s else { candle_core::bail!("copy-in: not f32") };
        let (a, b) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("copy-in: not contiguous".into()))?;
        if b - a != self.0.len() {
            candle_core::bail!("copy-in: {} values for {} elements", self.0.len(), b - a);
        }
        v[a..b].copy_from_slice(self.0);
        Ok(())
    }
}

/// Every rank's range of `tensors` (f32, contiguous, on the CPU) to every rank, in place.
fn all_gather_ranges(comm: &dyn Comm, tensors: &[(String, Tensor)], shards: &Shards) -> Result<()> {
    let me = comm.rank();
    let size = |r: usize| tensors[shards.range(r)].iter().map(|(_, t)| t.elem_count()).sum::<usize>();
    let counts: Vec<usize> = (0..comm.size()).map(size).collect();
    let mut send = Vec::with_capacity(counts[me]);
    pack(&tensors[shards.range(me)], &mut send)?;
    let mut all = shards.gathered.lock().map_err(|_| anyhow::anyhow!("the gather buffer's lock is poisoned"))?;
    all.resize(counts.iter().sum(), 0.0);
    comm.all_gather_f32_into(&send, &counts, &mut all)?;
    let mut at = 0;
    for (s, &count) in counts.iter().enumerate() {
        if s != me {
            copy_in(&tensors[shards.range(s)], &all[at..at + count])?;
        }
        at += count;
    }
    Ok(())
}

/// Appends the elements of `tensors` (f32, contiguous, on the CPU) to `out`, back to back.
fn pack(tensors: &[(String, Tensor)], out: &mut Vec<f32>) -> Result<()> {
    out.reserve(tensors.iter().map(|(_, t)| t.elem_count()).sum());
    for (name, t) in tensors {
        with_f32(t, name, |v| out.extend_from_slice(v))?;
    }
    Ok(())
}

/// Writes `src` into `tensors` in place, the inverse of [`pack`]: `src` holds their elements back
/// to back.
fn copy_in(tensors: &[(String, Tensor)], src: &[f32]) -> Result<()> {
    let mut at = 0;
    for (_, t) in tensors {
        let e = t.elem_count();
        t.inplace_op1(&CopyIn(&src[at..at + e]))?;
        at += e;
    }
    Ok(())
}

/// After each rank updated its range: every rank's updated parameters to every rank.
pub fn all_gather_params(comm: &dyn Comm, named: &[(String, Var)], shards: &Shards) -> Result<()> {
    let tensors: Vec<(String, Tensor)> = named.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    all_gather_ranges(comm, &tensors, shards)
}

/// Every rank's AdamW moments of its range to rank 0, which writes the checkpoint; the other
/// ranks keep only their own range (rank 0 holds the whole state until
/// [`AdamW::release_moments`]).
pub fn gather_moments(comm: &dyn Comm, opt: &mut AdamW, shards: &Shards) -> Result<()> {
    let (me, n) = (comm.rank(), comm.size());
    let mine = shards.range(me);
    let tensors = if me == 0 { opt.moment_tensors()? } else { opt.moment_tensors_in(mine.clone())? };
    let mut send = Vec::new();
    if me != 0 {
        pack(&tensors, &mut send)?;
    }
    let mut counts = vec![0; n];
    counts[0] = send.len();
    let (got, got_counts) = comm.all_to_all_f32(&send, &counts)?;
    if me != 0 {
        return Ok(());
    }
    let mut at = 0;
    for (s, &count) in got_counts.iter().enumerate().skip(1) {
        let need: usize = tensors[shards.range(s)].iter().map(|(_, t)| t.elem_count()).sum();
        if count != need {
            bail!("rank {s} sent {count} numbers of optimizer state, its parameters need {need}");
        }
        copy_in(&tensors[shards.range(s)], &got[at..at + count])?;
        at += count;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn shards_are_contiguous_cover_every_parameter_and_balance_the_elements() {
        let named: Vec<(String, Var)> = [100, 3, 50, 50, 7, 200, 1]
            .iter()
            .enumerate()
            .map(|(i, &n)| (format!("p{i}"), Var::zeros(n, DType::F32, &Device::Cpu).unwrap()))
            .collect();
        for ranks in 1..=4 {
            let s = Shards::new(&named, ranks);
            assert_eq!(s.range(0).start, 0);
            assert_eq!(s.range(ranks - 1).end, named.len());
            for r in 1..ranks {
                assert_eq!(s.range(r - 1).end, s.range(r).start, "{ranks} ranks: contiguous");
            }
            // Each range closes at the first parameter that reaches its share of the elements.
            let size = |r: usize| named[s.range(r)].iter().map(|(_, v)| v.elem_count()).sum::<usize>();
            let total: usize = (0..ranks).map(size).sum();
            assert_eq!(total, 411);
            let mut acc = 0;
            for r in 0..ranks - 1 {
                acc += size(r);
                assert!(acc * ranks >= total * (r + 1), "{ranks} ranks: range {r} ends short of its share");
            }
        }
        // Two ranks: p0..p4 (210 elements, past half of 411), then p5, p6.
        assert_eq!(Shards::new(&named, 2).range(1), 5..7);
    }
}
