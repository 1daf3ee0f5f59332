//! The custom ops on CUDA against the CPU, then timed (the fused layer ops in `layers.rs`): built
//! by scripts/gpu_check.sh (`--features cuda`) and run on the GPU machine.
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
mod layers;

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

    pub fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
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
            println!(
                "shape {shape:?} p {p}: forward mismatches {fwd_mis}, backward mismatches {bwd_mis}: {}",
                if pass { "ok" } else { "FAIL" }
            );
        }
        let d = PhiloxDropout { p: 0.2, seed: 1, site: 2, hi: 3 };
        let x = Tensor::randn(0f32, 1.0, (64, 6, 256, 256), gpu)?;
        let t_op = batch_ms(gpu, 20, || philox_dropout(&x, &d).map(|_| ()))?;
        let t_ref = batch_ms(gpu, 3, || dropout_reference(&x, &d).map(|_| ()))?;
        println!(
            "dropout of (64, 6, 256, 256) f32 on the GPU: op {t_op:.3} ms, host-mask reference {t_ref:.1} ms ({:.0}x)",
            t_ref / t_op
        );
        Ok(ok)
    }

    pub fn median_ms(dev: &Device, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
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
            "| {:>6} | {:>4} | {:>3} | {:>2} | {:>13} | {:>13} | {:>10} | {:>10} | {:>10} | {:>10} |",
            "T", "E", "K", "m", "cand mismatch", "sel mismatch", "y relerr", "saved y", "bwd relerr", "dx relerr"
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
            // the y the select op saves (gumbel_route's path), each device's own
            let yr_err = rel_err(&gumbel_route(&xg, &p, true)?.y, &gumbel_route(&xc, &p, true)?.y)?;
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
            let pass = cand_mis == 0
                && sel_mis * 10_000 <= t
                && y_err < 1e-5
                && yr_err < 1e-5
                && b_err < 1e-5
                && dx_err < 1e-4;
            ok &= pass;
            println!(
                "| {t:>6} | {e:>4} | {k:>3} | {m:>2} | {cand_mis:>13} | {sel_mis:>13} | {y_err:>10.2e} | {yr_err:>10.2e} | {b_err:>10.2e} | {dx_err:>10.2e} | {}",
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
        // The router forward on the device as gumbel_route runs it (select saving y, weights
        // copying it, the straight-through op), without the host copy of the indices.
        let dev_f = batch_ms(&gpu, 200, || {
            let cs = gumbel_moe::ops::gumbel_router::gumbel_select_saving_y(&x, &p)?;
            let y = gumbel_weights(&x, &cs, &p)?;
            gumbel_moe::ops::straight_through(&y, &cs, k, m).map(|_| ())
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
        ok &= check_dispatch(&gpu, &cpu)?;
        ok &= check_balance_stats(&gpu, &cpu)?;
        ok &= super::layers::check(&gpu, &cpu)?;
        println!("\nRESULT: {}", if ok { "PASS" } else { "FAIL" });
        if !ok {
            std::process::exit(1);
        }
        Ok(())
    }

    /// The balance-statistics op (ops::balance_stats and its backward op BalanceStatsBwd): CUDA vs
    /// CPU (f identical, P and dlogits to 1e-5, a second GPU run bit-identical), then the balance
    /// loss as MoeLayer computes it, fused vs reference (device indices), timed on the GPU.
    /// Returns whether every check passed.
    pub fn check_balance_stats(gpu: &Device, cpu: &Device) -> Result<bool> {
        use gumbel_moe::moe::losses::{load_balance, load_balance_fused};
        use gumbel_moe::nn::ops::softmax;
        use gumbel_moe::ops::{balance_stats, BalanceStatsBwd};
        let bits = |x: &Tensor| -> Result<Vec<u32>> {
            Ok(x.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())
        };
        let mut ok = true;
        println!("\n== balance stats: CUDA vs CPU (f32), pass: f identical, rel err <= 1e-5, GPU reruns identical ==");
        println!(
            "| {:>6} | {:>4} | {:>2} | {:>7} | {:>10} | {:>10} | {:>6} |",
            "T", "E", "m", "f same", "P relerr", "bwd relerr", "rerun"
        );
        for &(t, e, m) in &[(1usize, 8usize, 1usize), (4096, 37, 2), (65_536, 64, 1), (2048, 256, 4)] {
            let xc = Tensor::randn(0f32, 2.0, (t, e), cpu)?;
            let ic = Tensor::rand(0f32, e as f32, (t, m), cpu)?.clamp(0f32, (e - 1) as f32)?.to_dtype(DType::U32)?;
            let (xg, ig) = (xc.to_device(gpu)?, ic.to_device(gpu)?);
            let (sc, sg) = (balance_stats(&xc, &ic)?, balance_stats(&xg, &ig)?); // (2, E)
            let f_same = bits(&sc.get(0)?)? == bits(&sg.get(0)?)?;
            let p_err = rel_err(&sg.get(1)?, &sc.get(1)?)?;
            let gr = Tensor::randn(0f32, 1.0, (2, e), cpu)?;
            let bc = xc.apply_op2_no_bwd(&gr, &BalanceStatsBwd)?;
            let bg = xg.apply_op2_no_bwd(&gr.to_device(gpu)?, &BalanceStatsBwd)?;
            let b_err = rel_err(&bg, &bc)?;
            let rerun = bits(&balance_stats(&xg, &ig)?)? == bits(&sg)?
                && bits(&xg.apply_op2_no_bwd(&gr.to_device(gpu)?, &BalanceStatsBwd)?)? == bits(&bg)?;
            let pass = f_same && p_err <= 1e-5 && b_err <= 1e-5 && rerun;
            ok &= pass;
            println!(
                "| {t:>6} | {e:>4} | {m:>2} | {f_same:>7} | {p_err:>10.2e} | {b_err:>10.2e} | {rerun:>6} | {}",
                if pass { "ok" } else { "FAIL" }
            );
        }

        let (t, e, m, iters) = (65_536usize, 64usize, 1usize, 50usize);
        let x = Tensor::randn(0f32, 2.0, (t, e), gpu)?;
        let xv = Var::from_tensor(&x)?;
        let host: Vec<u32> = Tensor::rand(0f32, e as f32, (t * m,), cpu)?
            .clamp(0f32, (e - 1) as f32)?
            .to_dtype(DType::U32)?
            .to_vec1()?;
        // The loss as MoeLayer computes it, from the router's device indices.
        let idx = Tensor::new(host.as_slice(), gpu)?.reshape((t, m))?; // (T, m) u32
        let fused = |x: &Tensor| -> Result<Tensor> { load_balance_fused(x, &idx) };
        let reference = |x: &Tensor| -> Result<Tensor> { load_balance(&softmax(x)?, &idx) };
        let e_loss = rel_err(&fused(&x)?, &reference(&x)?)?;
        let t_rf = median_ms(gpu, iters, || reference(&x).map(|_| ()))?;
        let t_ff = median_ms(gpu, iters, || fused(&x).map(|_| ()))?;
        let t_rb = median_ms(gpu, iters, || reference(xv.as_tensor())?.backward().map(|_| ()))?;
        let t_fb = median_ms(gpu, iters, || fused(xv.as_tensor())?.backward().map(|_| ()))?;
        let pass = e_loss <= 1e-5;
        ok &= pass;
        println!(
            "\n== balance loss timing: T={t} E={e} m={m} f32, median of {iters} (fused vs reference loss rel err {e_loss:.2e} {}) ==",
            if pass { "ok" } else { "FAIL" }
        );
        println!("| {:<18} | {:>13} | {:>10} | {:>7} |", "path", "reference ms", "fused ms", "ratio");
        for (name, a, b) in [("forward", t_rf, t_ff), ("forward+backward", t_rb, t_fb)] {
            println!("| {name:<18} | {a:>13.3} | {b:>10.3} | {:>6.1}x |", a / b);
        }
        Ok(ok)
    }

    /// MoE dispatch / combine ops (expert_sort, gather_rows, combine and their backward ops): CUDA
    /// vs CPU, then the fused dispatch + combine against the reference (host plan, index_select,
    /// index_add) on the GPU, with a cheap per-expert "expert" (a learned per-channel scale) so the
    /// timing is the dispatch's. Returns whether every check passed.
    pub fn check_dispatch(gpu: &Device, cpu: &Device) -> Result<bool> {
        use gumbel_moe::moe::dispatch::{capacity, plan};
        use gumbel_moe::ops::{
            combine, expert_sort, gather_rows, split_rows, CombineBwdOut, CombineBwdW, GatherRowsBwd,
        };
        // (T, m) expert ids, distinct per token, skewed to low experts (an LCG: no extra deps).
        fn indices(t: usize, m: usize, e: usize, seed: u64) -> Vec<u32> {
            let mut st = seed;
            let mut next = move || {
                st = st.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((st >> 11) as f64) / (1u64 << 53) as f64
            };
            let mut v = Vec::with_capacity(t * m);
            for _ in 0..t {
                let start = v.len();
                while v.len() < start + m {
                    let u = next();
                    let x = ((u * u * e as f64) as u32).min(e as u32 - 1);
                    if !v[start..].contains(&x) {
                        v.push(x);
                    }
                }
            }
            v
        }
        let mut ok = true;
        println!("\n== dispatch / combine: CUDA vs CPU (f32), pass: sort identical, rel err <= 1e-5 ==");
        println!(
            "| {:>6} | {:>3} | {:>2} | {:>4} | {:>4} | {:>7} | {:>9} | {:>9} | {:>9} | {:>9} | {:>9} |",
            "T", "E", "m", "C", "cf", "sort", "gather", "gather bw", "combine", "d_out", "d_w"
        );
        let shapes = [
            (1usize, 8usize, 1usize, 16usize, 0.0),
            (4096, 37, 2, 128, 0.0),
            (65_536, 64, 1, 384, 1.25),
            (65_536, 64, 1, 384, 0.0),
        ];
        for &(t, e, m, c, cf) in &shapes {
            let idx = indices(t, m, e, t as u64 * 31 + e as u64);
            let cap = capacity(cf, t * m, e);
            let ic = Tensor::from_vec(idx, (t, m), cpu)?;
            let (oc, og) = (expert_sort(&ic, e, cap)?, expert_sort(&ic.to_device(gpu)?, e, cap)?);
            let sort_same = oc.order.to_vec1::<u32>()? == og.order.to_vec1::<u32>()?;
            let n = oc.n();
            let x = Tensor::randn(0f32, 1.0, (t, c), cpu)?;
            let w = Tensor::randn(0f32, 1.0, (t, m), cpu)?;
            let out = Tensor::randn(0f32, 1.0, (n, c), cpu)?;
            let dy = Tensor::randn(0f32, 1.0, (t, c), cpu)?;
            let dxs = Tensor::randn(0f32, 1.0, (n, c), cpu)?;
            let g = |v: &Tensor| v.to_device(gpu);
            let (d, nn) = (oc.dims, n);
            let e_g = rel_err(&gather_rows(&g(&x)?, &og)?, &gather_rows(&x, &oc)?)?;
            let bw = GatherRowsBwd { dims: d, n: nn };
            let e_gb = rel_err(&g(&dxs)?.apply_op2_no_bwd(&og.order, &bw)?, &dxs.apply_op2_no_bwd(&oc.order, &bw)?)?;
            let e_c = rel_err(&combine(&g(&out)?, &g(&w)?, &og)?, &combine(&out, &w, &oc)?)?;
            let bo = CombineBwdOut { dims: d, n: nn };
            let e_do = rel_err(
                &g(&dy)?.apply_op3_no_bwd(&g(&w)?, &og.order, &bo)?,
                &dy.apply_op3_no_bwd(&w, &oc.order, &bo)?,
            )?;
            let bw2 = CombineBwdW { dims: d, n: nn };
            let e_dw = rel_err(
                &g(&out)?.apply_op3_no_bwd(&g(&dy)?, &og.order, &bw2)?,
                &out.apply_op3_no_bwd(&dy, &oc.order, &bw2)?,
            )?;
            let pass = sort_same && [e_g, e_gb, e_c, e_do, e_dw].iter().all(|&v| v <= 1e-5);
            ok &= pass;
            println!(
                "| {t:>6} | {e:>3} | {m:>2} | {c:>4} | {cf:>4} | {:>7} | {e_g:>9.2e} | {e_gb:>9.2e} | {e_c:>9.2e} | {e_do:>9.2e} | {e_dw:>9.2e} | {}",
                if sort_same { "same" } else { "DIFFER" },
                if pass { "ok" } else { "FAIL" }
            );
        }

        // Timing: fused vs reference dispatch + combine on the GPU.
        let iters = 20;
        for &(t, e, m, c, cf) in &shapes[2..] {
            let idx = indices(t, m, e, 7);
            let cap = capacity(cf, t * m, e);
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (t, c), gpu)?)?;
            let w = Var::from_tensor(&Tensor::rand(0f32, 1.0, (t, m), gpu)?)?;
            let scales: Vec<Var> =
                (0..e).map(|_| Var::from_tensor(&Tensor::rand(0.5f32, 1.5, (1, c), gpu)?)).collect::<Result<_>>()?;
            let r = Tensor::randn(0f32, 1.0, (t, c), gpu)?;
            let fused = || -> Result<Tensor> {
                let it = Tensor::from_slice(&idx, (t, m), gpu)?;
                let o = expert_sort(&it, e, cap)?;
                let xs = gather_rows(x.as_tensor(), &o)?;
                let mut outs = Vec::with_capacity(e);
                for (s, rows) in scales.iter().zip(split_rows(&xs, &o.offsets)?) {
                    if let Some(rows) = rows {
                        outs.push(rows.broadcast_mul(s.as_tensor())?);
                    }
                }
                combine(&Tensor::cat(&outs, 0)?, w.as_tensor(), &o)
            };
            let reference = || -> Result<Tensor> {
                let p = plan(&idx, t, m, e, cap);
                let w_flat = w.as_tensor().flatten_all()?;
                let (mut outs, mut rows) = (Vec::with_capacity(e), Vec::with_capacity(t * m));
                for (ex, s) in scales.iter().enumerate() {
                    if p.tokens[ex].is_empty() {
                        continue;
                    }
                    let tok = Tensor::new(p.tokens[ex].as_slice(), gpu)?;
                    let sl = Tensor::new(p.slots[ex].as_slice(), gpu)?;
                    let we = w_flat.index_select(&sl, 0)?.unsqueeze(1)?;
                    outs.push(x.as_tensor().index_select(&tok, 0)?.broadcast_mul(s.as_tensor())?.broadcast_mul(&we)?);
                    rows.extend_from_slice(&p.tokens[ex]);
                }
                let rows = Tensor::new(rows.as_slice(), gpu)?;
                x.as_tensor().zeros_like()?.index_add(&rows, &Tensor::cat(&outs, 0)?, 0)
            };
            let e_y = rel_err(&fused()?, &reference()?)?;
            let t_ff = median_ms(gpu, iters, || fused().map(|_| ()))?;
            let t_rf = median_ms(gpu, iters, || reference().map(|_| ()))?;
            let t_fb = median_ms(gpu, iters, || (fused()? * &r)?.sum_all()?.backward().map(|_| ()))?;
            let t_rb = median_ms(gpu, iters, || (reference()? * &r)?.sum_all()?.backward().map(|_| ()))?;
            let pass = e_y <= 1e-5;
            ok &= pass;
            println!("\n== dispatch + combine timing: T={t} E={e} m={m} C={c} cf={cf}, median of {iters} (fused vs reference y rel err {e_y:.2e} {}) ==", if pass { "ok" } else { "FAIL" });
            println!("| {:<18} | {:>13} | {:>10} | {:>7} |", "path", "reference ms", "fused ms", "ratio");
            for (name, a, b) in [("forward", t_rf, t_ff), ("forward+backward", t_rb, t_fb)] {
                println!("| {name:<18} | {a:>13.3} | {b:>10.3} | {:>6.1}x |", a / b);
            }
        }
        Ok(ok)
    }
}
