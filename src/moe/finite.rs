//! Non-finite router logits stop training with an error naming the step, layer, token and expert
//! of the first one. The check stays on the device: a one-word flag that the MoE layer brings back
//! in the same transfer as its dispatch offsets; only when it is set are the logits copied to the
//! host to find where the bad value is.

use candle_core::{DType, Device, Result, Tensor};

/// logits (T, E) -> (1,) u32 on their device, 1 when some logit may be NaN or infinite: the sum of
/// all logits is not finite. (A finite sum that overflows also sets it; [`check_on_host`] decides.)
pub fn nonfinite_flag(logits: &Tensor) -> Result<Tensor> {
    let l = match logits.dtype() {
        DType::F16 | DType::BF16 => logits.to_dtype(DType::F32)?,
        _ => logits.clone(),
    };
    let s = l.detach().sum_all()?; // ()
    let z = (s * 0.0)?; // 0 when finite, NaN otherwise
    z.ne(&z)?.to_dtype(DType::U32)?.reshape(1) // (1,)
}

/// Stops on the first non-finite entry of host rows (T, E), row-major order.
pub fn check_rows(rows: &[Vec<f64>], step: u64, layer: u32) -> Result<()> {
    for (t, row) in rows.iter().enumerate() {
        if let Some(e) = row.iter().position(|v| !v.is_finite()) {
            candle_core::bail!(
                "non-finite router logit {} at step {step}, layer {layer}, token {t}, expert {e}: training diverged",
                row[e]
            );
        }
    }
    Ok(())
}

/// Copies logits (T, E) to the host as f64 and stops on the first non-finite one. For the
/// reference paths, and for the fused path once [`nonfinite_flag`] is set.
pub fn checked_host_rows(logits: &Tensor, step: u64, layer: u32) -> Result<Vec<Vec<f64>>> {
    let rows = logits.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.to_vec2::<f64>()?; // f64 on the CPU (Metal has none)
    check_rows(&rows, step, layer)?;
    Ok(rows)
}

/// [`checked_host_rows`] without keeping the copy.
pub fn check_on_host(logits: &Tensor, step: u64, layer: u32) -> Result<()> {
    checked_host_rows(logits, step, layer).map(|_| ())
}
