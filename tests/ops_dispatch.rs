//! The MoE dispatch / combine ops (src/ops/expert_sort.rs, gather_rows.rs, combine/) against their
//! references: the sort against `moe::dispatch::plan`, the float ops and their backward against
//! plain tensor ops (index_select + candle's autograd) in f32 and f64, central finite differences
//! in f64, and the whole MoE layer fused vs reference. The sort and the float-op comparisons run on
//! every device (`test_device!`, f64 cases on the CPU only); the rest on the CPU.
//!
//! Every expected value comes from code independent of the op under test (the host plan, candle's
//! index_select / autograd, finite differences); nothing is a number copied from a run.

use candle_core::{DType, Device, Result, Tensor, Var};
use gumbel_moe::config::Config;
use gumbel_moe::moe::dispatch::{capacity, plan};
use gumbel_moe::moe::{build_router, MoeLayer};
use gumbel_moe::nn::{Ctx, Params};
use gumbel_moe::ops::{
    combine, combine_reference, expert_sort, expert_sort_reference, gather_rows, gather_rows_reference, split_rows,
    ExpertOrder, ExpertSort,
};

mod common;
use common::fd::five_point;
use common::host::router_config;

const CPU: Device = Device::Cpu;

/// SplitMix64: a test-local generator.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normals(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| (self.uniform() - 0.5) * 3.0 + (self.uniform() - 0.5)).collect()
    }
    /// (T, m) expert ids, distinct within a token (m <= E), skewed towards low experts so that
    /// capacities bite.
    fn indices(&mut self, t: usize, m: usize, e: usize) -> Vec<u32> {
        let mut v = Vec::with_capacity(t * m);
        for _ in 0..t {
            let mut row: Vec<u32> = Vec::with_capacity(m);
            while row.len() < m {
                let u = self.uniform();
                let x = ((u * u * e as f64) as u32).min(e as u32 - 1);
                if !row.contains(&x) {
                    row.push(x);
                }
            }
            v.extend(row);
        }
        v
    }
}

/// max |a - b| / max |b|, read on the host in f64.
fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_device(&CPU).unwrap(), b.to_device(&CPU).unwrap());
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    assert_eq!(a.len(), b.len(), "lengths differ");
    let scale = b.iter().fold(0f64, |s, v| s.max(v.abs())).max(1e-30);
    a.iter().zip(&b).fold(0f64, |s, (x, y)| s.max((x - y).abs())) / scale
}

/// (T, m, E, capacity factor): T = 1, E not a multiple of 32, E = 256, m = 1 and 2, several CPU
/// chunks (T m > 4096), capacities that drop slots and dropless.
const SORT_CASES: [(usize, usize, usize, f64); 14] = [
    (1, 1, 1, 0.0),
    (1, 1, 8, 1.0),
    (1, 2, 8, 0.0),
    (7, 2, 3, 1.0),
    (100, 1, 37, 0.0),
    (100, 2, 37, 1.25),
    (333, 2, 64, 0.5),
    (1000, 1, 256, 0.0),
    (1000, 2, 256, 1.0),
    (5000, 2, 37, 1.25),
    (5000, 1, 8, 0.0),
    (9000, 2, 100, 0.3),
    (64, 2, 2, 2.0),
    (3, 2, 256, 1.0),
];

fn expert_sort_equals_plan_on(dev: &Device) -> Result<()> {
    let mut rng = Rng(1);
    for &(t, m, e, cf) in &SORT_CASES {
        let idx = rng.indices(t, m, e);
        let cap = capacity(cf, t * m, e);
        let label = format!("T={t} m={m} E={e} cap={cap}");
        let o = expert_sort(&Tensor::from_vec(idx.clone(), (t, m), dev)?, e, cap)?;
        let got = o.order.to_vec1::<u32>()?;
        assert_eq!(got, expert_sort_reference(&idx, t, m, e, cap), "{label}: order differs from the plan's");
        // The plan's own view: tokens per expert, dropped, and each expert's (token, slot) list.
        let p = plan(&idx, t, m, e, cap);
        assert_eq!(o.tokens_per_expert(), p.tokens.iter().map(|v| v.len() as u32).collect::<Vec<_>>(), "{label}");
        assert_eq!(o.dropped(), p.dropped, "{label}: dropped");
        let row_slot = o.row_slot()?.to_vec1::<u32>()?;
        for ex in 0..e {
            let rows = &row_slot[o.offsets[ex] as usize..o.offsets[ex + 1] as usize];
            assert_eq!(rows, p.slots[ex].as_slice(), "{label}: slots of expert {ex}");
        }
        if cap > 0 && cf <= 1.25 && m < e && p.dropped == 0 && t > 10 {
            panic!("{label}: the capacity case drops nothing; the test data does not exercise drops");
        }
    }
    Ok(())
}

test_device!(
    expert_sort_equals_plan_on,
    expert_sort_equals_plan,
    expert_sort_equals_plan_cuda,
    expert_sort_equals_plan_metal
);

#[test]
fn expert_sort_reads_strided_indices_and_rejects_bad_ids() -> Result<()> {
    let (t, m, e) = (50, 2, 9);
    let mut rng = Rng(2);
    let wide = rng.indices(t, 3, e); // (T, 3): take columns 1..3
    let wide_t = Tensor::from_vec(wide.clone(), (t, 3), &CPU)?;
    let idx: Vec<u32> = wide.chunks(3).flat_map(|r| r[1..].to_vec()).collect();
    let o = expert_sort(&wide_t.narrow(1, 1, m)?, e, 7)?;
    assert_eq!(o.order.to_vec1::<u32>()?, expert_sort_reference(&idx, t, m, e, 7), "strided indices");
    let mut bad = idx.clone();
    bad[17] = e as u32;
    let bad = Tensor::from_vec(bad, (t, m), &CPU)?;
    assert!(bad.apply_op1_no_bwd(&ExpertSort { e, cap: 0 }).is_err(), "expert id E must be an error");
    assert!(Tensor::zeros((t, m), DType::F32, &CPU)?.apply_op1_no_bwd(&ExpertSort { e, cap: 0 }).is_err());
    Ok(())
}

/// A random routing of T tokens on `dev`: order, x (T, C), weights (T, m), expert outputs (N, C),
/// upstream (T, C).
struct Case {
    o: ExpertOrder,
    x: Tensor,
    w: Tensor,
    out: Tensor,
    dy: Tensor,
    dxs: Tensor,
}

fn case(
    rng: &mut Rng,
    (t, m, e, c, cf): (usize, usize, usize, usize, f64),
    dtype: DType,
    dev: &Device,
) -> Result<Case> {
    let idx = rng.indices(t, m, e);
    let o = expert_sort(&Tensor::from_vec(idx, (t, m), dev)?, e, capacity(cf, t * m, e))?;
    let n = o.n();
    let f = |v: Vec<f64>, s: (usize, usize)| Tensor::from_vec(v, s, &CPU)?.to_dtype(dtype)?.to_device(dev);
    Ok(Case {
        x: f(rng.normals(t * c), (t, c))?,
        w: f(rng.normals(t * m), (t, m))?,
        out: f(rng.normals(n * c), (n, c))?,
        dy: f(rng.normals(t * c), (t, c))?,
        dxs: f(rng.normals(n * c), (n, c))?,
        o,
    })
}

const FLOAT_CASES: [(usize, usize, usize, usize, f64); 6] = [
    (1, 1, 8, 16, 0.0),
    (1, 2, 8, 5, 0.0),
    (40, 2, 37, 33, 1.0),
    (300, 1, 64, 40, 1.25),
    (257, 2, 256, 7, 0.0),
    (90, 2, 5, 64, 0.5),
];

fn gather_and_combine_match_reference_forward_and_backward_on(dev: &Device) -> Result<()> {
    let mut rng = Rng(3);
    for dtype in [DType::F32, DType::F64] {
        // f64 on the CPU only: the GPU kernels are f32 only (and Metal has no f64 at all).
        if dtype == DType::F64 && !dev.is_cpu() {
            continue;
        }
        let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
        for &shape in &FLOAT_CASES {
            let k = case(&mut rng, shape, dtype, dev)?;
            let label = format!("{dtype:?} (T, m, E, C, cf) = {shape:?}");
            // gather: forward, and d/dx of sum(xs * dxs).
            let xv = Var::from_tensor(&k.x)?;
            let g_f = gather_rows(xv.as_tensor(), &k.o)?;
            let g_r = gather_rows_reference(xv.as_tensor(), &k.o)?;
            assert_eq!(g_f.dims(), g_r.dims(), "{label}");
            assert_eq!(max_rel(&g_f, &g_r), 0.0, "{label}: gather is a copy and must be exact");
            let dx_f = (g_f * &k.dxs)?.sum_all()?.backward()?.get(xv.as_tensor()).unwrap().clone();
            let dx_r = (g_r * &k.dxs)?.sum_all()?.backward()?.get(xv.as_tensor()).unwrap().clone();
            assert!(max_rel(&dx_f, &dx_r) <= tol, "{label}: gather dx rel err {}", max_rel(&dx_f, &dx_r));
            // combine: forward, and d/d(out, w) of sum(y * dy).
            let (ov, wv) = (Var::from_tensor(&k.out)?, Var::from_tensor(&k.w)?);
            let y_f = combine(ov.as_tensor(), wv.as_tensor(), &k.o)?;
            let y_r = combine_reference(ov.as_tensor(), wv.as_tensor(), &k.o)?;
            assert!(max_rel(&y_f, &y_r) <= tol, "{label}: combine y rel err {}", max_rel(&y_f, &y_r));
            let gf = (y_f * &k.dy)?.sum_all()?.backward()?;
            let gr = (y_r * &k.dy)?.sum_all()?.backward()?;
            for (v, name) in [(&ov, "d_out"), (&wv, "d_w")] {
                let (a, b) = (gf.get(v.as_tensor()).unwrap(), gr.get(v.as_tensor()).unwrap());
                assert!(max_rel(a, b) <= tol, "{label}: combine {name} rel err {}", max_rel(a, b));
            }
            // Dropped slots get a zero weight gradient (and exist when the capacity bites).
            let dw = gf.get(wv.as_tensor()).unwrap().to_device(&CPU)?.to_dtype(DType::F64)?.to_vec2::<f64>()?;
            for (tok, row) in k.o.slot_row()?.to_vec2::<u32>()?.iter().enumerate() {
                for (s, &r) in row.iter().enumerate() {
                    if r == u32::MAX {
                        assert_eq!(dw[tok][s], 0.0, "{label}: dropped slot ({tok}, {s}) has a weight gradient");
                    }
                }
            }
        }
    }
    Ok(())
}

test_device!(
    gather_and_combine_match_reference_forward_and_backward_on,
    gather_and_combine_match_reference_forward_and_backward,
    gather_and_combine_match_reference_forward_and_backward_cuda,
    gather_and_combine_match_reference_forward_and_backward_metal
);

/// d/d v[i] of f by the five-point central difference (exact for these linear ops up to rounding).
fn central(f: impl Fn(f64) -> f64) -> f64 {
    five_point(f, 1e-3)
}

fn perturb(t: &Tensor, i: usize, d: f64) -> Tensor {
    let mut v = t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    v[i] += d;
    Tensor::from_vec(v, t.shape(), &CPU).unwrap()
}

#[test]
fn finite_difference_gradcheck_f64() -> Result<()> {
    let mut rng = Rng(4);
    let k = case(&mut rng, (30, 2, 6, 9, 1.0), DType::F64, &CPU)?;
    assert!(k.o.dropped() > 0, "the case should drop slots");
    let loss = |out: &Tensor, w: &Tensor| -> f64 {
        (combine(out, w, &k.o).unwrap() * &k.dy).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
    };
    let (ov, wv) = (Var::from_tensor(&k.out)?, Var::from_tensor(&k.w)?);
    let g = (combine(ov.as_tensor(), wv.as_tensor(), &k.o)? * &k.dy)?.sum_all()?.backward()?;
    let d_out = g.get(ov.as_tensor()).unwrap().flatten_all()?.to_vec1::<f64>()?;
    let d_w = g.get(wv.as_tensor()).unwrap().flatten_all()?.to_vec1::<f64>()?;
    let mut largest = 0f64;
    for i in (0..d_out.len()).step_by(7) {
        let fd = central(|d| loss(&perturb(&k.out, i, d), &k.w));
        largest = largest.max(fd.abs());
        assert!((fd - d_out[i]).abs() <= 1e-8 * (1.0 + fd.abs()), "d_out[{i}]: {} vs fd {fd}", d_out[i]);
    }
    for (i, &dw) in d_w.iter().enumerate() {
        let fd = central(|d| loss(&k.out, &perturb(&k.w, i, d)));
        assert!((fd - dw).abs() <= 1e-8 * (1.0 + fd.abs()), "d_w[{i}]: {dw} vs fd {fd}");
    }
    let xv = Var::from_tensor(&k.x)?;
    let g = (gather_rows(xv.as_tensor(), &k.o)? * &k.dxs)?.sum_all()?.backward()?;
    let dx = g.get(xv.as_tensor()).unwrap().flatten_all()?.to_vec1::<f64>()?;
    for i in (0..dx.len()).step_by(5) {
        let fd = central(|d| {
            (gather_rows(&perturb(&k.x, i, d), &k.o).unwrap() * &k.dxs)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        });
        largest = largest.max(fd.abs());
        assert!((fd - dx[i]).abs() <= 1e-8 * (1.0 + fd.abs()), "dx[{i}]: {} vs fd {fd}", dx[i]);
    }
    assert!(largest > 1e-2, "all checked gradients are ~0: the check is vacuous");
    Ok(())
}

#[test]
fn split_rows_gives_each_experts_block() -> Result<()> {
    let mut rng = Rng(5);
    for &(t, m, e) in &[(40usize, 2usize, 37usize), (3, 1, 8), (200, 2, 64), (5, 1, 1)] {
        let idx = rng.indices(t, m, e);
        let o = expert_sort(&Tensor::from_vec(idx, (t, m), &CPU)?, e, 0)?;
        let xs = Tensor::from_vec(rng.normals(o.n() * 3), (o.n(), 3), &CPU)?;
        let parts = split_rows(&xs, &o.offsets)?;
        assert_eq!(parts.len(), e);
        for (ex, p) in parts.iter().enumerate() {
            let (lo, hi) = (o.offsets[ex] as usize, o.offsets[ex + 1] as usize);
            match p {
                None => assert_eq!(lo, hi, "expert {ex} has rows but got None"),
                Some(p) => assert_eq!(max_rel(p, &xs.narrow(0, lo, hi - lo)?), 0.0, "expert {ex} block"),
            }
        }
    }
    Ok(())
}

// ---------- the whole MoE layer ----------

/// The shared router test config (7 experts over 12-dim tokens) with capacity, both router losses
/// and the implementation set.
fn layer_config(kind: &str, m: usize, k: usize, hard: bool, cf: f64, imp: &str) -> Config {
    let mut c = router_config(kind, 7, 12, m, k, hard);
    c.model.moe.capacity_factor = cf;
    c.model.moe.balance_coef = 0.1;
    c.model.moe.z_coef = 0.01;
    c.model.router.implementation = imp.parse().unwrap();
    c
}

#[test]
fn moe_layer_fused_equals_reference() -> Result<()> {
    let cases = [
        ("softmax_topk", 2, 2, true, 0.0),
        ("softmax_topk", 2, 2, true, 0.75),
        ("softmax_topk", 1, 1, true, 1.0),
        ("gumbel", 2, 4, true, 1.0),
        ("gumbel", 3, 3, false, 0.0), // soft, all K candidates
        ("gumbel", 2, 4, false, 0.5), // soft top-m < K
        ("dense", 1, 1, true, 0.0),
        ("noisy_topk", 2, 2, true, 0.75),
        ("reinforce", 1, 1, true, 1.0),
    ];
    for (kind, m, k, hard, cf) in cases {
        let label = format!("{kind} m={m} K={k} hard={hard} cf={cf}");
        let params = Params::new();
        let fused = layer_config(kind, m, k, hard, cf, "fused");
        let reference = layer_config(kind, m, k, hard, cf, "reference");
        let lf = MoeLayer::new(&fused, 1, params.var_builder(7, DType::F64, &CPU), &build_router)?;
        let lr = MoeLayer::new(&reference, 1, params.var_builder(7, DType::F64, &CPU), &build_router)?;
        let mut rng = Rng(6);
        for (_, v) in params.named() {
            v.set(&Tensor::from_vec(rng.normals(v.elem_count()), v.shape(), &CPU)?.affine(0.4, 0.0)?)?;
        }
        let (b, t, d) = (3, 11, 12);
        let x = Tensor::from_vec(rng.normals(b * t * d), (b, t, d), &CPU)?;
        let c = Tensor::from_vec(rng.normals(b * t * d), (b, t, d), &CPU)?;
        let ctx = Ctx { train: true, step: 4, tau: 0.8, seed: 9, micro: 0 };
        let (of, or) = (lf.forward(&x, &ctx)?, lr.forward(&x, &ctx)?);
        assert!(max_rel(&of.y, &or.y) <= 1e-12, "{label}: y rel err {}", max_rel(&of.y, &or.y));
        assert_eq!(of.stats.tokens_per_expert, or.stats.tokens_per_expert, "{label}: tokens per expert");
        assert_eq!(of.stats.dropped, or.stats.dropped, "{label}: dropped");
        if cf > 0.0 && cf < 1.0 {
            assert!(of.stats.dropped > 0, "{label}: expected drops");
        }
        let loss = |o: &gumbel_moe::moe::MoeOutput| ((&o.y * &c).unwrap().sum_all().unwrap() + &o.aux_loss).unwrap();
        let (gf, gr) = (loss(&of).backward()?, loss(&or).backward()?);
        let mut nonzero = 0;
        for (name, v) in params.named() {
            match (gf.get(v.as_tensor()), gr.get(v.as_tensor())) {
                (Some(a), Some(b)) => {
                    let e = max_rel(a, b);
                    assert!(e <= 1e-10, "{label}: grad of {name} rel err {e}");
                    nonzero += (b.abs()?.sum_all()?.to_scalar::<f64>()? > 0.0) as usize;
                }
                (None, None) => {}
                (a, b) => panic!("{label}: {name} has a gradient in only one path ({} / {})", a.is_some(), b.is_some()),
            }
        }
        assert!(nonzero > 4, "{label}: only {nonzero} parameters got a gradient");
    }
    Ok(())
}
