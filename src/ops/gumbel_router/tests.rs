//! Unit tests of the router's CPU paths: the top-K paths and the portable and AVX2 row blocks give
//! the same results, and `exp_f32` stays close to libm.

#[cfg(target_arch = "x86_64")]
use super::avx2::top_k_f32_avx2;
#[cfg(target_arch = "x86_64")]
use super::blocks::use_avx2;
use super::blocks::{select_block, select_block_impl, weights_block, weights_block_impl};
use super::cpu::{top_k_f32, top_k_insertion};
use super::{GumbelParams, MAX_K};
use crate::ops::backend::cpu::Rows;
use crate::ops::float::exp_f32;
use crate::rng;

/// Rows of E logits from Philox: `levels` > 0 quantizes them to that many values (ties).
fn row(seed: u32, e: usize, levels: u32) -> Vec<f32> {
    (0..e as u32)
        .map(|i| {
            let r = rng::philox4x32_10([i, seed, 1, 2], [3, 4]);
            let u = rng::u32_to_open_unit(r[0]) * 2.0 - 1.0;
            if levels > 0 {
                (r[1] % levels) as f32
            } else {
                u * 3.0
            }
        })
        .collect()
}

/// The threshold top-K paths (portable and AVX2) give exactly what the insertion scan gives,
/// ties, E not a multiple of 8, K < 8 and non-finite logits included.
#[test]
fn top_k_paths_agree() {
    for &(e, k) in &[(8usize, 8usize), (64, 8), (64, 1), (64, 5), (37, 8), (100, 8), (256, 8), (9, 3), (64, 16)] {
        for seed in 0..400u32 {
            let levels = [0, 0, 3, 17, 1][seed as usize % 5];
            let mut lg = row(seed, e, levels);
            if seed % 97 == 5 {
                lg[(seed as usize * 7) % e] = if seed % 2 == 0 { f32::NAN } else { f32::INFINITY };
            }
            let (mut cv0, mut ci0) = ([0f32; MAX_K], [0u32; MAX_K]);
            let want = top_k_insertion(&lg, k, &mut cv0, &mut ci0);
            let (mut cv1, mut ci1) = ([0f32; MAX_K], [0u32; MAX_K]);
            let got = top_k_f32(&lg, k, &mut cv1, &mut ci1);
            assert_eq!(got, want, "portable e={e} k={k} seed={seed}");
            if want.is_ok() {
                assert_eq!(ci1[..k], ci0[..k], "portable e={e} k={k} seed={seed} {lg:?}");
            }
            #[cfg(target_arch = "x86_64")]
            if use_avx2() {
                let (mut cv2, mut ci2) = ([0f32; MAX_K], [0u32; MAX_K]);
                // SAFETY: checked just above.
                let got = unsafe { top_k_f32_avx2(&lg, k, &mut cv2, &mut ci2) };
                assert_eq!(got, want, "avx2 e={e} k={k} seed={seed}");
                if want.is_ok() {
                    assert_eq!(ci2[..k], ci0[..k], "avx2 e={e} k={k} seed={seed} {lg:?}");
                }
            }
        }
    }
}

/// The portable and the AVX2 builds of the select and weights blocks give the same bits, for
/// K below, at and above one AVX2 register, and the y the select op saves are the bits the
/// weights op computes.
#[test]
fn portable_and_avx2_blocks_agree() {
    // 301 rows: whole batches, pairs and one row left over.
    let (t, e) = (301usize, 64usize);
    let data: Vec<f32> = (0..t as u32).flat_map(|s| row(s, e, if s % 4 == 0 { 9 } else { 0 })).collect();
    let r = Rows { rows: t, cols: e, stride: e, offset: 0 };
    for (k, m) in [(8usize, 2usize), (5, 1), (1, 1), (3, 0), (12, 2)] {
        let p = GumbelParams { k, m, tau: 0.7, seed: 9, step: 4, layer: 1, token_base: 3, noisy: true };
        let w = 2 * p.k + p.m;
        let mut a = vec![0u32; t * w];
        select_block_impl::<f32, false>(&data, r, &p, 0, &mut a, w, true).unwrap();
        let mut b = vec![0u32; t * w];
        select_block(&data, r, &p, 0, &mut b, w, true).unwrap();
        assert_eq!(a, b, "k={k} m={m}");
        let rc = Rows { rows: t, cols: w, stride: w, offset: 0 };
        let inv_tau = (1.0 / p.tau) as f32;
        let mut ya = vec![0f32; t * p.k];
        weights_block_impl(&data, r, &a, rc, &p, 0, &mut ya, inv_tau, p.k + p.m).unwrap();
        let mut yb = vec![0f32; t * p.k];
        weights_block(&data, r, &a, rc, &p, 0, &mut yb, inv_tau, p.k + p.m).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&ya), bits(&yb), "k={k} m={m}");
        // The saved y (copied above) are the bits the weights op computes from the logits.
        let mut yc = vec![0f32; t * p.k];
        weights_block(&data, r, &a, rc, &p, 0, &mut yc, inv_tau, 0).unwrap();
        assert_eq!(bits(&ya), bits(&yc), "k={k} m={m}");
    }
}

#[test]
fn exp_f32_is_close_to_libm() {
    let mut worst = 0f64;
    for i in 0..200_000 {
        let x = -90.0 * i as f32 / 200_000.0;
        let want = (x as f64).exp();
        if want < f32::MIN_POSITIVE as f64 {
            assert!(exp_f32(x) <= f32::MIN_POSITIVE);
            continue;
        }
        worst = worst.max(((exp_f32(x) as f64 - want) / want).abs());
    }
    assert!(worst < 2.5e-7, "relative error {worst}");
    assert_eq!(exp_f32(0.0), 1.0);
    assert!(exp_f32(f32::NAN).is_nan());
}
