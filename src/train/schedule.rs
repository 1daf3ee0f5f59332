//! Schedules: nanoGPT's learning rate (linear warmup, cosine decay to min_lr) and the Gumbel
//! temperature of Jang et al. (tau = max(tau_min, tau0 * exp(-r * step))).

use crate::config::{RouterConfig, TrainConfig};

/// Learning rate at optimizer step `it` (0-based).
pub fn lr_at(t: &TrainConfig, it: usize) -> f64 {
    if it < t.warmup_iters {
        return t.lr * (it + 1) as f64 / (t.warmup_iters + 1) as f64;
    }
    if it > t.lr_decay_iters {
        return t.min_lr;
    }
    let span = (t.lr_decay_iters - t.warmup_iters).max(1) as f64;
    let ratio = (it - t.warmup_iters) as f64 / span;
    let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
    t.min_lr + coeff * (t.lr - t.min_lr)
}

/// Gumbel temperature at optimizer step `it`.
pub fn tau_at(r: &RouterConfig, it: usize) -> f64 {
    (r.tau0 * (-r.tau_decay * it as f64).exp()).max(r.tau_min)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn lr_warms_up_then_decays_to_min() {
        let c = Config::default().train;
        assert!((lr_at(&c, 0) - c.lr / (c.warmup_iters + 1) as f64).abs() < 1e-15);
        assert!((lr_at(&c, c.warmup_iters) - c.lr).abs() < 1e-12);
        assert!((lr_at(&c, c.lr_decay_iters) - c.min_lr).abs() < 1e-12);
        assert_eq!(lr_at(&c, c.lr_decay_iters + 10), c.min_lr);
        let mid = (c.warmup_iters + c.lr_decay_iters) / 2;
        assert!((lr_at(&c, mid) - (c.lr + c.min_lr) / 2.0).abs() < 1e-6);
    }

    #[test]
    fn tau_follows_exp_decay_with_floor() {
        let mut r = Config::default().model.router;
        r.tau0 = 2.0;
        r.tau_decay = 0.01;
        r.tau_min = 0.5;
        assert_eq!(tau_at(&r, 0), 2.0);
        assert!((tau_at(&r, 50) - 2.0 * (-0.5f64).exp()).abs() < 1e-12);
        assert_eq!(tau_at(&r, 100_000), 0.5);
    }
}
