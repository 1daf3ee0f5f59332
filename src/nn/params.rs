//! Trainable parameters: a `VarBuilder` backend that creates every variable with a deterministic
//! Philox initialisation and records it under its full name.
//!
//! Candle's `VarMap` draws its init from the CPU generator, which cannot be seeded, and iterates in
//! hash order. Here each tensor's init is keyed by (seed, name), so a model is identical whatever order
//! layers are built in, and `Params::named()` is sorted, which keeps the optimizer and gradient
//! clipping deterministic.

use crate::rng::{fnv1a, normals, Stream};
use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::{var_builder::SimpleBackend, Init, VarBuilder};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// The named trainable variables of a model, sorted by name.
#[derive(Clone, Default)]
pub struct Params {
    vars: Arc<Mutex<BTreeMap<String, Var>>>,
}

impl Params {
    pub fn new() -> Self {
        Self::default()
    }

    /// A `VarBuilder` whose `get` creates (or returns) variables in this set, initialised from `seed`.
    pub fn var_builder(&self, seed: u64, dtype: DType, device: &Device) -> VarBuilder<'static> {
        let backend = ParamBackend { params: self.clone(), seed };
        VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
    }

    /// (name, variable) pairs in name order.
    pub fn named(&self) -> Vec<(String, Var)> {
        let vars = self.vars.lock().expect("params lock");
        vars.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    pub fn get(&self, name: &str) -> Option<Var> {
        self.vars.lock().expect("params lock").get(name).cloned()
    }

    pub fn len(&self) -> usize {
        self.vars.lock().expect("params lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Total number of scalar parameters.
    pub fn num_elements(&self) -> usize {
        self.named().iter().map(|(_, v)| v.elem_count()).sum()
    }
}

struct ParamBackend {
    params: Params,
    seed: u64,
}

/// Draws an init tensor on the host from the (seed, name) Philox stream.
fn init_tensor(init: Init, shape: &Shape, seed: u64, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
    let n = shape.elem_count();
    let tag = fnv1a(name);
    let data: Vec<f32> = match init {
        Init::Const(v) => vec![v as f32; n],
        Init::Randn { mean, stdev } => {
            normals(seed, Stream::Init, tag, n).into_iter().map(|z| (mean + stdev * z as f64) as f32).collect()
        }
        Init::Uniform { lo, up } => uniforms(seed, tag, n).into_iter().map(|u| (lo + (up - lo) * u) as f32).collect(),
        Init::Kaiming { .. } => {
            // Linear's default: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = last dim.
            let fan_in = *shape.dims().last().unwrap_or(&1) as f64;
            let b = 1.0 / fan_in.sqrt();
            uniforms(seed, tag, n).into_iter().map(|u| (-b + 2.0 * b * u) as f32).collect()
        }
    };
    Tensor::from_vec(data, shape, dev)?.to_dtype(dtype)
}

fn uniforms(seed: u64, tag: u32, n: usize) -> Vec<f64> {
    // Box-Muller normals are not needed here: reuse the Philox words directly.
    let mut out = Vec::with_capacity(n);
    let mut i = 0u32;
    while out.len() < n {
        let r = crate::rng::draw(seed, Stream::Init, tag, i, 1);
        out.extend(r.iter().map(|&w| crate::rng::u32_to_open_unit(w) as f64));
        i += 1;
    }
    out.truncate(n);
    out
}

impl SimpleBackend for ParamBackend {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut vars = self.params.vars.lock().expect("params lock");
        if let Some(v) = vars.get(name) {
            if v.shape() != &s {
                candle_core::bail!("parameter {name} exists with shape {:?}, asked for {:?}", v.shape(), s);
            }
            return Ok(v.as_tensor().clone());
        }
        let var = Var::from_tensor(&init_tensor(h, &s, self.seed, name, dtype, dev)?)?;
        let t = var.as_tensor().clone();
        vars.insert(name.to_string(), var);
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        match self.params.get(name) {
            Some(v) => Ok(v.as_tensor().clone()),
            None => candle_core::bail!("no parameter named {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.params.get(name).is_some()
    }
}
