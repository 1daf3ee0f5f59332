//! More than one process: the communicator that data-parallel training talks through.
//!
//! One small trait, [`Comm`] (rank, size, all-gather, barrier, abort), with three
//! implementations:
//! - [`Single`]: one process, every collective a copy (what `train` uses without a launcher);
//! - [`local::LocalGroup`]: ranks as threads of one process (tests, and reproducing a multi-rank
//!   run on one machine without MPI);
//! - `mpi::MpiComm` (feature `mpi`): processes started by `mpirun`, on one machine or many;
//! - `nccl::NcclComm` (feature `nccl`): the same ranks, one per GPU, gradients moved by NCCL.
//!
//! [`world`] is the process's communicator, chosen once from the environment a launcher leaves
//! ([`launch`]). The training loop decides what to exchange ([`crate::train::data_parallel`]);
//! this module only moves bytes, always in rank order, so every rank receives the same bits.
pub mod bytes;
pub mod launch;
pub mod local;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;

use anyhow::Result;
use std::sync::{Arc, OnceLock};

/// A group of ranks that exchange data. Every collective must be called by every rank of the
/// group, in the same order (a rank that skips one leaves the others waiting until the launcher
/// or the timeout of the implementation ends the job).
pub trait Comm: Send + Sync {
    /// This process's rank, 0 ..= size - 1.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// What carries the data ("single", "threads", "mpi"), for messages.
    fn kind(&self) -> &'static str;
    /// Every rank's `x` (the same length on every rank), concatenated in rank order.
    fn all_gather_f32(&self, x: &[f32]) -> Result<Vec<f32>>;
    /// Every rank's `x` (the same length on every rank), concatenated in rank order.
    fn all_gather_f64(&self, x: &[f64]) -> Result<Vec<f64>>;
    /// Every rank's bytes (any length), in rank order.
    fn all_gather_bytes(&self, x: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// Waits until every rank has arrived.
    fn barrier(&self) -> Result<()>;
    /// Ends the whole job after an error on this rank, so no rank waits forever for it.
    fn abort(&self, code: i32) -> !;
    /// Ends the communicator at a normal exit (MPI_Finalize); collectives after it fail.
    fn finalize(&self) {}
    /// Every rank's `x` (any length), concatenated in rank order, and each rank's length. This
    /// default goes through [`Comm::all_gather_bytes`] (one more copy); MPI overrides it.
    fn all_gather_f32_varcount(&self, x: &[f32]) -> Result<(Vec<f32>, Vec<usize>)> {
        let all = self.all_gather_bytes(&bytes::to_bytes(x))?;
        let counts = all.iter().map(|b| b.len() / 4).collect();
        Ok((all.iter().flat_map(|b| bytes::from_bytes::<f32>(b)).collect(), counts))
    }
    /// Bytes this rank has sent to other ranks so far (0 where not counted: [`Single`]).
    fn bytes_sent(&self) -> u64 {
        0
    }
    /// All-to-all with variable counts: `parts[j]` (one per rank, any length, empty for none) goes
    /// to rank j; returns what each rank sent this one, in rank order. This default carries every
    /// part through [`Comm::all_gather_bytes`] (each rank receives all of them); MPI overrides it
    /// with `MPI_Alltoallv`, which moves each part to its rank only.
    fn all_to_all_bytes(&self, parts: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        let (n, me) = (self.size(), self.rank());
        if parts.len() != n {
            anyhow::bail!("rank {me}: all-to-all with {} parts for {n} ranks", parts.len());
        }
        // [n lengths as u64] ++ the parts.
        let mut buf = bytes::to_bytes(&parts.iter().map(|p| p.len() as u64).collect::<Vec<_>>());
        buf.extend(parts.concat());
        let all = self.all_gather_bytes(&buf)?;
        all.iter()
            .map(|b| {
                let len = |j: usize| -> Option<usize> { Some(bytes::read::<u64>(b.get(8 * j..)?)? as usize) };
                let start = 8 * n + (0..me).map(len).sum::<Option<usize>>()?;
                b.get(start..start + len(me)?).map(<[u8]>::to_vec)
            })
            .enumerate()
            .map(|(r, p)| p.ok_or_else(|| anyhow::anyhow!("rank {me}: rank {r}'s all-to-all parts are cut short")))
            .collect()
    }
    /// Pieces to and from every other rank at once, each moved from where it lies to where it
    /// goes: `send[j]` (slices, in order) goes to rank j, which receives it into its `recv[me]`,
    /// piece by piece: the same number of pieces of the same lengths, in the same order.
    /// `send[me]` and `recv[me]` are empty. Lets a caller send parameters straight from their
    /// storage and receive them straight into it. This default packs each rank's pieces into one
    /// block and goes through [`Comm::all_to_all_f32`]; MPI sends and receives every piece in
    /// place.
    fn exchange_f32(&self, send: &[Vec<&[f32]>], recv: &mut [Vec<&mut [f32]>]) -> Result<()> {
        let me = self.rank();
        check_exchange(me, self.size(), send, recv)?;
        let counts: Vec<usize> = send.iter().map(|p| p.iter().map(|s| s.len()).sum()).collect();
        let buf: Vec<f32> = send.iter().flatten().flat_map(|s| s.iter().copied()).collect();
        let (got, got_counts) = self.all_to_all_f32(&buf, &counts)?;
        let mut at = 0;
        for (r, (pieces, &count)) in recv.iter_mut().zip(&got_counts).enumerate() {
            let want: usize = pieces.iter().map(|p| p.len()).sum();
            if count != want {
                anyhow::bail!("rank {me}: rank {r} sent {count} numbers where {want} were expected");
            }
            for p in pieces.iter_mut() {
                p.copy_from_slice(&got[at..at + p.len()]);
                at += p.len();
            }
        }
        Ok(())
    }
    /// All-to-all of f32 with variable counts: `send` holds one block per rank in rank order,
    /// `counts[j]` numbers for rank j (its own block included). Returns what every rank sent this
    /// one, blocks in rank order, and each block's length. This default goes through
    /// [`Comm::all_to_all_bytes`]; MPI overrides it with one `MPI_Alltoallv` straight from `send`
    /// into the result (no packing of parts, no decoding).
    fn all_to_all_f32(&self, send: &[f32], counts: &[usize]) -> Result<(Vec<f32>, Vec<usize>)> {
        if counts.len() != self.size() || counts.iter().sum::<usize>() != send.len() {
            anyhow::bail!(
                "rank {}: all-to-all of {} numbers in blocks of {counts:?} for {} ranks",
                self.rank(),
                send.len(),
                self.size()
            );
        }
        let mut at = 0;
        let parts = counts.iter().map(|&c| (bytes::to_bytes(&send[at..at + c]), at += c).0).collect();
        let got = self.all_to_all_bytes(parts)?;
        let lens = got.iter().map(|b| b.len() / 4).collect();
        Ok((got.iter().flat_map(|b| bytes::from_bytes::<f32>(b)).collect(), lens))
    }
    /// Every rank's f32 tensor `t` (the same size on every rank), flattened and stacked in rank
    /// order: (size, t.elem_count()), on `t`'s device. Through host memory unless the
    /// communicator moves device memory itself (NCCL).
    fn all_gather_tensor(&self, t: &candle_core::Tensor) -> Result<candle_core::Tensor> {
        let v = t.flatten_all()?.to_vec1::<f32>()?;
        let n = v.len();
        Ok(candle_core::Tensor::from_vec(self.all_gather_f32(&v)?, (self.size(), n), t.device())?)
    }
}

/// The shape [`Comm::exchange_f32`] needs: one list of pieces per rank each way, none to or
/// from this rank; or an error naming what is off.
pub(crate) fn check_exchange(me: usize, n: usize, send: &[Vec<&[f32]>], recv: &[Vec<&mut [f32]>]) -> Result<()> {
    if send.len() != n || recv.len() != n {
        anyhow::bail!("rank {me}: an exchange with {} send and {} receive lists for {n} ranks", send.len(), recv.len());
    }
    if !send[me].is_empty() || !recv[me].is_empty() {
        anyhow::bail!("rank {me}: an exchange with pieces to or from this rank itself");
    }
    Ok(())
}

/// One process: rank 0 of 1.
pub struct Single;

impl Comm for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn kind(&self) -> &'static str {
        "single"
    }
    fn all_gather_f32(&self, x: &[f32]) -> Result<Vec<f32>> {
        Ok(x.to_vec())
    }
    fn all_gather_f64(&self, x: &[f64]) -> Result<Vec<f64>> {
        Ok(x.to_vec())
    }
    fn all_gather_bytes(&self, x: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![x.to_vec()])
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

static WORLD: OnceLock<Arc<dyn Comm>> = OnceLock::new();

/// The process's communicator: MPI's world when a launcher started this process (and the binary
/// has the `mpi` feature), else [`Single`]. Chosen on the first call; an MPI launch without the
/// feature is an error, so two processes never train the same run unaware of each other.
pub fn world() -> Result<Arc<dyn Comm>> {
    if let Some(w) = WORLD.get() {
        return Ok(w.clone());
    }
    let w = launch::open_world()?;
    Ok(WORLD.get_or_init(|| w).clone())
}

/// The world if it was opened, for error paths that must not start MPI.
pub fn world_if_open() -> Option<Arc<dyn Comm>> {
    WORLD.get().cloned()
}

/// At the end of `main`: finalizes the world if it was opened.
pub fn finish() {
    if let Some(w) = WORLD.get() {
        w.finalize();
    }
}

/// `(first, count)`: the micro-batches of a step that `rank` of `size` runs: a contiguous block.
pub fn my_share(total: usize, rank: usize, size: usize) -> (usize, usize) {
    let per = total / size.max(1);
    (rank * per, per)
}
