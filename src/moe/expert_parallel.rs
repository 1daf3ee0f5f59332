//! Expert parallelism (`train.expert_parallel = G`): each MoE layer's experts are split over the
//! G ranks of a group, E / G consecutive experts each. After routing and the sort by expert, the
//! rows a rank routed to expert e go to the rank that holds e by an all-to-all with variable
//! counts ([`Comm::all_to_all_bytes`]: MPI's `alltoallv`); the experts run there on the rows of
//! every rank of the group, and the results come back the same way. The two moves are ops
//! (`ToExperts`, `ToSources`) whose backward is the other move, so autograd carries the
//! gradients across the ranks, and an expert's weight gradient holds the rows of every rank.
//!
//! Every rank keeps every expert's weights: a checkpoint is the full model whatever G was, and
//! evaluation runs on each rank alone. A rank runs, and takes gradients for, its own experts only.
//! Groups are consecutive world ranks: with N ranks, ranks g*G .. g*G + G - 1 form group g.
//!
//! Collectives are called by every rank in the same order: the forward moves of each layer in
//! layer order, their backwards in reverse (the graph chains them, so Candle's backward visits
//! them in that order on every rank). A rank's micro-batches run one at a time.

use crate::dist::bytes::{as_bytes, from_bytes, to_bytes, Le};
use crate::dist::Comm;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Tensor};
use std::sync::Arc;

/// This rank's place in its expert-parallel group.
#[derive(Clone)]
pub struct ExpertGroup {
    comm: Arc<dyn Comm>,
    /// Ranks per group (G).
    size: usize,
    /// This rank's index in its group, 0 ..= G - 1.
    index: usize,
    /// The group's first world rank.
    first: usize,
}

impl ExpertGroup {
    /// Groups of `g` consecutive ranks of `comm` (whose size `g` must divide).
    pub fn new(comm: Arc<dyn Comm>, g: usize) -> anyhow::Result<Self> {
        let (rank, n) = (comm.rank(), comm.size());
        if g == 0 || n % g != 0 {
            anyhow::bail!("train.expert_parallel = {g} does not divide the {n} ranks of this run into groups");
        }
        Ok(Self { comm, size: g, index: rank % g, first: rank / g * g })
    }

    /// Ranks per group.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The experts (of `e`) this rank holds: [first, end).
    pub fn mine(&self, e: usize) -> std::ops::Range<usize> {
        let per = e / self.size;
        self.index * per..(self.index + 1) * per
    }

    /// xs (N_kept, C): this rank's rows sorted by expert, `offsets` (E + 1) ->
    /// (the rows of every rank of the group for this rank's experts (N_mine, C), grouped by expert
    /// and, within an expert, by source rank; their E / G + 1 offsets; the route back).
    pub fn dispatch(&self, xs: &Tensor, offsets: &[u32]) -> anyhow::Result<(Tensor, Vec<u32>, Route)> {
        let e = offsets.len() - 1;
        if !e.is_multiple_of(self.size) {
            anyhow::bail!("expert parallel: {e} experts cannot be split over {} ranks", self.size);
        }
        let per = e / self.size;
        // Rows per expert, for each member of the group in turn (its block of experts).
        let mut counts = vec![Vec::new(); self.comm.size()];
        let mut send = Vec::with_capacity(self.size);
        for j in 0..self.size {
            let block = &offsets[j * per..=(j + 1) * per];
            counts[self.first + j] = to_bytes(&block.windows(2).map(|w| w[1] - w[0]).collect::<Vec<u32>>());
            send.push((block[per] - block[0]) as usize);
        }
        let got = self.comm.all_to_all_bytes(counts)?;
        let mut recv = Vec::with_capacity(self.size);
        for s in 0..self.size {
            let b = &got[self.first + s];
            if b.len() != 4 * per {
                anyhow::bail!(
                    "expert parallel: rank {} sent {} bytes of counts, not {}",
                    self.first + s,
                    b.len(),
                    4 * per
                );
            }
            recv.push(from_bytes::<u32>(b).into_iter().map(|c| c as usize).collect());
        }
        let route = Route(Arc::new(Plan { group: self.clone(), send, recv, per }));
        let mut local = vec![0u32];
        for ex in 0..per {
            let n: usize = route.0.recv.iter().map(|r: &Vec<usize>| r[ex]).sum();
            local.push(local[ex] + n as u32);
        }
        let xs_mine = on_host(xs, |x| x.apply_op1(ToExperts(route.clone())))?;
        Ok((xs_mine, local, route))
    }

    /// ys (N_mine, C), the experts' outputs in the order [`ExpertGroup::dispatch`] gave ->
    /// (N_kept, C), each row back on the rank that routed it, in the order of its xs.
    pub fn collect(&self, ys: &Tensor, route: &Route) -> Result<Tensor> {
        on_host(ys, |y| y.apply_op1(ToSources(route.clone())))
    }
}

/// `f` of `t` on the CPU (the moves go through host memory), its result back on `t`'s device.
fn on_host(t: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    if t.device().is_cpu() {
        return f(t);
    }
    f(&t.to_device(&Device::Cpu)?)?.to_device(t.device())
}

/// Who sends how many rows to whom in one layer's dispatch.
struct Plan {
    group: ExpertGroup,
    /// Rows this rank sends to member j of its group: consecutive blocks of its sorted rows.
    send: Vec<usize>,
    /// recv\[s\]\[e\]: rows member s sends for this rank's e-th expert.
    recv: Vec<Vec<usize>>,
    /// Experts per rank.
    per: usize,
}

/// The route of one dispatch, shared by its two moves and their backwards.
#[derive(Clone)]
pub struct Route(Arc<Plan>);

impl Route {
    /// Rows this rank sent to each member of its group, and received from each.
    pub fn rows(&self) -> (Vec<usize>, Vec<usize>) {
        (self.0.send.clone(), self.0.recv.iter().map(|r| r.iter().sum()).collect())
    }
}

/// One move: `x` (rows of width c) cut into the parts each world rank gets, exchanged, and the
/// received parts put in order. `cut(rows)` gives the send parts (by group member) as lists of
/// (first row, rows); `place(parts, c)` assembles the output from the received ones.
fn exchange<T: Le>(
    plan: &Plan,
    x: &[T],
    c: usize,
    cut: &[Vec<(usize, usize)>],
    place: impl Fn(&[Vec<T>]) -> Vec<T>,
) -> Result<Vec<T>> {
    let g = &plan.group;
    let mut parts = vec![Vec::new(); g.comm.size()];
    for (j, pieces) in cut.iter().enumerate() {
        let mut b = Vec::with_capacity(pieces.iter().map(|p| p.1).sum::<usize>() * c * std::mem::size_of::<T>());
        for &(first, n) in pieces {
            b.extend_from_slice(as_bytes(&x[first * c..(first + n) * c]));
        }
        parts[g.first + j] = b;
    }
    let got = g.comm.all_to_all_bytes(parts).map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
    let mine: Vec<Vec<T>> = (0..g.size).map(|s| from_bytes(&got[g.first + s])).collect();
    Ok(place(&mine))
}

impl Plan {
    /// Where this rank's e-th expert's rows from member s start in the dispatched rows.
    fn local_start(&self, s: usize, e: usize) -> usize {
        let before_e: usize = self.recv.iter().map(|r| r[..e].iter().sum::<usize>()).sum();
        before_e + self.recv[..s].iter().map(|r| r[e]).sum::<usize>()
    }

    /// To the experts: the sorted rows (N_kept) -> the rows of this rank's experts (N_mine).
    fn to_experts<T: Le>(&self, x: &[T], c: usize) -> Result<Vec<T>> {
        let mut first = 0;
        let cut: Vec<Vec<(usize, usize)>> = self
            .send
            .iter()
            .map(|&n| {
                first += n;
                vec![(first - n, n)]
            })
            .collect();
        exchange(self, x, c, &cut, |parts| {
            let mut out = Vec::with_capacity(self.recv.iter().flatten().sum::<usize>() * c);
            let mut at = vec![0usize; parts.len()];
            for e in 0..self.per {
                for (s, p) in parts.iter().enumerate() {
                    let n = self.recv[s][e] * c;
                    out.extend_from_slice(&p[at[s]..at[s] + n]);
                    at[s] += n;
                }
            }
            out
        })
    }

    /// Back to the sources: the rows of this rank's experts (N_mine) -> this rank's sorted rows
    /// (N_kept).
    fn to_sources<T: Le>(&self, x: &[T], c: usize) -> Result<Vec<T>> {
        let cut: Vec<Vec<(usize, usize)>> = (0..self.group.size)
            .map(|s| (0..self.per).map(|e| (self.local_start(s, e), self.recv[s][e])).collect())
            .collect();
        exchange(self, x, c, &cut, |parts| parts.concat())
    }

    fn rows_in(&self) -> usize {
        self.send.iter().sum()
    }

    fn rows_mine(&self) -> usize {
        self.recv.iter().flatten().sum()
    }
}

/// The move to the experts' ranks: (N_kept, C) -> (N_mine, C); backward: [`ToSources`].
struct ToExperts(Route);

/// The move back: (N_mine, C) -> (N_kept, C); backward: [`ToExperts`].
struct ToSources(Route);

/// Runs `f` on the rows of a contiguous (N, C) CPU storage of f32 or f64 after checking N.
fn run_move(
    name: &str,
    s: &CpuStorage,
    l: &Layout,
    rows_in: usize,
    rows_out: usize,
    f32s: impl FnOnce(&[f32], usize) -> Result<Vec<f32>>,
    f64s: impl FnOnce(&[f64], usize) -> Result<Vec<f64>>,
) -> Result<(CpuStorage, Shape)> {
    let (n, c) = l.shape().dims2()?;
    if n != rows_in {
        candle_core::bail!("{name}: {n} rows where the route has {rows_in}");
    }
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{name}: the rows are not contiguous")))?;
    let out = match s {
        CpuStorage::F32(v) => CpuStorage::F32(f32s(&v[start..end], c)?),
        CpuStorage::F64(v) => CpuStorage::F64(f64s(&v[start..end], c)?),
        _ => candle_core::bail!("{name}: expert parallel moves f32 or f64 rows, not {:?}", s.dtype()),
    };
    Ok((out, Shape::from((rows_out, c))))
}

impl CustomOp1 for ToExperts {
    fn name(&self) -> &'static str {
        "expert-parallel-to-experts"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = &self.0 .0;
        run_move(self.name(), s, l, p.rows_in(), p.rows_mine(), |x, c| p.to_experts(x, c), |x, c| p.to_experts(x, c))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(ToSources(self.0.clone()))?))
    }
}

impl CustomOp1 for ToSources {
    fn name(&self) -> &'static str {
        "expert-parallel-to-sources"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = &self.0 .0;
        run_move(self.name(), s, l, p.rows_mine(), p.rows_in(), |x, c| p.to_sources(x, c), |x, c| p.to_sources(x, c))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(ToExperts(self.0.clone()))?))
    }
}
