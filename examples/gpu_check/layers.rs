//! The fused layer ops with GPU kernels (GELU, LayerNorm/RMSNorm, the causal softmax): CUDA vs
//! CPU forward and backward, then forward+backward timed against their plain-tensor twins on the
//! same GPU.

use super::gpu::{median_ms, rel_err};
use candle_core::{Device, Result, Tensor, Var};
use gumbel_moe::ops::{causal_softmax, causal_softmax_reference, gelu, gelu_reference, norm, norm_reference, NormOp};

type Op = dyn Fn(&[Tensor]) -> Result<Tensor>;

/// y and the gradients of sum(y * w) with respect to every input.
fn run(f: &Op, inputs: &[Tensor], w: &Tensor) -> Result<Vec<Tensor>> {
    let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts)?;
    let g = (&y * w)?.sum_all()?.backward()?;
    let mut out = vec![y];
    for t in &ts {
        out.push(g.get(t).expect("every input gets a gradient").clone());
    }
    Ok(out)
}

/// CUDA vs CPU for each op (output and every input gradient within 1e-5 relative), then timed.
pub fn check(gpu: &Device, cpu: &Device) -> Result<bool> {
    println!("\n== fused layer ops: CUDA vs CPU (f32, forward and every gradient) ==");
    let ln = NormOp { eps: 1e-5, rms: false };
    let rms = NormOp { eps: 1e-5, rms: true };
    let cases: Vec<(&str, Box<Op>, Box<Op>, Vec<Vec<usize>>)> = vec![
        ("gelu", Box::new(|t| gelu(&t[0])), Box::new(|t| gelu_reference(&t[0])), vec![vec![12, 256, 1536]]),
        (
            "layer_norm",
            Box::new(move |t| norm(&t[0], &t[1], Some(&t[2]), ln)),
            Box::new(move |t| norm_reference(&t[0], &t[1], Some(&t[2]), ln)),
            vec![vec![12, 256, 384], vec![384], vec![384]],
        ),
        (
            "rms_norm",
            Box::new(move |t| norm(&t[0], &t[1], None, rms)),
            Box::new(move |t| norm_reference(&t[0], &t[1], None, rms)),
            vec![vec![12, 256, 384], vec![384]],
        ),
        (
            "causal_softmax",
            Box::new(|t| causal_softmax(&t[0], 0.125)),
            Box::new(|t| causal_softmax_reference(&t[0], 0.125)),
            vec![vec![12, 6, 256, 256]],
        ),
    ];
    let mut ok = true;
    println!(
        "| {:<15} | {:>12} | {:>12} | {:>10} | {:>10} | {:>6} |",
        "op", "max rel err", "", "twin ms", "op ms", "ratio"
    );
    for (name, op, twin, shapes) in &cases {
        let inputs: Vec<Tensor> =
            shapes.iter().map(|s| Tensor::randn(0f32, 1.0, s.as_slice(), cpu)).collect::<Result<_>>()?;
        let w = Tensor::randn(0f32, 1.0, shapes[0].as_slice(), cpu)?;
        let on_gpu: Vec<Tensor> = inputs.iter().map(|t| t.to_device(gpu)).collect::<Result<_>>()?;
        let wg = w.to_device(gpu)?;
        let (want, got) = (run(op.as_ref(), &inputs, &w)?, run(op.as_ref(), &on_gpu, &wg)?);
        let mut err = 0f64;
        for (a, b) in got.iter().zip(&want) {
            err = err.max(rel_err(a, b)?);
        }
        let pass = err <= 1e-5;
        ok &= pass;
        let t_twin = median_ms(gpu, 20, || run(twin.as_ref(), &on_gpu, &wg).map(|_| ()))?;
        let t_op = median_ms(gpu, 20, || run(op.as_ref(), &on_gpu, &wg).map(|_| ()))?;
        println!(
            "| {name:<15} | {err:>12.2e} | {:>12} | {t_twin:>10.3} | {t_op:>10.3} | {:>5.1}x |",
            if pass { "ok" } else { "FAIL" },
            t_twin / t_op
        );
    }
    println!("(forward+backward of sum(y * w), median of synchronised calls, shapes of the GPU config)");
    Ok(ok)
}
