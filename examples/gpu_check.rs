//! The Gumbel router ops on CUDA against the CPU, then timed: built by scripts/gpu_check.sh
//! (`--features cuda`) and run on the GPU machine.
//!
//! For each shape and op: CUDA vs CPU candidates and selections (identical, up to near-exact ties
//! of two perturbed values, where the GPU's `logf` may round differently from the host libm), max
//! relative error of y and dlogits, then the median time of each op and of the whole router
//! forward / forward+backward, fused vs the plain-tensor reference on the same GPU.
//! Exit status 1 when a check fails. Without the `cuda` feature it only says so.

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("gpu_check: built without the `cuda` feature; run scripts/gpu_check.sh");
}

#[cfg(feature = "cuda")]
fn main() -> candle_core::Result<()> {
    gpu::main()
}

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::{DType, Device, Result, Tensor, Var};
    use gumbel_moe::moe::routers::gumbel::reference_route;
    use gumbel_moe::ops::{gumbel_route, gumbel_select, gumbel_weights, GumbelParams, GumbelWeightsBwd};
    use std::time::Instant;

    /// The reference router after its gate matmul: (indices, weights, y).
    fn reference(logits: &Tensor, p: &GumbelParams) -> Result<(Vec<u32>, Tensor, Tensor)> {
        let host = logits.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let (indices, _, w, y) = reference_route(logits, &host, p, true)?;
        Ok((indices, w, y))
    }

    fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
        let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
        let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
        let d = a.sub(&b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
        let s = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?.max(1e-30);
        Ok(d / s)
    }

    /// Mean time of `iters` back-to-back launches (one sync at the end): kernel time without the
    /// per-call host round trip, in ms.
    fn batch_ms(dev: &Device, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        f()?;
        dev.synchronize()?;
        let t0 = Instant::now();
        for _ in 0..iters {
            f()?;
        }
        dev.synchronize()?;
        Ok(t0.elapsed().as_secs_f64() * 1e3 / iters as f64)
    }

    /// The Philox dropout op: CUDA vs CPU bit for bit (forward and backward), then timed against
    /// the host-mask reference on the GPU.
    pub fn check_dropout(gpu: &Device, cpu: &Device) -> Result<bool> {
        use gumbel_moe::ops::{dropout_reference, philox_dropout, PhiloxDropout};
        println!("\n== dropout: CUDA vs CPU (f32, bit-exact expected) ==");
        let mut ok = true;
        for (shape, p) in [(vec![1usize], 0.5), (vec![7, 13], 0.2), (vec![64, 6, 256, 256], 0.2)] {
            let d = PhiloxDropout { p, seed: 0xabc_def0_1234, site: 5, hi: PhiloxDropout::hi(77, 1) };
            let xc = Tensor::randn(0f32, 1.0, shape.as_slice(), cpu)?;
            let xg = xc.to_device(gpu)?;
            let yc = philox_dropout(&xc, &d)?.flatten_all()?.to_vec1::<f32>()?;
            let yg = philox_dropout(&xg, &d)?.flatten_all()?.to_vec1::<f32>()?;
            let fwd_mis = yc.iter().zip(&yg).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
            let grad = |x: &Tensor| -> Result<Vec<f32>> {
                let v = Var::from_tensor(x)?;
                let loss = (philox_dropout(v.as_tensor(), &d)? * x)?.sum_all()?;
                loss.backward()?.get(v.as_tensor()).expect("grad").flatten_all()?.to_vec1::<f32>()
            };
            let (gc, gg) = (grad(&xc)?, grad(&xg)?);
            let bwd_mis = gc.iter().zip(&gg).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
            let pass = fwd_mis == 0 && bwd_mis == 0;
            ok &= pass;
            println!("shape {shape:?} p {p}: forward mismatches {fwd_mis}, backward mismatches {bwd_mis}: {}",
                if pass { "ok" } else { "FAIL" });
        }
        let d = PhiloxDropout { p: 0.2, seed: 1, site: 2, hi: 3 };
        let x = Tensor::randn(0f32, 1.0, (64, 6, 256, 256), gpu)?;
        let t_op = batch_ms(gpu, 20, || philox_dropout(&x, &d).map(|_| ()))?;
        let t_ref = batch_ms(gpu, 3, || dropout_reference(&x, &d).map(|_| ()))?;
        println!("dropout of (64, 6, 256, 256) f32 on the GPU: op {t_op:.3} ms, host-mask reference {t_ref:.1} ms ({:.0}x)", t_ref / t_op);
        Ok(ok)
    }

    fn median_ms(dev: &Device, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        f()?;
        dev.synchronize()?;
        let mut v = Vec::with_capacity(iters);
        for _ in 0..iters {
            let t0 = Instant::now();
            f()?;
            dev.synchronize()?;
            v.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        v.sort_by(|a, b| a.total_cmp(b));
        Ok(v[v.len() / 2])
    }

    pub fn main() -> Result<()> {
        let gpu = Device::new_cuda(0)?;
        let cpu = Device::Cpu;
        let mut ok = true;
        println!("== correctness: CUDA vs CPU (f32) ==");
        println!(
            "| {:>6} | {:>4} | {:>3} | {:>2} | {:>13} | {:>13} | {:>10} | {:>10} | {:>10} |",
            "T", "E", "K", "m", "cand mismatch", "sel mismatch", "y relerr", "bwd relerr", "dx relerr"
        );
        for &(t, e, k, m) in &[
            (1usize, 8usize, 1usize, 1usize),
            (4096, 37, 5, 2),
            (1000, 100, 16, 2),
            (65_536, 64, 8, 1),
            (2048, 256, 32, 4),
        ] {
            let p =
                GumbelParams { k, m, tau: 0.7, seed: 0xfeed_beef_1234, step: 9, layer: 2, token_base: 77, noisy: true };
            let xc = Tensor::randn(0f32, 1.0, (t, e), &cpu)?;
            let xg = xc.to_device(&gpu)?;
            // select
            let sc = gumbel_select(&xc, &p)?.to_vec2::<u32>()?;
            let sg = gumbel_select(&xg, &p)?.to_vec2::<u32>()?;
            let cand_mis = sc.iter().zip(&sg).filter(|(a, b)| a[..k] != b[..k]).count();
            let sel_mis = sc.iter().zip(&sg).filter(|(a, b)| a[k..] != b[k..]).count();
            // weights on the same (CPU) candidates
            let cs = Tensor::new(sc.clone(), &cpu)?;
            let yc = gumbel_weights(&xc, &cs, &p)?;
            let yg = gumbel_weights(&xg, &cs.to_device(&gpu)?, &p)?;
            let y_err = rel_err(&yg, &yc)?;
            // the backward op on the same inputs
            let dy = Tensor::randn(0f32, 1.0, (t, k), &cpu)?;
            let op = GumbelWeightsBwd { p, e };
            let bc = yc.apply_op3_no_bwd(&dy, &cs, &op)?;
            let bg = yc.to_device(&gpu)?.apply_op3_no_bwd(&dy.to_device(&gpu)?, &cs.to_device(&gpu)?, &op)?;
            let b_err = rel_err(&bg, &bc)?;
            // the whole router, forward and backward through autograd
            let r = Tensor::randn(0f32, 1.0, (t, m), &cpu)?;
            let grad = |x: &Tensor, r: &Tensor| -> Result<Tensor> {
                let v = Var::from_tensor(x)?;
                let f = gumbel_route(v.as_tensor(), &p, true)?;
                let loss = ((f.weights * r)?.sum_all()? + f.y.sqr()?.sum_all()?)?;
                Ok(loss.backward()?.get(v.as_tensor()).expect("grad").clone())
            };
            let dx_err = rel_err(&grad(&xg, &r.to_device(&gpu)?)?, &grad(&xc, &r)?)?;
            // A mismatch in the selection is only tolerated at near ties (<= 1e-4 of the rows).
            let pass = cand_mis == 0 && sel_mis * 10_000 <= t && y_err < 1e-5 && b_err < 1e-5 && dx_err < 1e-4;
            ok &= pass;
            println!(
                "| {t:>6} | {e:>4} | {k:>3} | {m:>2} | {cand_mis:>13} | {sel_mis:>13} | {y_err:>10.2e} | {b_err:>10.2e} | {dx_err:>10.2e} | {}",
                if pass { "ok" } else { "FAIL" }
            );
        }

        let (t, e, k, m) = (65_536usize, 64usize, 8usize, 1usize);
        let iters = 50;
        let p = GumbelParams { k, m, tau: 1.0, seed: 42, step: 3, layer: 1, token_base: 0, noisy: true };
        println!("\n== timing on the GPU: T={t} E={e} K={k} m={m} f32, median of {iters} ==");
        let x = Tensor::randn(0f32, 1.0, (t, e), &gpu)?;
        let xv = Var::from_tensor(&x)?;
        let r = Tensor::randn(0f32, 1.0, (t, m), &gpu)?;
        let s = Tensor::randn(0f32, 1.0, (t, k), &gpu)?;
        let cs = gumbel_select(&x, &p)?;
        let y = gumbel_weights(&x, &cs, &p)?;
        let op = GumbelWeightsBwd { p, e };
        let us = |ms: f64| ms * 1e3;
        let t_sel = batch_ms(&gpu, 200, || gumbel_select(&x, &p).map(|_| ()))?;
        let t_w = batch_ms(&gpu, 200, || gumbel_weights(&x, &cs, &p).map(|_| ()))?;
        let t_b = batch_ms(&gpu, 200, || y.apply_op3_no_bwd(&s, &cs, &op).map(|_| ()))?;
        println!(
            "ops, mean of 200 back-to-back launches: select {:.1} us, weights {:.1} us, weights_bwd {:.1} us",
            us(t_sel),
            us(t_w),
            us(t_b)
        );
        // The router forward on the device (select + weights + straight-through), no host copy.
        let dev_f = batch_ms(&gpu, 200, || {
            let cs = gumbel_select(&x, &p)?;
            let y = gumbel_weights(&x, &cs, &p)?;
            let sel = cs.narrow(1, k, m)?.contiguous()?;
            let ys = y.gather(&sel, 1)?;
            (ys.sub(&ys.detach())? + 1.0).map(|_| ())
        })?;
        println!("router forward on the device (select, weights, straight-through; no host copy): {:.1} us", us(dev_f));
        let ref_f = median_ms(&gpu, 5, || reference(&x, &p).map(|_| ()))?;
        let fus_f = median_ms(&gpu, iters, || gumbel_route(&x, &p, true).map(|_| ()))?;
        let ref_fb = median_ms(&gpu, 5, || {
            let (_, w, y) = reference(xv.as_tensor(), &p)?;
            ((w * &r)?.sum_all()? + (y * &s)?.sum_all()?)?.backward().map(|_| ())
        })?;
        let fus_fb = median_ms(&gpu, iters, || {
            let f = gumbel_route(xv.as_tensor(), &p, true)?;
            ((f.weights * &r)?.sum_all()? + (f.y * &s)?.sum_all()?)?.backward().map(|_| ())
        })?;
        println!("| {:<18} | {:>13} | {:>10} | {:>7} |", "router path", "reference ms", "fused ms", "ratio");
        println!("|{:-<20}|{:->15}|{:->12}|{:->9}|", "", "", "", "");
        for (name, a, b) in [("forward", ref_f, fus_f), ("forward+backward", ref_fb, fus_fb)] {
            println!("| {name:<18} | {a:>13.3} | {b:>10.3} | {:>6.1}x |", a / b);
        }
        println!("(median of synchronised calls; the fused forward includes the device-to-host copy of the indices)");
        ok &= check_dropout(&gpu, &cpu)?;
        println!("\nRESULT: {}", if ok { "PASS" } else { "FAIL" });
        if !ok {
            std::process::exit(1);
        }
        Ok(())
    }
}
