//! AdamW (Loshchilov & Hutter) with state keyed by parameter name, so it can be saved and resumed.
//! Candle's `AdamW` keeps its moments private; this one exposes them as named tensors.
//!
//! Weight decay is decoupled and applied to tensors of rank >= 2 (Linear weights, embeddings, router
//! weights), as nanoGPT does; biases and norm gains (rank 1) are exempt.
//!
//! On the CPU, f32 / f64 parameters keep m and v stacked in one (2, *shape) tensor and `step`
//! updates parameter and moments in one fused in-place pass (`ops::adamw`), bit-identical to the
//! tensor-op path `step_reference` that other devices and dtypes use. The checkpoint format
//! (`m.<name>`, `v.<name>`, `step`) is the same either way.

use crate::ops::adamw::{self, AdamWStep};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

#[derive(Clone, Copy, Debug)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// The two moments of one parameter.
enum Moments {
    /// Separate m and v, replaced by new tensors at each step (the tensor-op path).
    Split { m: Tensor, v: Tensor },
    /// m and v stacked in one (2, *shape) tensor that the fused CPU op updates in place.
    Stacked(Tensor),
    /// Held by another rank (ZeRO stage 1: a shared step's parameter outside this rank's range),
    /// no memory here until [`AdamW::moment_tensors`] brings them back.
    Away,
}

impl Moments {
    /// m and v (views into the stacked tensor when stacked).
    fn split(&self) -> candle_core::Result<(Tensor, Tensor)> {
        match self {
            Moments::Split { m, v } => Ok((m.clone(), v.clone())),
            Moments::Stacked(mv) => Ok((mv.get(0)?, mv.get(1)?)),
            Moments::Away => candle_core::bail!("held by another rank"),
        }
    }

    /// The stacked (2, *shape) tensor, stacking m and v first (a fresh allocation) when split.
    fn stacked(&mut self) -> candle_core::Result<&Tensor> {
        if let Moments::Split { m, v } = self {
            *self = Moments::Stacked(Tensor::stack(&[&*m, &*v], 0)?);
        }
        match self {
            Moments::Stacked(mv) => Ok(mv),
            Moments::Split { .. } => unreachable!(),
            Moments::Away => candle_core::bail!("held by another rank"),
        }
    }
}

/// Whether a parameter's moments are kept stacked for the fused in-place CPU step
/// (`ops::adamw`): f32 / f64, contiguous, on the CPU. Other parameters use the tensor-op path.
fn fused_eligible(p: &Var) -> bool {
    p.device().is_cpu() && matches!(p.dtype(), DType::F32 | DType::F64) && p.is_contiguous()
}

pub struct AdamW {
    params: Vec<(String, Var)>,
    /// Per-parameter learning-rate multiplier (1 unless set with `set_lr_scale`).
    lr_scale: Vec<f64>,
    /// Per-parameter weight-decay multiplier (1 unless set with `set_decay_scale`).
    decay_scale: Vec<f64>,
    /// m and v of each parameter.
    moments: Vec<Moments>,
    /// `fused_eligible` of each parameter.
    fused: Vec<bool>,
    /// Optimizer steps taken (bias correction uses step + 1 for the next one).
    step: u64,
    cfg: AdamWConfig,
}

impl AdamW {
    /// `params` in a fixed order (sorted by name); moments start at zero.
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let fused: Vec<bool> = params.iter().map(|(_, p)| fused_eligible(p)).collect();
        let mut moments = Vec::with_capacity(params.len());
        for ((_, p), &f) in params.iter().zip(&fused) {
            moments.push(if f {
                let mut dims = vec![2];
                dims.extend_from_slice(p.dims());
                Moments::Stacked(Tensor::zeros(dims, p.dtype(), p.device())?)
            } else {
                let m = p.zeros_like()?;
                Moments::Split { v: m.clone(), m }
            });
        }
        let lr_scale = vec![1.0; params.len()];
        let decay_scale = vec![1.0; params.len()];
        Ok(Self { params, lr_scale, decay_scale, moments, fused, step: 0, cfg })
    }

    /// Multiplies the learning rate of every parameter whose name contains `pattern` by `scale`.
    pub fn set_lr_scale(&mut self, pattern: &str, scale: f64) {
        set_matching(&self.params, &mut self.lr_scale, pattern, scale);
    }

    /// Multiplies the weight decay of every parameter whose name contains `pattern` by `scale`
    /// (0 exempts them).
    pub fn set_decay_scale(&mut self, pattern: &str, scale: f64) {
        set_matching(&self.params, &mut self.decay_scale, pattern, scale);
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    pub fn decays(p: &Var) -> bool {
        p.rank() >= 2
    }

    /// One update with gradients `grads[i]` for `params[i]` (None: parameter untouched this step).
    ///
    /// f32 / f64 parameters on the CPU are updated by one fused in-place pass per parameter
    /// (`ops::adamw`, bit-identical to [`AdamW::step_reference`]); the others (GPU, bf16 / f16,
    /// non-contiguous) by the tensor ops of `step_reference`.
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        self.step_impl(grads, lr, None, true)
    }

    /// [`AdamW::step`] with every gradient multiplied by `scale` first (the clip factor of
    /// `train::grad_sum::clip_scale`; None = 1), with the bits of `g * scale` as a tensor op, in
    /// the same pass.
    pub fn step_scaled(&mut self, grads: &[Option<Tensor>], lr: f64, scale: Option<f64>) -> Result<()> {
        self.step_impl(grads, lr, scale, true)
    }

    /// [`AdamW::step`] with the tensor-op path for every parameter (about a dozen full-size
    /// temporaries per parameter): the reference the fused CPU step is tested against.
    pub fn step_reference(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        self.step_impl(grads, lr, None, false)
    }

    fn step_impl(&mut self, grads: &[Option<Tensor>], lr: f64, scale: Option<f64>, allow_fused: bool) -> Result<()> {
        if grads.len() != self.params.len() {
            bail!("AdamW: {} gradients for {} parameters", grads.len(), self.params.len());
        }
        self.step += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for (i, (_, p)) in self.params.iter().enumerate() {
            let Some(g) = &grads[i] else { continue };
            if matches!(self.moments[i], Moments::Away) {
                bail!("AdamW: a gradient for {}, whose moments another rank holds", self.params[i].0);
            }
            let lr = lr * self.lr_scale[i];
            let wd = c.weight_decay * self.decay_scale[i];
            let decay = wd > 0.0 && Self::decays(p);
            if allow_fused && self.fused[i] {
                let mv = self.moments[i].stacked()?;
                if adamw::fusable(p, mv, g) {
                    let hp = AdamWStep {
                        beta1: c.beta1,
                        beta2: c.beta2,
                        eps: c.eps,
                        bc1,
                        bc2,
                        lr,
                        decay: decay.then_some(1.0 - lr * wd),
                        grad_scale: scale,
                    };
                    adamw::adamw_fused_step(p, mv, g, hp)?;
                    continue;
                }
            }
            let scaled;
            let g = match scale {
                Some(s) => {
                    scaled = (g * s)?;
                    &scaled
                }
                None => g,
            };
            let (m, v) = self.moments[i].split()?;
            let m = ((&m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((&v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((&v / bc2)?.sqrt()? + c.eps)?;
            let update = ((&m / bc1)? / denom)?;
            let mut theta = p.as_tensor().clone();
            if decay {
                theta = (theta * (1.0 - lr * wd))?;
            }
            p.set(&(theta - (update * lr)?)?)?;
            self.moments[i] = Moments::Split { m, v };
        }
        Ok(())
    }

    /// Each parameter's moments as one (2, *shape) tensor (m then v), in parameter order, stacked
    /// first where they are split, and zeros where another rank holds them: the state the ranks
    /// of a shared step exchange ([`super::sharded::gather_moments`]). Writing into them writes
    /// the state.
    pub fn moment_tensors(&mut self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(self.params.len());
        for ((name, p), m) in self.params.iter().zip(self.moments.iter_mut()) {
            if matches!(m, Moments::Away) {
                let mut dims = vec![2];
                dims.extend_from_slice(p.dims());
                *m = Moments::Stacked(Tensor::zeros(dims, p.dtype(), p.device())?);
            }
            out.push((name.clone(), m.stacked()?.clone()));
        }
        Ok(out)
    }

    /// [`AdamW::moment_tensors`] of the parameters in `range` only, which must be held here.
    pub fn moment_tensors_in(&mut self, range: std::ops::Range<usize>) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(range.len());
        for i in range {
            let name = &self.params[i].0;
            let t = self.moments[i].stacked().with_context(|| format!("the optimizer state of {name}"))?;
            out.push((name.clone(), t.clone()));
        }
        Ok(out)
    }

    /// Frees the moments of every parameter outside `keep` (parameter indices): in a shared step
    /// another rank updates those ([`super::sharded`]), so this one need not hold their state.
    /// [`AdamW::moment_tensors`] brings them back (for a checkpoint); a gradient for one of them
    /// is refused.
    pub fn release_moments(&mut self, keep: std::ops::Range<usize>) {
        for (i, m) in self.moments.iter_mut().enumerate() {
            if !keep.contains(&i) {
                *m = Moments::Away;
            }
        }
    }

    /// Elements of optimizer state held here (m and v).
    pub fn held_elements(&self) -> usize {
        self.moments
            .iter()
            .map(|m| match m {
                Moments::Split { m, v } => m.elem_count() + v.elem_count(),
                Moments::Stacked(mv) => mv.elem_count(),
                Moments::Away => 0,
            })
            .sum()
    }

    /// Writes `m.<name>`, `v.<name>` and `step` to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut map: HashMap<String, Tensor> = HashMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            let (m, v) = self.moments[i]
                .split()
                .with_context(|| format!("saving the optimizer state of {name} (gather the moments first)"))?;
            map.insert(format!("m.{name}"), m);
            map.insert(format!("v.{name}"), v);
        }
        map.insert("step".into(), Tensor::new(&[self.step as i64], &candle_core::Device::Cpu)?);
        candle_core::safetensors::save(&map, path).with_context(|| format!("writing {}", path.display()))
    }

    /// Restores the moments and step written by `save`; every tensor must be there with its shape.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let dev = self.params.first().map(|(_, p)| p.device().clone()).unwrap_or(candle_core::Device::Cpu);
        let map = candle_core::safetensors::load(path, &dev).with_context(|| {
            format!("optimizer state {} is unreadable (truncated or not safetensors)", path.display())
        })?;
        for (i, (name, p)) in self.params.iter().enumerate() {
            let mut mv = Vec::with_capacity(2);
            for kind in ["m", "v"] {
                let key = format!("{kind}.{name}");
                let t = map.get(&key).with_context(|| format!("{}: missing tensor {key}", path.display()))?;
                if t.shape() != p.shape() {
                    bail!(
                        "{}: tensor {key} has shape {:?}, the model expects {:?}",
                        path.display(),
                        t.shape(),
                        p.shape()
                    );
                }
                mv.push(t.to_dtype(p.dtype())?);
            }
            let (v, m) = (mv.pop().expect("v"), mv.pop().expect("m"));
            self.moments[i] = Moments::Split { m, v };
            if self.fused[i] {
                // A fresh (2, *shape) tensor that no other tensor shares.
                self.moments[i].stacked()?;
            }
        }
        let step = map.get("step").with_context(|| format!("{}: missing tensor step", path.display()))?;
        self.step = step.to_dtype(DType::I64)?.to_vec1::<i64>()?[0] as u64;
        Ok(())
    }
}

/// Sets `values[i] = value` for every parameter whose name contains `pattern`.
fn set_matching(params: &[(String, Var)], values: &mut [f64], pattern: &str, value: f64) {
    for ((name, _), v) in params.iter().zip(values) {
        if name.contains(pattern) {
            *v = value;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    // Two steps against the AdamW formulas evaluated by hand in f64.
    #[test]
    fn matches_hand_computed_update() -> Result<()> {
        let p = Var::from_vec(vec![1.0f64, -2.0, 0.5, 3.0], (2, 2), &Device::Cpu)?;
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1 };
        let mut opt = AdamW::new(vec![("w".into(), p.clone())], cfg)?;
        let gs = [[0.1f64, -0.2, 0.3, 0.0], [0.05, 0.1, -0.3, 1.0]];
        let (mut theta, mut m, mut v) = (vec![1.0f64, -2.0, 0.5, 3.0], [0f64; 4], [0f64; 4]);
        let lr = 0.01;
        for (s, g) in gs.iter().enumerate() {
            opt.step(&[Some(Tensor::from_vec(g.to_vec(), (2, 2), &Device::Cpu)?)], lr)?;
            let t = (s + 1) as i32;
            for i in 0..4 {
                m[i] = 0.9 * m[i] + 0.1 * g[i];
                v[i] = 0.99 * v[i] + 0.01 * g[i] * g[i];
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let vh = v[i] / (1.0 - 0.99f64.powi(t));
                theta[i] = theta[i] * (1.0 - lr * 0.1) - lr * mh / (vh.sqrt() + 1e-8);
            }
        }
        let got = p.as_tensor().flatten_all()?.to_vec1::<f64>()?;
        for i in 0..4 {
            assert!((got[i] - theta[i]).abs() < 1e-12, "{i}: {} vs {}", got[i], theta[i]);
        }
        Ok(())
    }

    // set_lr_scale multiplies the step of the matching parameters only (decay included).
    #[test]
    fn lr_scale_applies_by_name() -> Result<()> {
        let mk = || Var::from_vec(vec![1.0f64, -1.0], (1, 2), &Device::Cpu);
        let (a, b) = (mk()?, mk()?);
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1 };
        let mut opt =
            AdamW::new(vec![("h.0.moe.router.weight".into(), a.clone()), ("wte.weight".into(), b.clone())], cfg)?;
        opt.set_lr_scale(".moe.router.", 3.0);
        let g = Tensor::from_vec(vec![0.5f64, 0.25], (1, 2), &Device::Cpu)?;
        opt.step(&[Some(g.clone()), Some(g)], 0.01)?;
        // First Adam step: m_hat / (sqrt(v_hat) + eps) = sign(g) (to 1e-8), so theta' = theta (1 - lr wd) - lr.
        let expect = |lr: f64| [(1.0 - lr * 0.1) - lr, -(1.0 - lr * 0.1) - lr];
        let (ga, gb) = (a.as_tensor().flatten_all()?.to_vec1::<f64>()?, b.as_tensor().flatten_all()?.to_vec1::<f64>()?);
        for i in 0..2 {
            assert!((ga[i] - expect(0.03)[i]).abs() < 1e-6, "router {i}: {}", ga[i]);
            assert!((gb[i] - expect(0.01)[i]).abs() < 1e-6, "wte {i}: {}", gb[i]);
        }
        Ok(())
    }

    // set_decay_scale scales (or with 0 removes) the decay of the matching parameters only.
    #[test]
    fn decay_scale_applies_by_name() -> Result<()> {
        let mk = || Var::from_vec(vec![1.0f64, -1.0], (1, 2), &Device::Cpu);
        let (a, b) = (mk()?, mk()?);
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1 };
        let mut opt =
            AdamW::new(vec![("h.0.moe.router.weight".into(), a.clone()), ("wte.weight".into(), b.clone())], cfg)?;
        opt.set_decay_scale(".moe.router.", 0.0);
        let g = Tensor::from_vec(vec![0.5f64, 0.25], (1, 2), &Device::Cpu)?;
        let lr = 0.01;
        opt.step(&[Some(g.clone()), Some(g)], lr)?;
        let (ga, gb) = (a.as_tensor().flatten_all()?.to_vec1::<f64>()?, b.as_tensor().flatten_all()?.to_vec1::<f64>()?);
        let (no_decay, decay) = ([1.0 - lr, -1.0 - lr], [(1.0 - lr * 0.1) - lr, -(1.0 - lr * 0.1) - lr]);
        for i in 0..2 {
            assert!((ga[i] - no_decay[i]).abs() < 1e-6, "router {i}: {}", ga[i]);
            assert!((gb[i] - decay[i]).abs() < 1e-6, "wte {i}: {}", gb[i]);
        }
        Ok(())
    }
}
