//! MPI's world communicator (feature `mpi`, the `mpi` crate over the system's OpenMPI or MPICH):
//! ranks are the processes `mpirun -np N` started, on one machine or across a hostfile.
//!
//! MPI is initialised with `MPI_THREAD_SERIALIZED`: the training loop calls the collectives from
//! one thread at a time (the worker threads never do). A rank that fails calls `MPI_Abort`, which
//! ends every rank; a rank that dies makes `mpirun` end the others and name it.

use super::Comm;
use crate::ops::backend::cpu::output_vec;
use anyhow::{bail, Context, Result};
use mpi::datatype::{Partition, PartitionMut};
use mpi::environment::{Threading, Universe};
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;
use mpi::Count;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// The MPI world (and the universe that finalizes MPI when [`Comm::finalize`] drops it).
pub struct MpiComm {
    inner: Mutex<Option<(Universe, SimpleCommunicator)>>,
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    /// Bytes sent to other ranks ([`Comm::bytes_sent`]).
    sent: AtomicU64,
}

// SAFETY: MPI runs at MPI_THREAD_SERIALIZED (checked in `init`), and every call into it below
// takes the `inner` lock first, so calls from different threads never overlap.
unsafe impl Send for MpiComm {}
unsafe impl Sync for MpiComm {}

impl MpiComm {
    /// Initialises MPI (once per process) and returns its world.
    pub fn init() -> Result<Self> {
        let (universe, level) = mpi::initialize_with_threading(Threading::Serialized)
            .context("MPI could not be initialised (it may already be)")?;
        if level < Threading::Serialized {
            bail!("this MPI library gives thread level {level:?}; gumbel-moe needs Serialized");
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        let dup = universe.world();
        Ok(Self { inner: Mutex::new(Some((universe, dup))), world, rank, size, sent: AtomicU64::new(0) })
    }

    /// Runs `f` with the communicator, serialised.
    fn with<R>(&self, f: impl FnOnce(&SimpleCommunicator) -> R) -> Result<R> {
        let g = self.inner.lock().map_err(|_| anyhow::anyhow!("MPI lock poisoned"))?;
        let Some((_, comm)) = g.as_ref() else { bail!("rank {}: MPI was already finalized", self.rank) };
        Ok(f(comm))
    }

    /// Counts `bytes` sent to each of `to` other ranks.
    fn count(&self, bytes: usize, to: usize) {
        self.sent.fetch_add((bytes * to) as u64, Ordering::Relaxed);
    }

    /// Gathers equal-length slices of any MPI type.
    fn gather<T: Equivalence + Copy + Default>(&self, x: &[T]) -> Result<Vec<T>> {
        self.count(std::mem::size_of_val(x), self.size - 1);
        let mut out = output_vec(x.len() * self.size, T::default());
        self.with(|c| c.all_gather_into(x, &mut out[..]))?;
        Ok(out)
    }

    /// Every rank's `x` (any length) in rank order, and each rank's length.
    fn gather_varcount<T: Equivalence + Copy + Default>(&self, x: &[T]) -> Result<(Vec<T>, Vec<usize>)> {
        let len = to_count(x.len())?;
        let counts = self.gather(&[len])?;
        let displs = displs(&counts);
        let mut buf = output_vec(counts.iter().map(|&c| c as usize).sum(), T::default());
        self.count(std::mem::size_of_val(x), self.size - 1);
        self.with(|c| {
            let mut part = PartitionMut::new(&mut buf[..], &counts[..], &displs[..]);
            c.all_gather_varcount_into(x, &mut part);
        })?;
        Ok((buf, counts.iter().map(|&c| c as usize).collect()))
    }

    /// `MPI_Alltoall` of the counts, then `MPI_Alltoallv` of `send` (blocks of `send_counts`
    /// elements in rank order, this rank's own block included): what every rank sent this one,
    /// in rank order, and each block's length.
    fn all_to_all_v<T: Equivalence + Copy + Default>(
        &self,
        send: &[T],
        send_counts: &[usize],
    ) -> Result<(Vec<T>, Vec<Count>)> {
        if send_counts.len() != self.size || send_counts.iter().sum::<usize>() != send.len() {
            bail!(
                "rank {}: all-to-all of {} elements in blocks of {send_counts:?} for {} ranks",
                self.rank,
                send.len(),
                self.size
            );
        }
        let send_counts = to_counts(send_counts)?;
        let mut recv_counts = vec![0 as Count; self.size];
        self.with(|c| c.all_to_all_into(&send_counts[..], &mut recv_counts[..]))?;
        let (send_displs, recv_displs) = (displs(&send_counts), displs(&recv_counts));
        let to_others: usize = (send.len() - send_counts[self.rank] as usize) * std::mem::size_of::<T>();
        self.count(to_others, 1);
        let mut buf = output_vec(recv_counts.iter().map(|&c| c as usize).sum(), T::default());
        self.with(|c| {
            let send = Partition::new(send, &send_counts[..], &send_displs[..]);
            let mut recv = PartitionMut::new(&mut buf[..], &recv_counts[..], &recv_displs[..]);
            c.all_to_all_varcount_into(&send, &mut recv);
        })?;
        Ok((buf, recv_counts))
    }
}

/// The tag of [`Comm::exchange_f32`]'s messages (pieces between two ranks match in order).
const EXCHANGE_TAG: mpi::Tag = 7;

/// Element counts as MPI takes them, or an error for a block past MPI's int.
fn to_counts(counts: &[usize]) -> Result<Vec<Count>> {
    counts.iter().map(|&n| to_count(n)).collect()
}

/// One block's element count as MPI takes it.
fn to_count(n: usize) -> Result<Count> {
    Count::try_from(n).context("more than 2^31 elements in one block of one exchange")
}

/// Where each rank's block starts in a buffer of blocks of `counts` elements.
fn displs(counts: &[Count]) -> Vec<Count> {
    counts.iter().scan(0, |acc, &c| Some(std::mem::replace(acc, *acc + c))).collect()
}

impl Comm for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn kind(&self) -> &'static str {
        "mpi"
    }
    fn all_gather_f32(&self, x: &[f32]) -> Result<Vec<f32>> {
        self.gather(x)
    }
    fn all_gather_f64(&self, x: &[f64]) -> Result<Vec<f64>> {
        self.gather(x)
    }
    fn all_gather_bytes(&self, x: &[u8]) -> Result<Vec<Vec<u8>>> {
        let (buf, counts) = self.gather_varcount(x)?;
        let mut at = 0;
        Ok(counts.iter().map(|&n| (buf[at..at + n].to_vec(), at += n).0).collect())
    }
    fn all_gather_f32_varcount(&self, x: &[f32]) -> Result<(Vec<f32>, Vec<usize>)> {
        self.gather_varcount(x)
    }
    fn bytes_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
    /// One `MPI_Alltoallv` of the parts concatenated, cut again per rank.
    fn all_to_all_bytes(&self, parts: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        if parts.len() != self.size {
            bail!("rank {}: all-to-all with {} parts for {} ranks", self.rank, parts.len(), self.size);
        }
        let lens: Vec<usize> = parts.iter().map(Vec::len).collect();
        let (buf, counts) = self.all_to_all_v(&parts.concat(), &lens)?;
        let mut at = 0;
        Ok(counts.iter().map(|&n| (buf[at..at + n as usize].to_vec(), at += n as usize).0).collect())
    }
    /// One nonblocking receive per piece posted, then one nonblocking send per piece, each
    /// straight from and into the caller's slices (on one machine OpenMPI copies a large piece
    /// once, from the sender's memory into the receiver's); then waits for all. A piece that
    /// arrives shorter than its slice is an error naming the rank; a longer one makes MPI end
    /// the job (a truncation error).
    fn exchange_f32(&self, send: &[Vec<&[f32]>], recv: &mut [Vec<&mut [f32]>]) -> Result<()> {
        let me = self.rank;
        super::check_exchange(me, self.size, send, recv)?;
        self.count(send.iter().flatten().map(|s| std::mem::size_of_val(*s)).sum(), 1);
        let wants: Vec<(usize, usize)> =
            recv.iter().enumerate().flat_map(|(r, ps)| ps.iter().map(move |p| (r, p.len()))).collect();
        let counts = self.with(|c| {
            mpi::request::scope(|scope| {
                let mut got = Vec::with_capacity(wants.len());
                for (r, pieces) in recv.iter_mut().enumerate() {
                    let from = c.process_at_rank(r as i32);
                    for p in pieces.iter_mut() {
                        got.push(from.immediate_receive_into_with_tag(scope, &mut **p, EXCHANGE_TAG));
                    }
                }
                let mut sent = Vec::with_capacity(send.iter().map(Vec::len).sum());
                for (j, pieces) in send.iter().enumerate() {
                    let to = c.process_at_rank(j as i32);
                    for p in pieces {
                        sent.push(to.immediate_send_with_tag(scope, *p, EXCHANGE_TAG));
                    }
                }
                let counts: Vec<Count> = got.into_iter().map(|q| q.wait().count(f32::equivalent_datatype())).collect();
                sent.into_iter().for_each(|q| {
                    q.wait();
                });
                counts
            })
        })?;
        for ((r, want), got) in wants.into_iter().zip(counts) {
            if got as usize != want {
                bail!("rank {me}: rank {r} sent a piece of {got} numbers where {want} were expected");
            }
        }
        Ok(())
    }
    /// One `MPI_Alltoallv` straight from `send` into the result.
    fn all_to_all_f32(&self, send: &[f32], counts: &[usize]) -> Result<(Vec<f32>, Vec<usize>)> {
        let (buf, got) = self.all_to_all_v(send, counts)?;
        Ok((buf, got.iter().map(|&c| c as usize).collect()))
    }
    fn barrier(&self) -> Result<()> {
        self.with(|c| c.barrier())
    }
    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
    fn finalize(&self) {
        if let Ok(mut g) = self.inner.lock() {
            // Dropping the universe calls MPI_Finalize.
            g.take();
        }
    }
}
