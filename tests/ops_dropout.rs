//! The Philox dropout op against its plain-tensor twin, the old host-mask definition, a binomial
//! bound on the drop rate, and its gradient, on every device (`test_device!`; the f64 gradient
//! check on the CPU only).

use candle_core::{DType, Device, Result, Tensor, Var};
use gumbel_moe::ops::{dropout_reference, philox_dropout, PhiloxDropout};
use gumbel_moe::rng::{draw, u32_to_open_unit, Stream};

mod common;

fn key(p: f64) -> PhiloxDropout {
    PhiloxDropout { p, seed: 0x1234_5678_9abc, site: 7, hi: PhiloxDropout::hi(301, 2) }
}

fn op_equals_reference_and_the_float_definition_on(dev: &Device) -> Result<()> {
    // Sizes that are not multiples of 4 or of the rayon chunk, and rates at the edges.
    for (n, p) in [(1usize, 0.5), (7, 0.2), (70_001, 0.2), (33_333, 0.9), (1000, 1e-7)] {
        let d = key(p);
        let x = Tensor::randn(0f32, 1.0, n, dev)?;
        let a = philox_dropout(&x, &d)?.to_vec1::<f32>()?;
        let b = dropout_reference(&x, &d)?.to_vec1::<f32>()?;
        assert_eq!(a, b, "op vs reference, n = {n}, p = {p}");
        // The definition in floats: element i dropped iff u(word i % 4 of draw(i / 4)) < p.
        let xs = x.to_vec1::<f32>()?;
        let scale = (1.0 / (1.0 - p)) as f32;
        for (i, (&y, &xv)) in a.iter().zip(&xs).enumerate() {
            let w = draw(d.seed, Stream::Dropout, d.site, d.hi, (i / 4) as u32)[i % 4];
            let want = if (u32_to_open_unit(w) as f64) < p { 0.0 } else { xv * scale };
            assert_eq!(y, want, "element {i}, n = {n}, p = {p}");
        }
    }
    Ok(())
}

test_device!(
    op_equals_reference_and_the_float_definition_on,
    op_equals_reference_and_the_float_definition,
    op_equals_reference_and_the_float_definition_cuda,
    op_equals_reference_and_the_float_definition_metal
);

fn drop_rate_is_binomial_on(dev: &Device) -> Result<()> {
    let n = 400_000;
    for p in [0.1, 0.2, 0.5] {
        let x = Tensor::ones(n, DType::F32, dev)?;
        let y = philox_dropout(&x, &key(p))?.to_vec1::<f32>()?;
        let dropped = y.iter().filter(|&&v| v == 0.0).count() as f64;
        let sd = (n as f64 * p * (1.0 - p)).sqrt();
        assert!((dropped - n as f64 * p).abs() < 5.0 * sd, "p = {p}: {dropped} of {n} dropped");
        let kept = (1.0 / (1.0 - p)) as f32;
        assert!(y.iter().all(|&v| v == 0.0 || v == kept));
    }
    Ok(())
}

test_device!(drop_rate_is_binomial_on, drop_rate_is_binomial, drop_rate_is_binomial_cuda, drop_rate_is_binomial_metal);

fn gradient_is_the_same_mask_and_keys_differ_on(dev: &Device) -> Result<()> {
    let d = key(0.3);
    // The gradient in f64: CPU only, as the GPU kernels are f32 only (and Metal has no f64).
    if dev.is_cpu() {
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (3, 5, 11), dev)?)?;
        let g = Tensor::randn(0f64, 1.0, (3, 5, 11), dev)?;
        let loss = (philox_dropout(x.as_tensor(), &d)? * &g)?.sum_all()?;
        let grads = loss.backward()?;
        let dx = grads.get(&x).expect("dx").flatten_all()?.to_vec1::<f64>()?;
        // d/dx sum(mask * x * g) = mask * g, the mask read off the reference with x = 1.
        let mask = dropout_reference(&Tensor::ones((3, 5, 11), DType::F64, dev)?, &d)?;
        let want = (mask * &g)?.flatten_all()?.to_vec1::<f64>()?;
        assert_eq!(dx, want);
    }
    // Another step, micro-batch or site gives another mask.
    let ones = Tensor::ones(4096, DType::F32, dev)?;
    let base = philox_dropout(&ones, &d)?.to_vec1::<f32>()?;
    for other in [
        PhiloxDropout { hi: PhiloxDropout::hi(302, 2), ..d },
        PhiloxDropout { hi: PhiloxDropout::hi(301, 3), ..d },
        PhiloxDropout { site: 8, ..d },
        PhiloxDropout { seed: d.seed + 1, ..d },
    ] {
        assert_ne!(philox_dropout(&ones, &other)?.to_vec1::<f32>()?, base, "{other:?}");
    }
    Ok(())
}

test_device!(
    gradient_is_the_same_mask_and_keys_differ_on,
    gradient_is_the_same_mask_and_keys_differ,
    gradient_is_the_same_mask_and_keys_differ_cuda,
    gradient_is_the_same_mask_and_keys_differ_metal
);

fn bad_rate_and_strided_input_are_errors_on(dev: &Device) -> Result<()> {
    let x = Tensor::ones((4, 6), DType::F32, dev)?;
    let err = x.apply_op1(key(1.0)).unwrap_err().to_string();
    assert!(err.contains("p = 1"), "{err}");
    let err = x.t()?.apply_op1(key(0.5)).unwrap_err().to_string();
    assert!(err.contains("contiguous"), "{err}");
    Ok(())
}

test_device!(
    bad_rate_and_strided_input_are_errors_on,
    bad_rate_and_strided_input_are_errors,
    bad_rate_and_strided_input_are_errors_cuda,
    bad_rate_and_strided_input_are_errors_metal
);
