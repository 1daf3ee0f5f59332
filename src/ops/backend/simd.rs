//! Element-wise CPU loops compiled for the widest vector unit the CPU has. The crate is built for
//! baseline x86-64 (SSE2, 4 f32 lanes); [`widest!`] compiles a loop body three times (AVX-512F,
//! AVX2 + FMA, baseline) and picks one at run time, as gemm picks its microkernels.
//!
//! The three builds give the same bits: Rust never contracts `a * b + c` into an FMA, and the
//! bodies it is used on are element-wise (no reordered sums), so only the lane count differs.
//! `tests` below check that, and [`force`] lets them run the narrower builds.

use std::sync::atomic::{AtomicU8, Ordering};

/// The instruction sets a [`widest!`] loop may run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Level {
    Base = 1,
    Avx2 = 2,
    Avx512 = 3,
}

/// 0: not detected yet.
static LEVEL: AtomicU8 = AtomicU8::new(0);

/// The widest level this CPU supports (detected once), unless [`force`] narrowed it.
#[inline]
pub(crate) fn level() -> Level {
    match LEVEL.load(Ordering::Relaxed) {
        3 => Level::Avx512,
        2 => Level::Avx2,
        1 => Level::Base,
        _ => {
            let l = detect();
            LEVEL.store(l as u8, Ordering::Relaxed);
            l
        }
    }
}

fn detect() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return Level::Avx512;
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return Level::Avx2;
        }
    }
    Level::Base
}

/// Runs the [`widest!`] loops at `l` or the detected level, whichever is narrower (for tests that
/// compare the builds; every level gives the same bits, so other threads are unaffected).
#[cfg(test)]
pub(crate) fn force(l: Level) {
    let l = (l as u8).min(detect() as u8);
    LEVEL.store(l, Ordering::Relaxed);
}

/// `fn name<T: Bound>(args) [-> R] { body }`, with the body compiled for AVX-512F, AVX2 + FMA and the
/// baseline, chosen by [`level`] at each call. Keep the body element-wise (see the module header).
macro_rules! widest {
    ($(#[$attr:meta])* $vis:vis fn $name:ident<$t:ident: $bound:path>($($a:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$attr])*
        $vis fn $name<$t: $bound>($($a: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512<$t: $bound>($($a: $ty),*) $(-> $ret)? $body
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2<$t: $bound>($($a: $ty),*) $(-> $ret)? $body
                match $crate::ops::backend::simd::level() {
                    // SAFETY: level() reports only instruction sets this CPU has.
                    $crate::ops::backend::simd::Level::Avx512 => return unsafe { avx512::<$t>($($a),*) },
                    $crate::ops::backend::simd::Level::Avx2 => return unsafe { avx2::<$t>($($a),*) },
                    $crate::ops::backend::simd::Level::Base => {}
                }
            }
            $body
        }
    };
}
pub(crate) use widest;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::backend::cpu::Float;

    widest! {
        fn poly<T: Float>(y: &mut [T], x: &[T]) {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = (x * x + T::ONE) / (x.exp() + T::ONE);
            }
        }
    }

    #[test]
    fn every_level_gives_the_same_bits() {
        let x: Vec<f32> = (0..1003).map(|i| ((i as f32) * 0.731).sin() * 20.0).collect();
        let mut want = vec![0f32; x.len()];
        for (w, &v) in want.iter_mut().zip(&x) {
            *w = (v * v + 1.0) / (crate::ops::float::exp_f32(v) + 1.0);
        }
        for l in [Level::Base, Level::Avx2, Level::Avx512] {
            force(l);
            let mut y = vec![0f32; x.len()];
            poly(&mut y, &x);
            let bad = y.iter().zip(&want).position(|(a, b)| a.to_bits() != b.to_bits());
            assert_eq!(bad, None, "level {l:?} differs at {bad:?}");
        }
        force(Level::Avx512);
    }
}
