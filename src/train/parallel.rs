//! Data parallelism on the CPU: a step's micro-batches run side by side, one per worker thread,
//! each single-threaded inside (as two processes would), and their gradients are summed in
//! micro-batch order. The result is the same for any number of workers.
//!
//! Why not parallel ops: a training step of the CPU recipe is ~1,000 small ops; Candle's elementwise
//! pool and gemm's rayon pool make every one wait for all workers, and on 2 cores the two pools
//! oversubscribe. Two independent micro-batches keep both cores busy without any of that.
//!
//! Intra-op threading is a process-wide setting of Candle, read from the environment:
//! `RAYON_NUM_THREADS` (gemm, rayon's global pool) and `CANDLE_NUM_THREADS` (elementwise ops).
//! With more than one worker, [`Workers::new`] sets both to 1 unless the user already set them.

use anyhow::{Context, Result};
use rayon::prelude::*;

/// A pool of `n` worker threads for micro-batches (and evaluation batches).
pub struct Workers {
    pool: Option<rayon::ThreadPool>,
    n: usize,
}

/// How many workers `train.threads` asks for with `accum` micro-batches per step: 0 = one per
/// core (or `GUMBEL_MOE_THREADS`, which `compare --jobs N` sets to cores / N for its runs), never
/// more than there are micro-batches.
pub fn worker_count(threads: usize, accum: usize) -> usize {
    let cores = std::env::var("GUMBEL_MOE_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let want = if threads == 0 { cores } else { threads };
    want.clamp(1, accum.max(1))
}

/// Several ranks on one machine share its cores: each rank's share (the cores it is bound to
/// when the launcher binds it, else the machine's cores over the ranks on this machine) becomes
/// what `train.threads = 0` means for it, and its ops run single-threaded unless the user set
/// `RAYON_NUM_THREADS` / `CANDLE_NUM_THREADS`. (Unbounded, every rank's ops would start one
/// thread per core, and ranks that wait for each other at every step would fight for them.)
pub fn share_cores_with_local_ranks() {
    let seen = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let local = ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMIX_LOCAL_SIZE"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse::<usize>().ok())
        .unwrap_or(1)
        .max(1);
    let mine = if seen < online_cpus() { seen } else { (seen / local).max(1) };
    if std::env::var_os("GUMBEL_MOE_THREADS").is_none() {
        std::env::set_var("GUMBEL_MOE_THREADS", mine.to_string());
    }
    for var in ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"] {
        if std::env::var_os(var).is_none() {
            std::env::set_var(var, "1");
        }
    }
}

/// The machine's online CPUs (on Linux; elsewhere what this process may use).
fn online_cpus() -> usize {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: sysconf reads a system setting.
        let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
        if n > 0 {
            return n as usize;
        }
    }
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

impl Workers {
    /// `n` workers; with n > 1 the ops inside each run single-threaded (see the module header).
    pub fn new(n: usize) -> Result<Self> {
        if n > 1 {
            for var in ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"] {
                if std::env::var_os(var).is_none() {
                    // Read by Candle at each matmul (gemm's thread count) and when its elementwise
                    // pool starts. Set before the first op of the run.
                    std::env::set_var(var, "1");
                }
            }
        } else if rayon::current_num_threads() > 1 {
            // One worker with threads inside each op: the ops use rayon's global pool.
            return Ok(Self { pool: None, n: 1 });
        }
        // One worker on a single-threaded global pool gets a pool of its own too: inside it the
        // ops' rayon loops run in place, instead of handing each call to the global pool's
        // thread and waiting for it.
        let n = n.max(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("gumbel-moe-worker-{i}"))
            // Candle's backward walks the graph recursively (as the binary's main thread).
            .stack_size(512 << 20)
            .build()
            .context("starting the data-parallel worker threads")?;
        Ok(Self { pool: Some(pool), n })
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// Runs `f` inside the worker pool, so the rayon-parallel loops in it (the fused AdamW) use
    /// every worker.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            None => f(),
            Some(pool) => pool.install(f),
        }
    }

    /// `f(0), ..., f(count - 1)`, in parallel over the workers; results in index order.
    pub fn map<T: Send>(&self, count: usize, f: impl Fn(usize) -> Result<T> + Sync + Send) -> Result<Vec<T>> {
        match &self.pool {
            None => (0..count).map(f).collect(),
            Some(pool) => pool.install(|| (0..count).into_par_iter().with_max_len(1).map(f).collect()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_never_outnumber_micro_batches() {
        assert_eq!(worker_count(3, 2), 2);
        assert_eq!(worker_count(1, 4), 1);
        assert_eq!(worker_count(5, 1), 1);
        assert!((1..=8).contains(&worker_count(0, 8)));
        let w = Workers::new(2).unwrap();
        let got = w.map(5, |i| Ok(i * i)).unwrap();
        assert_eq!(got, vec![0, 1, 4, 9, 16], "results come back in index order");
    }
}
