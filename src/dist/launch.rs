//! Which launcher started this process: the environment `mpirun` (OpenMPI), `mpiexec` (MPICH,
//! Hydra) or a PMIx launcher such as `srun` leaves, and the world communicator that follows.

use super::{Comm, Single};
use anyhow::Result;
use std::sync::Arc;

/// Environment variables a launcher sets for each rank: (variable, launcher).
const LAUNCH_VARS: [(&str, &str); 4] = [
    ("OMPI_COMM_WORLD_SIZE", "OpenMPI's mpirun"),
    ("PMI_SIZE", "an MPICH / Hydra mpiexec"),
    ("PMIX_RANK", "a PMIx launcher"),
    ("MPI_LOCALNRANKS", "an MPICH mpiexec"),
];

/// The launcher that started this process, if any: (variable, value, launcher).
pub fn launched_by() -> Option<(&'static str, String, &'static str)> {
    LAUNCH_VARS.iter().find_map(|(var, who)| std::env::var(var).ok().map(|v| (*var, v, *who)))
}

/// This process's rank among the ranks on its machine, as the launcher says (0 without one).
pub fn local_rank() -> usize {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMIX_LOCAL_RANK", "SLURM_LOCALID"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
        .unwrap_or(0)
}

/// The world communicator for this process (see [`super::world`]).
pub fn open_world() -> Result<Arc<dyn Comm>> {
    let Some((var, value, who)) = launched_by() else { return Ok(Arc::new(Single)) };
    // One rank under a launcher is one process: no MPI needed.
    if var.ends_with("SIZE") && value.trim() == "1" {
        return Ok(Arc::new(Single));
    }
    open_mpi(var, &value, who)
}

#[cfg(feature = "mpi")]
fn open_mpi(_var: &str, _value: &str, _who: &str) -> Result<Arc<dyn Comm>> {
    Ok(Arc::new(super::mpi::MpiComm::init()?))
}

#[cfg(not(feature = "mpi"))]
fn open_mpi(var: &str, value: &str, who: &str) -> Result<Arc<dyn Comm>> {
    anyhow::bail!(
        "this process was started by {who} ({var}={value}), but this gumbel-moe binary was built without \
         MPI, so its ranks could not talk to each other and would each train the whole run. Build it with \
         `cargo build --release --features mpi` (needs an MPI library and libclang; docs/distributed.md), \
         or run it without the launcher"
    )
}
