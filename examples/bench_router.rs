//! Fused Gumbel router ops vs the plain-tensor reference router, on the CPU.
//!
//!     cargo run --release --example bench_router -- [T] [E] [K] [m] [iters]
//!
//! Defaults: T = 65,536 tokens, E = 64 experts, K = 8 candidates, m = 1, f32 (the CPU goal:
//! fused forward <= 5 ms). "forward" is the router from logits to (host indices, weights); "fwd+bwd"
//! adds the backward of sum(weights * r + y * s) to the logits. Times are medians over `iters` runs.

use candle_core::{DType, Device, Result, Tensor, Var};
use gumbel_moe::moe::routers::gumbel::reference_route;
use gumbel_moe::ops::{gumbel_route, gumbel_select, gumbel_weights, GumbelParams};
use std::time::Instant;

/// The reference router after its gate matmul: (indices, weights, y).
fn reference(logits: &Tensor, p: &GumbelParams) -> Result<(Vec<u32>, Tensor, Tensor)> {
    let host = logits.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let (indices, _, w, y) = reference_route(logits, &host, p, true)?;
    Ok((indices, w, y))
}

fn median_ms(iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?; // warm-up
    let mut v = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t0 = Instant::now();
        f()?;
        v.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Ok(v[v.len() / 2])
}

fn main() -> Result<()> {
    let a: Vec<usize> = std::env::args().skip(1).map(|s| s.parse().expect("numeric argument")).collect();
    let arg = |i: usize, d: usize| a.get(i).copied().unwrap_or(d);
    let (t, e, k, m, iters) = (arg(0, 65_536), arg(1, 64), arg(2, 8), arg(3, 1), arg(4, 10));
    let dev = Device::Cpu;
    let p = GumbelParams { k, m, tau: 1.0, seed: 42, step: 3, layer: 1, token_base: 0, noisy: true };
    let x = Tensor::randn(0f32, 1.0, (t, e), &dev)?;
    let r = Tensor::randn(0f32, 1.0, (t, m), &dev)?;
    let s = Tensor::randn(0f32, 1.0, (t, k), &dev)?;
    let xv = Var::from_tensor(&x)?;

    // Same indices and weights before timing anything.
    let (ri, rw, ry) = reference(&x, &p)?;
    let f = gumbel_route(&x, &p, true)?;
    let same = ri.iter().zip(&f.indices).filter(|(a, b)| a == b).count();
    let dy = ry.sub(&f.y)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let dw = rw.sub(&f.weights)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;

    let ref_fwd = median_ms(iters, || reference(&x, &p).map(|_| ()))?;
    let fused_fwd = median_ms(iters, || gumbel_route(&x, &p, true).map(|_| ()))?;
    let ref_fb = median_ms(iters, || {
        let (_, w, y) = reference(xv.as_tensor(), &p)?;
        ((w * &r)?.sum_all()? + (y * &s)?.sum_all()?)?.backward().map(|_| ())
    })?;
    let fused_fb = median_ms(iters, || {
        let f = gumbel_route(xv.as_tensor(), &p, true)?;
        ((f.weights * &r)?.sum_all()? + (f.y * &s)?.sum_all()?)?.backward().map(|_| ())
    })?;
    // The ops on their own (no host copy of the indices, no straight-through).
    let cs = gumbel_select(&x, &p)?;
    let op_select = median_ms(iters, || gumbel_select(&x, &p).map(|_| ()))?;
    let op_weights = median_ms(iters, || gumbel_weights(&x, &cs, &p).map(|_| ()))?;
    let op_bwd = median_ms(iters, || {
        let y = gumbel_weights(xv.as_tensor(), &cs, &p)?;
        (y * &s)?.sum_all()?.backward().map(|_| ())
    })?;

    println!(
        "gumbel router, CPU f32, T={t} E={e} K={k} m={m}, {} rayon threads, median of {iters}",
        rayon::current_num_threads()
    );
    println!("check: indices identical {same}/{}, max |dy| {dy:.2e}, max |dweights| {dw:.2e}", ri.len());
    println!("| {:<22} | {:>14} | {:>10} | {:>8} |", "path", "reference ms", "fused ms", "ratio");
    println!("|{:-<24}|{:->16}|{:->12}|{:->10}|", "", "", "", "");
    for (name, a, b) in [("forward", ref_fwd, fused_fwd), ("forward+backward", ref_fb, fused_fb)] {
        println!("| {name:<22} | {a:>14.2} | {b:>10.2} | {:>7.1}x |", a / b);
    }
    println!("fused ops alone: select {op_select:.2} ms, weights {op_weights:.2} ms, weights fwd+bwd {op_bwd:.2} ms");
    println!("goal: fused forward <= 5 ms on this CPU: {}", if fused_fwd <= 5.0 { "met" } else { "not met" });
    Ok(())
}
