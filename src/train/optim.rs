//! AdamW (Loshchilov & Hutter) with state keyed by parameter name, so it can be saved and resumed.
//! Candle's `AdamW` keeps its moments private; this one exposes them as named tensors.
//!
//! Weight decay is decoupled and applied to tensors of rank >= 2 (Linear weights, embeddings, router
//! weights), as nanoGPT does; biases and norm gains (rank 1) are exempt.

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

pub struct AdamW {
    params: Vec<(String, Var)>,
    /// Per-parameter learning-rate multiplier (1 unless set with `set_lr_scale`).
    lr_scale: Vec<f64>,
    /// Per-parameter weight-decay multiplier (1 unless set with `set_decay_scale`).
    decay_scale: Vec<f64>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Optimizer steps taken (bias correction uses step + 1 for the next one).
    step: u64,
    cfg: AdamWConfig,
}

impl AdamW {
    /// `params` in a fixed order (sorted by name); moments start at zero.
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let m = params.iter().map(|(_, p)| p.zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        let lr_scale = vec![1.0; params.len()];
        let decay_scale = vec![1.0; params.len()];
        Ok(Self { params, lr_scale, decay_scale, m, v, step: 0, cfg })
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
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        if grads.len() != self.params.len() {
            bail!("AdamW: {} gradients for {} parameters", grads.len(), self.params.len());
        }
        self.step += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for (i, (_, p)) in self.params.iter().enumerate() {
            let Some(g) = &grads[i] else { continue };
            let lr = lr * self.lr_scale[i];
            let m = ((&self.m[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((&v / bc2)?.sqrt()? + c.eps)?;
            let update = ((&m / bc1)? / denom)?;
            let mut theta = p.as_tensor().clone();
            let wd = c.weight_decay * self.decay_scale[i];
            if wd > 0.0 && Self::decays(p) {
                theta = (theta * (1.0 - lr * wd))?;
            }
            p.set(&(theta - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// Writes `m.<name>`, `v.<name>` and `step` to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut map: HashMap<String, Tensor> = HashMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            map.insert(format!("m.{name}"), self.m[i].clone());
            map.insert(format!("v.{name}"), self.v[i].clone());
        }
        map.insert("step".into(), Tensor::new(&[self.step as i64], &candle_core::Device::Cpu)?);
        candle_core::safetensors::save(&map, path).with_context(|| format!("writing {}", path.display()))
    }

    /// Restores the moments and step written by `save`; every tensor must be there with its shape.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let dev = self.m.first().map(|t| t.device().clone()).unwrap_or(candle_core::Device::Cpu);
        let map = candle_core::safetensors::load(path, &dev).with_context(|| {
            format!("optimizer state {} is unreadable (truncated or not safetensors)", path.display())
        })?;
        for (i, (name, p)) in self.params.iter().enumerate() {
            for (kind, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
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
                *slot = t.to_dtype(p.dtype())?;
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
        let expect = |lr: f64| [1.0 * (1.0 - lr * 0.1) - lr, -1.0 * (1.0 - lr * 0.1) - lr];
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
        let (no_decay, decay) = ([1.0 - lr, -1.0 - lr], [1.0 * (1.0 - lr * 0.1) - lr, -1.0 * (1.0 - lr * 0.1) - lr]);
        for i in 0..2 {
            assert!((ga[i] - no_decay[i]).abs() < 1e-6, "router {i}: {}", ga[i]);
            assert!((gb[i] - decay[i]).abs() < 1e-6, "wte {i}: {}", gb[i]);
        }
        Ok(())
    }
}
