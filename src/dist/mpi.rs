//! MPI's world communicator (feature `mpi`, the `mpi` crate over the system's OpenMPI or MPICH):
//! ranks are the processes `mpirun -np N` started, on one machine or across a hostfile.
//!
//! MPI is initialised with `MPI_THREAD_SERIALIZED`: the training loop calls the collectives from
//! one thread at a time (the worker threads never do). A rank that fails calls `MPI_Abort`, which
//! ends every rank; a rank that dies makes `mpirun` end the others and name it.

use super::Comm;
use anyhow::{bail, Context, Result};
use mpi::datatype::{Partition, PartitionMut};
use mpi::environment::{Threading, Universe};
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;
use mpi::Count;
use std::sync::Mutex;

/// The MPI world (and the universe that finalizes MPI when [`Comm::finalize`] drops it).
pub struct MpiComm {
    inner: Mutex<Option<(Universe, SimpleCommunicator)>>,
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
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
        Ok(Self { inner: Mutex::new(Some((universe, dup))), world, rank, size })
    }

    /// Runs `f` with the communicator, serialised.
    fn with<R>(&self, f: impl FnOnce(&SimpleCommunicator) -> R) -> Result<R> {
        let g = self.inner.lock().map_err(|_| anyhow::anyhow!("MPI lock poisoned"))?;
        let Some((_, comm)) = g.as_ref() else { bail!("rank {}: MPI was already finalized", self.rank) };
        Ok(f(comm))
    }

    /// Gathers equal-length slices of any MPI type.
    fn gather<T: Equivalence + Copy + Default>(&self, x: &[T]) -> Result<Vec<T>> {
        let mut out = vec![T::default(); x.len() * self.size];
        self.with(|c| c.all_gather_into(x, &mut out[..]))?;
        Ok(out)
    }
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
        let len = Count::try_from(x.len()).context("more than 2 GiB in one exchange")?;
        let counts = self.gather(&[len])?;
        let displs: Vec<Count> = counts.iter().scan(0, |acc, &c| Some(std::mem::replace(acc, *acc + c))).collect();
        let total: usize = counts.iter().map(|&c| c as usize).sum();
        let mut buf = vec![0u8; total];
        self.with(|c| {
            let mut part = PartitionMut::new(&mut buf[..], &counts[..], &displs[..]);
            c.all_gather_varcount_into(x, &mut part);
        })?;
        Ok(counts.iter().zip(&displs).map(|(&n, &d)| buf[d as usize..(d + n) as usize].to_vec()).collect())
    }
    /// `MPI_Alltoall` of the counts, then `MPI_Alltoallv` of the bytes: each part goes to its
    /// rank only.
    fn all_to_all_bytes(&self, parts: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        if parts.len() != self.size {
            bail!("rank {}: all-to-all with {} parts for {} ranks", self.rank, parts.len(), self.size);
        }
        let count = |p: &Vec<u8>| Count::try_from(p.len()).context("more than 2 GiB to one rank in one exchange");
        let send_counts = parts.iter().map(count).collect::<Result<Vec<Count>>>()?;
        let mut recv_counts = vec![0 as Count; self.size];
        self.with(|c| c.all_to_all_into(&send_counts[..], &mut recv_counts[..]))?;
        let displs = |counts: &[Count]| -> Vec<Count> {
            counts.iter().scan(0, |acc, &c| Some(std::mem::replace(acc, *acc + c))).collect()
        };
        let (send_displs, recv_displs) = (displs(&send_counts), displs(&recv_counts));
        let flat = parts.concat();
        let mut buf = vec![0u8; recv_counts.iter().map(|&c| c as usize).sum()];
        self.with(|c| {
            let send = Partition::new(&flat[..], &send_counts[..], &send_displs[..]);
            let mut recv = PartitionMut::new(&mut buf[..], &recv_counts[..], &recv_displs[..]);
            c.all_to_all_varcount_into(&send, &mut recv);
        })?;
        Ok(recv_counts.iter().zip(&recv_displs).map(|(&n, &d)| buf[d as usize..(d + n) as usize].to_vec()).collect())
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
