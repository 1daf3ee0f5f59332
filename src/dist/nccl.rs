//! NCCL between GPUs (feature `nccl`): one rank per GPU, started by `mpirun` as on the CPU. The
//! gradients are all-gathered GPU to GPU by NCCL; everything small (start-up checks, losses,
//! routing statistics) goes through the MPI world this wraps. The NCCL id is made by rank 0 and
//! sent to the others through MPI, as llm.c does.
//!
//! Not run on a GPU yet: it type-checks with `--features nccl` (CI), nothing more.

use super::Comm;
use anyhow::{anyhow, bail, Result};
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm as Nccl, Id};
use candle_core::{CudaStorage, CustomOp1, Device, Layout, Shape, Tensor};
use std::sync::{Arc, Mutex};

/// The ranks of `host` (MPI), with an NCCL communicator over their GPUs.
pub struct NcclComm {
    host: Arc<dyn Comm>,
    nccl: Mutex<Nccl>,
}

// SAFETY: the NCCL communicator is used only under its lock, one call at a time, on the stream
// of the device it was made for.
unsafe impl Send for NcclComm {}
unsafe impl Sync for NcclComm {}

impl NcclComm {
    /// NCCL over the ranks of `host`, each on its `device` (a CUDA device, one per rank).
    pub fn over(host: Arc<dyn Comm>, device: &Device) -> Result<Self> {
        let Device::Cuda(dev) = device else { bail!("NCCL needs a CUDA device, not {device:?}") };
        let lead = host.rank() == 0;
        let mine: Vec<u8> = if lead {
            let id = Id::new().map_err(|e| anyhow!("rank 0: creating the NCCL id: {e:?}"))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        let all = host.all_gather_bytes(&mine)?;
        let bytes: [std::ffi::c_char; 128] = std::array::from_fn(|i| all[0].get(i).copied().unwrap_or(0) as _);
        if all[0].len() != 128 {
            bail!("rank {}: rank 0 sent an NCCL id of {} bytes, not 128", host.rank(), all[0].len());
        }
        let nccl = Nccl::from_rank(dev.cuda_stream(), host.rank(), host.size(), Id::uninit(bytes))
            .map_err(|e| anyhow!("rank {}: NCCL init: {e:?}", host.rank()))?;
        Ok(Self { host, nccl: Mutex::new(nccl) })
    }
}

impl Comm for NcclComm {
    fn rank(&self) -> usize {
        self.host.rank()
    }
    fn size(&self) -> usize {
        self.host.size()
    }
    fn kind(&self) -> &'static str {
        "nccl"
    }
    fn all_gather_f32(&self, x: &[f32]) -> Result<Vec<f32>> {
        self.host.all_gather_f32(x)
    }
    fn all_gather_f64(&self, x: &[f64]) -> Result<Vec<f64>> {
        self.host.all_gather_f64(x)
    }
    fn all_gather_bytes(&self, x: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.host.all_gather_bytes(x)
    }
    /// Through the host communicator (MPI): the expert-parallel rows go GPU -> host -> GPU.
    fn all_to_all_bytes(&self, parts: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        self.host.all_to_all_bytes(parts)
    }
    fn all_to_all_f32(&self, send: &[f32], counts: &[usize]) -> Result<(Vec<f32>, Vec<usize>)> {
        self.host.all_to_all_f32(send, counts)
    }
    fn barrier(&self) -> Result<()> {
        self.host.barrier()
    }
    fn abort(&self, code: i32) -> ! {
        self.host.abort(code)
    }
    fn finalize(&self) {
        self.host.finalize()
    }
    /// GPU to GPU: NCCL's all-gather into a new (size, n) tensor on the same device.
    fn all_gather_tensor(&self, t: &Tensor) -> Result<Tensor> {
        if !t.device().is_cuda() {
            return self.host.all_gather_tensor(t);
        }
        let nccl = self.nccl.lock().map_err(|_| anyhow!("NCCL lock poisoned"))?;
        let flat = t.flatten_all()?.contiguous()?;
        Ok(flat.apply_op1_no_bwd(&AllGather { nccl: &nccl, size: self.size() })?)
    }
}

/// The all-gather as an op, so its output becomes a tensor on the device.
struct AllGather<'a> {
    nccl: &'a Nccl,
    size: usize,
}

impl CustomOp1 for AllGather<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-gather"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("the NCCL all-gather runs on CUDA tensors only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (start, end) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("not contiguous".into()))?;
        let src = s.as_cuda_slice::<f32>()?.slice(start..end);
        let mut dst = s.device.alloc_zeros::<f32>((end - start) * self.size)?;
        self.nccl.all_gather(&src, &mut dst).map_err(|e| candle_core::Error::Msg(format!("NCCL all-gather: {e:?}")))?;
        Ok((CudaStorage::wrap_cuda_slice(dst, s.device.clone()), Shape::from((self.size, end - start))))
    }
}
