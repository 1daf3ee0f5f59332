//! Finiteness checks for weights and optimizer state: a diverged run must not be saved, and a
//! checkpoint holding NaN or infinity must not be evaluated, sampled from or resumed.

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use std::path::Path;

/// Whether every element of `t` is finite. Integer tensors always are. One reduction on the
/// tensor's device: `t - t` is 0 for a finite element and NaN for NaN or infinity, and the sum of
/// the differences is NaN as soon as one is.
pub fn all_finite(t: &Tensor) -> Result<bool> {
    if !t.dtype().is_float() || t.elem_count() == 0 {
        return Ok(true);
    }
    let s = t.sub(t)?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    Ok(s.is_finite())
}

/// The name of the first of `tensors` (in the order given) that holds a NaN or an infinity.
pub fn first_non_finite<'a>(tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>) -> Result<Option<String>> {
    for (name, t) in tensors {
        if !all_finite(t).with_context(|| format!("checking tensor {name} for NaN"))? {
            return Ok(Some(name.to_string()));
        }
    }
    Ok(None)
}

/// The first tensor of a safetensors file (in name order) that holds a NaN or an infinity.
pub fn first_non_finite_in_file(path: &Path) -> Result<Option<String>> {
    super::file_mode::check_readable(path, "safetensors file")?;
    let map = candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .with_context(|| format!("{} is unreadable (truncated or not safetensors)", path.display()))?;
    let mut named: Vec<(&String, &Tensor)> = map.iter().collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    first_non_finite(named.into_iter().map(|(n, t)| (n.as_str(), t)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn finds_nan_and_infinity_by_name() {
        let ok = Tensor::new(&[1.0f32, -2.0, 3e38], &Device::Cpu).unwrap();
        let nan = Tensor::new(&[1.0f32, f32::NAN], &Device::Cpu).unwrap();
        let inf = Tensor::new(&[[0.0f64], [f64::NEG_INFINITY]], &Device::Cpu).unwrap();
        let ints = Tensor::new(&[3i64], &Device::Cpu).unwrap();
        assert!(all_finite(&ok).unwrap() && all_finite(&ints).unwrap());
        assert!(!all_finite(&nan).unwrap() && !all_finite(&inf).unwrap());
        assert_eq!(first_non_finite([("a", &ok), ("b", &inf), ("c", &nan)]).unwrap().as_deref(), Some("b"));
        assert_eq!(first_non_finite([("a", &ok), ("i", &ints)]).unwrap(), None);
    }
}
