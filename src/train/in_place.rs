//! Many CPU tensors' f32 elements at once, in their own storage: read through slices under the
//! tensors' read locks ([`Reads`]), or written through slices while their write locks are held
//! ([`with_f32_mut_all`]). What a communicator needs to send parameters and gradients from where
//! they lie, and to receive them there, without packing them into a buffer first.

use anyhow::{bail, Context, Result};
use candle_core::{CpuStorage, InplaceOp1, Layout, Storage, StorageRef, Tensor};
use std::cell::RefCell;

/// The read locks of some tensors (f32, contiguous, on the CPU), held until dropped.
pub struct Reads<'t> {
    /// Each tensor's storage, the offset of its first element and its element count.
    held: Vec<(StorageRef<'t>, usize, usize)>,
}

impl<'t> Reads<'t> {
    /// Takes the read lock of every tensor; `names` name them in errors.
    pub fn new<'n>(tensors: impl IntoIterator<Item = (&'n str, &'t Tensor)>) -> Result<Self> {
        let mut held = Vec::new();
        for (name, t) in tensors {
            let (st, l) = t.storage_and_layout();
            if t.dtype() != candle_core::DType::F32 || !t.is_contiguous() || !matches!(&*st, Storage::Cpu(_)) {
                bail!("{name}: only contiguous f32 tensors on the CPU are read in place ({:?})", t.dtype());
            }
            held.push((st, l.start_offset(), t.elem_count()));
        }
        Ok(Self { held })
    }

    /// Every tensor's elements, in the order given to [`Reads::new`].
    pub fn slices(&self) -> Result<Vec<&[f32]>> {
        self.held
            .iter()
            .map(|(st, at, n)| {
                let Storage::Cpu(cpu) = &**st else { bail!("not on the CPU") };
                Ok(&cpu.as_slice::<f32>()?[*at..at + n])
            })
            .collect()
    }
}

/// Runs `f` on the elements of every tensor (f32, contiguous, on the CPU, distinct variables:
/// two views of one storage would wait for each other's lock), in the order given, each slice
/// written in place while its tensor's write lock is held.
pub fn with_f32_mut_all(tensors: &[&Tensor], f: &mut dyn FnMut(&mut [&mut [f32]]) -> Result<()>) -> Result<()> {
    nest(tensors, Vec::with_capacity(tensors.len()), f)
}

/// Takes the first tensor's write lock, adds its slice to `held`, and goes on with the rest.
fn nest<'a>(
    tensors: &[&Tensor],
    held: Vec<&'a mut [f32]>,
    f: &mut dyn FnMut(&mut [&mut [f32]]) -> Result<()>,
) -> Result<()> {
    let Some((first, rest)) = tensors.split_first() else {
        let mut held = held;
        return f(&mut held);
    };
    let mut held = Some(held);
    let mut failed = None;
    let mut next = |s: &mut [f32]| {
        let Some(outer) = held.take() else { return };
        let mut inner: Vec<&mut [f32]> = outer;
        inner.push(s);
        if let Err(e) = nest(rest, inner, f) {
            failed = Some(e);
        }
    };
    first.inplace_op1(&WithSlice(RefCell::new(&mut next))).context("writing a tensor in place")?;
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// What [`WithSlice`] calls with a tensor's elements.
type SliceFn<'c> = &'c mut dyn FnMut(&mut [f32]);

/// Calls its closure on the tensor's elements, under the tensor's write lock.
struct WithSlice<'c>(RefCell<SliceFn<'c>>);

impl InplaceOp1 for WithSlice<'_> {
    fn name(&self) -> &'static str {
        "with-slice"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(v) = s else { candle_core::bail!("in place: not f32") };
        let (a, b) =
            l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("in place: not contiguous".into()))?;
        (self.0.borrow_mut())(&mut v[a..b]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn writes_land_in_every_tensor_and_reads_see_them() {
        let vars: Vec<Var> = (1..=3).map(|n| Var::zeros(n, candle_core::DType::F32, &Device::Cpu).unwrap()).collect();
        let ts: Vec<&Tensor> = vars.iter().map(Var::as_tensor).collect();
        with_f32_mut_all(&ts, &mut |slices| {
            assert_eq!(slices.iter().map(|s| s.len()).collect::<Vec<_>>(), vec![1, 2, 3]);
            for (i, s) in slices.iter_mut().enumerate() {
                s.iter_mut().enumerate().for_each(|(k, x)| *x = (10 * i + k) as f32);
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(vars[2].to_vec1::<f32>().unwrap(), vec![20.0, 21.0, 22.0]);
        let reads = Reads::new(ts.iter().map(|t| ("t", *t))).unwrap();
        assert_eq!(reads.slices().unwrap(), vec![&[0.0][..], &[10.0, 11.0][..], &[20.0, 21.0, 22.0][..]]);
        drop(reads);
        // An error inside comes out; a strided tensor is refused by name.
        let err = with_f32_mut_all(&ts, &mut |_| bail!("inner")).unwrap_err();
        assert!(format!("{err:#}").contains("inner"), "{err:#}");
        let m = Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap().t().unwrap();
        assert!(Reads::new([("m", &m)]).err().unwrap().to_string().contains("m: only contiguous"));
    }
}
