//! Finite-difference checks shared by the tests: the five-point central difference, a check of
//! named parameters' gradients against it, and a check of a 2-D point's autograd gradient.
#![allow(dead_code)]

use super::host::{assert_close, flat, scalar};
use candle_core::{Device, Tensor};
use gumbel_moe::nn::Params;

/// d f / d x at 0 by the five-point central difference of f(x + delta) with step `h`.
pub fn five_point(mut f: impl FnMut(f64) -> f64, h: f64) -> f64 {
    (-f(2.0 * h) + 8.0 * f(h) - 8.0 * f(-h) + f(-2.0 * h)) / (12.0 * h)
}

/// Step of the router and MoE-layer finite differences. The five-point central stencil has
/// truncation error h^4 f^(5) / 30 (~1e-18 here) and rounding error ~1.5 / h ulps of the loss
/// (~1e-11 relative), so a 1e-6 relative tolerance leaves a wide margin; the two-point stencil with
/// h = 1e-6 has ~1e-8 absolute rounding noise, too close to the tolerance for the small gradients.
pub const H: f64 = 1e-4;

/// d f / d x at 0 by the five-point central difference of f(x + delta), step [`H`].
pub fn central_diff(f: impl FnMut(f64) -> f64) -> f64 {
    five_point(f, H)
}

/// Step of [`fd_check`].
const FD_CHECK_H: f64 = 1e-5;

/// Central-difference check of d loss / d (elements of parameter `name`) against backward.
pub fn fd_check(params: &Params, loss: &dyn Fn() -> Tensor, name: &str, elems: &[usize], rtol: f64, label: &str) {
    let var = params.get(name).unwrap_or_else(|| panic!("{label}: no parameter {name}"));
    let grads = loss().backward().unwrap();
    let grad = flat(grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{label}: no gradient for {name}")));
    let base = flat(var.as_tensor());
    let at = |i: usize, delta: f64| {
        let mut v = base.clone();
        v[i] += delta;
        var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap()).unwrap();
        scalar(&loss())
    };
    let mut largest = 0f64;
    for &i in elems {
        let fd = five_point(|d| at(i, d), FD_CHECK_H);
        largest = largest.max(fd.abs());
        assert_close(grad[i], fd, rtol, 1e-9, &format!("{label}: d loss / d {name}[{i}] vs central difference"));
    }
    var.set(&Tensor::from_vec(base, var.shape(), &Device::Cpu).unwrap()).unwrap();
    assert!(largest > 1e-4, "{label}: every checked gradient of {name} is ~0, the check is vacuous");
}

/// Checks the autograd gradient of the scalar `f` at the 2-D f64 point `x0` against central
/// finite differences (step 1e-6): |fd - grad| < rtol * (1 + |fd|) for every element.
pub fn assert_grad_matches_fd(
    f: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
    x0: &Tensor,
    rtol: f64,
    what: &str,
) -> candle_core::Result<()> {
    let xv = candle_core::Var::from_tensor(x0)?;
    let grad = f(xv.as_tensor())?.backward()?.get(xv.as_tensor()).expect("grad").to_vec2::<f64>()?;
    let base = x0.to_vec2::<f64>()?;
    let h = 1e-6;
    for i in 0..base.len() {
        for j in 0..base[i].len() {
            let mut plus = base.clone();
            plus[i][j] += h;
            let mut minus = base.clone();
            minus[i][j] -= h;
            let fp = f(&Tensor::new(plus, x0.device())?)?.to_scalar::<f64>()?;
            let fm = f(&Tensor::new(minus, x0.device())?)?.to_scalar::<f64>()?;
            let fd = (fp - fm) / (2.0 * h);
            let err = (fd - grad[i][j]).abs();
            assert!(
                err < rtol * (1.0 + fd.abs()),
                "{what}d/dx[{i},{j}]: autograd {} vs finite difference {fd}",
                grad[i][j]
            );
        }
    }
    Ok(())
}
