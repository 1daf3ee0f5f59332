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

use super::grad_sum::sum_each;
use super::in_place::{with_f32_mut_all, Reads};
use super::optim::AdamW;
use crate::dist::bytes::{from_bytes, to_bytes};
use crate::dist::Comm;
use crate::ops::backend::cpu::output_vec;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use std::ops::Range;

/// One contiguous range of parameters per rank, of about equal element counts.
pub struct Shards {
    bounds: Vec<usize>,
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
        Self { bounds }
    }

    /// The parameters of rank `r`.
    pub fn range(&self, r: usize) -> Range<usize> {
        self.bounds[r]..self.bounds[r + 1]
    }
}

/// This rank's share of the step's gradient: every rank's partial sums (`partial`, one per
/// parameter) of this rank's range, summed in rank order; None outside the range. And the global
/// norm of the whole summed gradient, with the bits of one process.
///
/// Two exchanges: which gradients each rank has of each other rank's range (a flag a parameter),
/// then the gradients themselves, sent from their storage (no packing) into one buffer whose
/// views are summed.
pub fn reduce_scatter(
    comm: &dyn Comm,
    partial: Vec<Option<Tensor>>,
    named: &[(String, Var)],
    shards: &Shards,
) -> Result<(Vec<Option<Tensor>>, f64)> {
    let (n, me) = (comm.size(), comm.rank());
    let mine = shards.range(me);
    let k = mine.len();
    let others = || (0..n).filter(move |&j| j != me);
    // Flags: rank j gets one per parameter of its range, 1.0 where this rank has a gradient.
    let mut flags = Vec::new();
    let mut counts = vec![0; n];
    for j in others() {
        flags.extend(partial[shards.range(j)].iter().map(|g| if g.is_some() { 1f32 } else { 0.0 }));
        counts[j] = shards.range(j).len();
    }
    let (got_flags, flag_counts) = comm.all_to_all_f32(&flags, &counts)?;
    if let Some(s) = others().find(|&s| flag_counts[s] != k) {
        bail!("rank {s} sent {} gradient flags for the {k} parameters of rank {me}", flag_counts[s]);
    }
    // Send: this rank's gradients of each other rank's range, in parameter order.
    let mut sending: Vec<(usize, &str, Tensor)> = Vec::new();
    for j in others() {
        for i in shards.range(j) {
            if let Some(g) = &partial[i] {
                sending.push((j, named[i].0.as_str(), g.contiguous()?));
            }
        }
    }
    let reads = Reads::new(sending.iter().map(|(_, name, t)| (*name, t)))?;
    let mut send: Vec<Vec<&[f32]>> = vec![Vec::new(); n];
    for ((j, _, _), v) in sending.iter().zip(reads.slices()?) {
        send[*j].push(v);
    }
    // Receive: from each other rank s, the gradients it flagged, back to back in one buffer.
    let mut flagged: Vec<(usize, usize)> = Vec::new(); // (rank, parameter)
    let mut at = 0;
    for s in others() {
        let block = &got_flags[at..at + k];
        at += k;
        flagged.extend(block.iter().zip(mine.clone()).filter(|(f, _)| **f != 0.0).map(|(_, i)| (s, i)));
    }
    let mut buf = output_vec(flagged.iter().map(|&(_, i)| named[i].1.elem_count()).sum(), f32::NAN);
    {
        let mut recv: Vec<Vec<&mut [f32]>> = (0..n).map(|_| Vec::new()).collect();
        let mut rest = &mut buf[..];
        for &(s, i) in &flagged {
            let (piece, tail) = rest.split_at_mut(named[i].1.elem_count());
            recv[s].push(piece);
            rest = tail;
        }
        comm.exchange_f32(&send, &mut recv)?;
    }
    drop(reads);
    // Each rank's partial of this range: views of the buffer, and this rank's own.
    let len = buf.len();
    let buf = Tensor::from_vec(buf, len, &Device::Cpu)?;
    let mut by_rank: Vec<Vec<Option<Tensor>>> = (0..n).map(|_| vec![None; k]).collect();
    let mut off = 0;
    for &(s, i) in &flagged {
        let v = &named[i].1;
        by_rank[s][i - mine.start] = Some(buf.narrow(0, off, v.elem_count())?.reshape(v.shape())?);
        off += v.elem_count();
    }
    by_rank[me] = partial.into_iter().skip(mine.start).take(k).collect();
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

/// This rank's tensors `own` (its range) to every rank in `to`, and from each rank s of `from`
/// its range into the tensors given with it: straight from and into their storage (f32,
/// contiguous, on the CPU).
fn move_ranges(
    comm: &dyn Comm,
    own: &[(String, Tensor)],
    to: &[usize],
    from: &[(usize, &[(String, Tensor)])],
) -> Result<()> {
    let n = comm.size();
    let reads = Reads::new(own.iter().map(|(name, t)| (name.as_str(), t)))?;
    let own = reads.slices()?;
    let mut send: Vec<Vec<&[f32]>> = vec![Vec::new(); n];
    for &j in to {
        send[j] = own.clone();
    }
    let targets: Vec<&Tensor> = from.iter().flat_map(|(_, ts)| ts.iter().map(|(_, t)| t)).collect();
    with_f32_mut_all(&targets, &mut |slices| {
        let mut recv: Vec<Vec<&mut [f32]>> = (0..n).map(|_| Vec::new()).collect();
        let mut it = slices.iter_mut();
        for (s, ts) in from {
            for (name, _) in ts.iter() {
                recv[*s].push(it.next().with_context(|| format!("no slice for {name}"))?);
            }
        }
        comm.exchange_f32(&send, &mut recv)
    })
}

/// The tensors of `named` in `range`, as (name, tensor).
fn tensors_in(named: &[(String, Var)], range: Range<usize>) -> Vec<(String, Tensor)> {
    named[range].iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect()
}

/// After each rank updated its range: every rank's updated parameters to every rank, from and
/// into the parameters' own storage.
pub fn all_gather_params(comm: &dyn Comm, named: &[(String, Var)], shards: &Shards) -> Result<()> {
    let (n, me) = (comm.size(), comm.rank());
    let others: Vec<usize> = (0..n).filter(|&j| j != me).collect();
    let theirs: Vec<(usize, Vec<(String, Tensor)>)> =
        others.iter().map(|&s| (s, tensors_in(named, shards.range(s)))).collect();
    let from: Vec<(usize, &[(String, Tensor)])> = theirs.iter().map(|(s, ts)| (*s, &ts[..])).collect();
    move_ranges(comm, &tensors_in(named, shards.range(me)), &others, &from)
}

/// Every rank's AdamW moments of its range to rank 0, which writes the checkpoint; the other
/// ranks keep only their own range (rank 0 holds the whole state until
/// [`AdamW::release_moments`]).
pub fn gather_moments(comm: &dyn Comm, opt: &mut AdamW, shards: &Shards) -> Result<()> {
    let (me, n) = (comm.rank(), comm.size());
    if me != 0 {
        return move_ranges(comm, &opt.moment_tensors_in(shards.range(me))?, &[0], &[]);
    }
    let all = opt.moment_tensors()?;
    let from: Vec<(usize, &[(String, Tensor)])> = (1..n).map(|s| (s, &all[shards.range(s)])).collect();
    move_ranges(comm, &[], &[], &from)
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
