//! Single-matmul f32 GFLOP/s, gemm crate vs OpenBLAS's cblas_sgemm, at the training step's shapes
//! (built by scripts/bench_sgemm.sh in a throwaway crate): sgemm [THREADS]
use std::time::Instant;
extern "C" {
    fn cblas_sgemm(layout: i32, ta: i32, tb: i32, m: i32, n: i32, k: i32, alpha: f32, a: *const f32, lda: i32,
        b: *const f32, ldb: i32, beta: f32, c: *mut f32, ldc: i32);
    fn openblas_set_num_threads(n: i32);
}
// C (m,n) = A (m,k) B (k,n); ta: A stored transposed (k,m); tb: B stored transposed (n,k)
fn run_gemm(c: &mut [f32], a: &[f32], b: &[f32], m: usize, k: usize, n: usize, ta: bool, tb: bool, threads: usize) {
    let (acs, ars) = if ta { (m as isize, 1) } else { (1, k as isize) };
    let (bcs, brs) = if tb { (k as isize, 1) } else { (1, n as isize) };
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    unsafe { gemm::gemm(m, n, k, c.as_mut_ptr(), 1, n as isize, false, a.as_ptr(), acs, ars, b.as_ptr(), bcs, brs, 1.0f32, 1.0f32, false, false, false, par) }
}
fn run_blas(c: &mut [f32], a: &[f32], b: &[f32], m: usize, k: usize, n: usize, ta: bool, tb: bool) {
    let lda = if ta { m } else { k } as i32;
    let ldb = if tb { k } else { n } as i32;
    unsafe { cblas_sgemm(101, if ta { 112 } else { 111 }, if tb { 112 } else { 111 }, m as i32, n as i32, k as i32, 1.0, a.as_ptr(), lda, b.as_ptr(), ldb, 0.0, c.as_mut_ptr(), n as i32) }
}
// The six products of one GELU expert (n rows, C -> H -> C) with its hidden activations (n, H) in
// rows or transposed (H, n), as src/ops/expert_mlp/kernels.rs lays them out; one thread.
fn layouts() {
    // g(m, n, k, dst, (rs, cs), lhs, (rs, cs), rhs, (rs, cs)): dst (m, n) = lhs (m, k) rhs (k, n)
    fn g(m: usize, n: usize, k: usize, d: &mut [f32], ds: (usize, usize), l: &[f32], ls: (usize, usize), r: &[f32], rs: (usize, usize)) {
        let i = |v: usize| v as isize;
        unsafe { gemm::gemm(m, n, k, d.as_mut_ptr(), i(ds.1), i(ds.0), false, l.as_ptr(), i(ls.1), i(ls.0), r.as_ptr(), i(rs.1), i(rs.0), 1.0f32, 1.0f32, false, false, false, gemm::Parallelism::None) }
    }
    println!("| rows n | C, H | rows: us | transposed: us | transposed speed |");
    println!("|---:|---|---:|---:|---:|");
    for (n, c, h) in [(3, 128, 168), (16, 128, 168), (48, 128, 168), (64, 128, 168), (16, 384, 1536), (128, 384, 1536), (256, 384, 1536), (2048, 384, 1536)] {
        let v = |len: usize, s: usize| -> Vec<f32> { (0..len).map(|i| ((i * s % 13) as f32) * 0.1).collect() };
        let (x, dy, w1, w2, act) = (v(n * c, 7), v(n * c, 3), v(h * c, 5), v(c * h, 11), v(n * h, 2)); // w1 (H, C), w2 (C, H)
        let (mut dh, mut dc, mut dw) = (vec![0f32; n * h], vec![0f32; n * c], vec![0f32; h * c]);
        let reps = ((3e8 / (12.0 * (n * c * h) as f64)) as usize).max(3);
        let mut best = [f64::MAX; 2];
        for _round in 0..5 {
            for (t, b) in best.iter_mut().enumerate() {
                // (row stride, col stride) of a hidden (n, H) buffer, and of its transpose (H, n)
                let (hm, hmt) = if t == 1 { ((1, n), (n, 1)) } else { ((h, 1), (1, h)) };
                let t0 = Instant::now();
                for _ in 0..reps {
                    g(n, h, c, &mut dh, hm, &x, (c, 1), &w1, (1, c)); // U = x W1^T
                    g(n, c, h, &mut dc, if t == 1 { (1, n) } else { (c, 1) }, &act, hm, &w2, (1, h)); // y = A W2^T (transposed: y^T)
                    g(n, h, c, &mut dh, hm, &dy, (c, 1), &w2, (h, 1)); // dA = dY W2
                    g(c, h, n, &mut dw, (h, 1), &dy, (1, c), &act, hm); // dW2 = dY^T A
                    g(h, c, n, &mut dw, (c, 1), &act, hmt, &x, (c, 1)); // dW1 = dU^T X
                    g(n, c, h, &mut dc, (c, 1), &act, hm, &w1, (c, 1)); // dX = dU W1
                }
                *b = b.min(t0.elapsed().as_secs_f64() / reps as f64);
            }
        }
        println!("| {n} | {c}, {h} | {:.1} | {:.1} | {:.2}x |", best[0] * 1e6, best[1] * 1e6, best[0] / best[1]);
    }
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("layouts") {
        return layouts();
    }
    let threads: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(1);
    if threads == 0 {
        // Only OpenBLAS's start-up (OPENBLAS_VERBOSE=2 prints the core it picked).
        let (a, b, mut c) = ([1f32], [1f32], [0f32]);
        run_blas(&mut c, &a, &b, 1, 1, 1, false, false);
        return;
    }
    unsafe { openblas_set_num_threads(threads as i32) };
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().ok();
    let shapes = [
        ("qkv fwd", 2048, 384, 1152, false, true),
        ("mlp fc fwd", 2048, 384, 1536, false, true),
        ("mlp proj fwd", 2048, 1536, 384, false, true),
        ("dX = dY W", 2048, 1536, 384, false, false),
        ("dW = dY^T X", 1536, 2048, 384, true, false),
        ("expert fc (128 rows)", 128, 384, 1536, false, true),
        ("expert dW (128 rows)", 1536, 128, 384, true, false),
        ("default fc 384x128x512", 384, 128, 512, false, true),
        ("default dW 512x384x128", 512, 384, 128, true, false),
        ("attn qk 256x64x256", 256, 64, 256, false, true),
    ];
    println!("| shape | m,k,n | gemm GFLOP/s | OpenBLAS GFLOP/s | OpenBLAS / gemm |");
    println!("|---|---|---:|---:|---:|");
    for (name, m, k, n, ta, tb) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32) * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32) * 0.1).collect();
        let mut c = vec![0f32; m * n];
        let flops = 2.0 * (m * k * n) as f64;
        let reps = ((3e9 / flops) as usize).max(3);
        let mut best = [f64::MAX; 2];
        for _round in 0..3 {
            for which in 0..2 {
                let t0 = Instant::now();
                for _ in 0..reps {
                    if which == 0 { run_gemm(&mut c, &a, &b, m, k, n, ta, tb, threads) } else { run_blas(&mut c, &a, &b, m, k, n, ta, tb) }
                }
                best[which] = best[which].min(t0.elapsed().as_secs_f64() / reps as f64);
            }
        }
        let g = [flops / best[0] / 1e9, flops / best[1] / 1e9];
        println!("| {name} | {m},{k},{n} | {:.0} | {:.0} | {:.2} |", g[0], g[1], g[1] / g[0]);
    }
}
