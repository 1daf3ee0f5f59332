//! `compare --seeds N`: the t quantiles against the t distribution integrated in float64, mean /
//! sd / interval against a direct computation and a coverage simulation, the difference paired by
//! seed, the seeds' folders, the report of several seeds, and `compare --seeds 2` end to end
//! (growing from one seed, then reusing every seed).

mod common;
use gumbel_moe::report::bands::{band, BandPoint};
use gumbel_moe::report::seeds::{aggregate, expand, seed_folder};
use gumbel_moe::report::stats::{paired, t975, Spread};
use gumbel_moe::report::{Report, RunPlan, RunSummary};
use serde_json::Value;

/// P(T <= q) for Student's t with `df` degrees of freedom: 1/2 plus the density integrated from 0
/// to q by Simpson's rule, the constant Gamma((df+1)/2) / (sqrt(df pi) Gamma(df/2)) by its recursion.
fn t_cdf(q: f64, df: usize) -> f64 {
    let pi = std::f64::consts::PI;
    let mut r = 1.0 / pi.sqrt(); // Gamma(1) / Gamma(1/2)
    for v in 1..df {
        r = (v as f64 / 2.0) / r; // Gamma((v+2)/2) / Gamma((v+1)/2) = (v/2) / r(v)
    }
    let nu = df as f64;
    let c = r / (nu * pi).sqrt();
    let f = |x: f64| c * (1.0 + x * x / nu).powf(-(nu + 1.0) / 2.0);
    let n = 40_000;
    let h = q / n as f64;
    let mut s = f(0.0) + f(q);
    for i in 1..n {
        s += f(i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
    }
    0.5 + s * h / 3.0
}

#[test]
fn t_quantiles_match_known_values_and_the_integrated_distribution() {
    // Printed tables, and the closed forms for df 1 (Cauchy) and 2.
    assert!((t975(2) - 4.303).abs() < 5e-4 && (t975(4) - 2.776).abs() < 5e-4);
    assert!((t975(1) - (0.475 * std::f64::consts::PI).tan()).abs() < 1e-8, "{}", t975(1));
    assert!((t975(2) - 0.95 / (2.0 * 0.975 * 0.025f64).sqrt()).abs() < 1e-8, "{}", t975(2));
    // Every table entry and the expansion above it: the t CDF there is 0.975.
    for df in (1..=40).chain([50, 60, 100, 1000]) {
        let p = t_cdf(t975(df), df);
        assert!((p - 0.975).abs() < 2e-8, "df {df}: P(T <= {}) = {p}", t975(df));
    }
    // Decreasing towards the normal quantile.
    for df in 1..200 {
        assert!(t975(df + 1) < t975(df), "df {df}");
    }
    assert!((t975(100_000) - 1.959963985).abs() < 1e-4);
    assert!(t975(0).is_nan());
}

#[test]
fn spread_matches_a_direct_computation() {
    // The three seeds of the default config.
    let xs = [1.7152, 1.7266, 1.7191];
    let s = Spread::of(&xs).unwrap();
    let mean = (1.7152 + 1.7266 + 1.7191) / 3.0;
    let var = ((1.7152f64 - mean).powi(2) + (1.7266f64 - mean).powi(2) + (1.7191f64 - mean).powi(2)) / 2.0;
    let half = 4.302652730 * var.sqrt() / 3f64.sqrt();
    assert_eq!(s.n, 3);
    assert!((s.mean - mean).abs() < 1e-15 && (s.sd.unwrap() - var.sqrt()).abs() < 1e-15, "{s:?}");
    let [lo, hi] = s.ci95.unwrap();
    assert!((lo - (mean - half)).abs() < 1e-12 && (hi - (mean + half)).abs() < 1e-12, "{s:?}");
    assert!((s.mean - 1.720).abs() < 5e-4 && (s.sd.unwrap() - 0.006).abs() < 5e-4);
    // One value: a mean, nothing to estimate a spread from.
    assert_eq!(Spread::of(&[2.0]), Some(Spread { n: 1, mean: 2.0, sd: None, ci95: None }));
    assert_eq!(Spread::of(&[]), None);
    assert_eq!(Spread::of(&[1.0, f64::NAN]), None);
}

/// xorshift64* uniforms and Box-Muller normals: a fixed stream, so the test is deterministic.
struct Normals(u64);
impl Normals {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn next(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

/// Simulated: the 95% interval of 3 normal draws covers the true mean 95% of the time (the normal
/// quantile 1.96 instead of t would cover about 82%).
#[test]
fn interval_covers_the_mean_95_percent_of_the_time() {
    let mut g = Normals(0x9e37_79b9_7f4a_7c15);
    let trials = 40_000;
    let mut covered = 0;
    let mut covered_z = 0;
    for _ in 0..trials {
        let xs: Vec<f64> = (0..3).map(|_| 1.7 + 0.01 * g.next()).collect();
        let s = Spread::of(&xs).unwrap();
        let [lo, hi] = s.ci95.unwrap();
        covered += (lo <= 1.7 && 1.7 <= hi) as usize;
        let hz = 1.96 * s.sd.unwrap() / 3f64.sqrt();
        covered_z += ((s.mean - 1.7).abs() <= hz) as usize;
    }
    let (c, cz) = (covered as f64 / trials as f64, covered_z as f64 / trials as f64);
    assert!((c - 0.95).abs() < 0.006, "t interval covered {c}");
    assert!(cz < 0.86, "normal interval covered {cz}");
}

#[test]
fn difference_paired_by_seed() {
    // Seeds move both runs a lot, the difference little: paired, it is clearly non-zero.
    let a = [Some(1.70), Some(1.75), Some(1.72)];
    let b = [Some(1.71), Some(1.762), Some(1.729)];
    let p = paired(&a, &b).unwrap();
    let d = [1.70 - 1.71, 1.75 - 1.762, 1.72 - 1.729];
    let direct = Spread::of(&d).unwrap();
    assert_eq!(p.diff, direct);
    assert!(p.significant && p.diff.ci95.unwrap()[1] < 0.0, "{p:?}");
    // The same numbers unpaired: the runs' own intervals overlap.
    let (sa, sb) = (Spread::of(&[1.70, 1.75, 1.72]).unwrap(), Spread::of(&[1.71, 1.762, 1.729]).unwrap());
    assert!(sa.ci95.unwrap()[1] > sb.ci95.unwrap()[0]);
    // Only seeds where both finished are paired; two differences of unlike sign: not significant.
    let p = paired(&[Some(1.0), Some(1.2), None, Some(1.1)], &[Some(0.9), Some(1.3), Some(1.0), None]).unwrap();
    assert_eq!(p.diff.n, 2);
    assert!((p.diff.mean - 0.0).abs() < 1e-12 && !p.significant, "{p:?}");
    // One pair: a difference, no interval, never significant.
    let p = paired(&[Some(2.0)], &[Some(1.5)]).unwrap();
    assert!((p.diff.mean - 0.5).abs() < 1e-12 && p.diff.ci95.is_none() && !p.significant);
    assert!(paired(&[None], &[Some(1.0)]).is_none());
}

#[test]
fn seed_folders_and_overrides() {
    let plans = vec![
        RunPlan { name: "gumbel".into(), overrides: vec!["model.router.kind=gumbel".into()] },
        RunPlan { name: "s7".into(), overrides: vec!["seed=7".into()] },
    ];
    let runs = expand(&plans, &[1337, 7], 3).unwrap();
    let names: Vec<&str> = runs.iter().map(|r| r.plan.name.as_str()).collect();
    assert_eq!(names, ["gumbel", "gumbel.seed1338", "gumbel.seed1339", "s7", "s7.seed8", "s7.seed9"]);
    assert_eq!(runs[0].plan.overrides, plans[0].overrides, "seed 0 is the one-seed run, unchanged");
    assert_eq!(runs[2].plan.overrides, ["model.router.kind=gumbel", "seed=1339"]);
    assert_eq!(runs[5].plan.overrides, ["seed=7", "seed=9"]);
    assert_eq!((runs[4].run, runs[4].index, runs[4].seed), (1, 1, 8));
    assert_eq!(seed_folder("x", 0, 5), "x");
    // A variant named like another run's seed folder is refused; 0 seeds too.
    let clash = vec![plans[0].clone(), RunPlan { name: "gumbel.seed1338".into(), overrides: vec![] }];
    let e = format!("{:#}", expand(&clash, &[1337, 1], 2).unwrap_err());
    assert!(e.contains("gumbel.seed1338"), "{e}");
    assert!(expand(&plans, &[1, 2], 0).is_err());
    // One seed: exactly the plan.
    let one = expand(&plans, &[1337, 7], 1).unwrap();
    assert_eq!(one.iter().map(|r| r.plan.clone()).collect::<Vec<_>>(), plans);
}

/// The band: mean, lowest and highest at the steps every seed has (a seed that stopped early ends
/// it; an empty curve is a failed seed, left out).
#[test]
fn band_over_seeds() {
    let seeds = vec![
        vec![(0.0, 3.0), (5.0, 2.0), (10.0, 1.5)],
        vec![(0.0, 3.3), (5.0, 2.3)],
        vec![],
        vec![(5.0, 2.6), (0.0, 2.7)],
    ];
    let b = band(&seeds);
    let p = |x: f64, mean: f64, lo: f64, hi: f64| BandPoint { x, mean, lo, hi };
    assert_eq!(b.len(), 2);
    for (got, want) in b.iter().zip([p(0.0, 3.0, 2.7, 3.3), p(5.0, 2.3, 2.0, 2.6)]) {
        assert_eq!((got.x, got.lo, got.hi), (want.x, want.lo, want.hi));
        assert!((got.mean - want.mean).abs() < 1e-12, "{got:?}");
    }
    assert!(band(&[vec![], vec![]]).is_empty());
}

fn seed_row(name: &str, router: &str, seed: u64, val: Option<f64>) -> RunSummary {
    RunSummary {
        name: name.into(),
        router: router.into(),
        status: if val.is_some() { "ok" } else { "failed" }.into(),
        log: val.is_none().then(|| format!("{name}/train.log")),
        seed: Some(seed),
        val_loss: val,
        tok_per_s: val.map(|_| 1000.0 + seed as f64),
        dead_experts: val.map(|_| seed % 2),
        ..Default::default()
    }
}

#[test]
fn report_of_several_seeds() {
    let run = |name: &str, router: &str, vals: [Option<f64>; 3]| {
        let rows = (0..3).map(|k| seed_row(&format!("{name}.{k}"), router, 10 + k as u64, vals[k])).collect();
        aggregate(name, rows)
    };
    let runs = vec![
        run("gumbel", "gumbel", [Some(1.70), Some(1.75), Some(1.72)]),
        run("dense_ffn", "dense_ffn", [Some(1.71), Some(1.762), Some(1.729)]),
        run("hash", "hash", [Some(1.69), None, Some(1.70)]),
    ];
    let g = &runs[0];
    assert_eq!(g.status, "ok");
    assert!((g.val_loss.unwrap() - (1.70 + 1.75 + 1.72) / 3.0).abs() < 1e-12);
    assert_eq!(g.val_loss_spread, Spread::of(&[1.70, 1.75, 1.72]));
    assert_eq!((g.tok_per_s, g.dead_experts, g.seed, g.per_seed.len()), (Some(1011.0), Some(0), None, 3));
    // A failed seed fails the row, names its log, and keeps the finished seeds' figures.
    let h = &runs[2];
    assert_eq!((h.status.as_str(), h.log.as_deref()), ("failed", Some("hash.1/train.log")));
    assert_eq!(h.val_loss_spread.as_ref().map(|s| s.n), Some(2));
    let r = Report::new("test", runs);
    assert_eq!((r.seeds, r.best.as_deref(), r.baseline.as_deref()), (3, Some("gumbel"), Some("dense_ffn")));
    let p = r.runs[0].delta_paired.as_ref().unwrap();
    assert_eq!(p, &paired(&[Some(1.70), Some(1.75), Some(1.72)], &[Some(1.71), Some(1.762), Some(1.729)]).unwrap());
    assert_eq!(r.runs[0].delta_vs_dense_ffn, Some(p.diff.mean));
    // hash is paired on the seeds both finished (0 and 2).
    assert_eq!(r.runs[2].delta_paired.as_ref().unwrap().diff.n, 2);
    let md = r.to_markdown();
    let [lo, hi] = r.runs[0].val_loss_spread.as_ref().unwrap().ci95.unwrap();
    let sd = r.runs[0].val_loss_spread.as_ref().unwrap().sd.unwrap();
    let [dlo, dhi] = p.diff.ci95.unwrap();
    let want = format!(
        "| gumbel | gumbel | 3 | {:.4} ± {sd:.4} | [{lo:.4}, {hi:.4}] | {:+.4} | [{dlo:.4}, {dhi:.4}] | yes | 1011 |",
        r.runs[0].val_loss.unwrap(),
        p.diff.mean
    );
    assert!(md.contains(&want), "{want}\n{md}");
    let dense = md.lines().find(|l| l.starts_with("| dense_ffn | dense_ffn | 3 |")).unwrap();
    assert!(dense.contains("] | – | – | – | "), "the baseline against itself: no test\n{dense}");
    assert!(md.contains("| hash | hash | 2 of 3 | failed: see `hash.1/train.log`"), "{md}");
    assert!(md.contains("| gumbel | 10: 1.7000, 11: 1.7500, 12: 1.7200 |"), "{md}");
    assert!(md.contains("| hash | 10: 1.6900, 11: failed, 12: 1.7000 |"), "{md}");
    assert!(md.contains("Best run by mean over 3 seeds: **gumbel**") && md.contains("gumbel -0.0103 ["), "{md}");
    assert!(md.contains(", significant") && md.contains("Failed (a seed or more): hash."), "{md}");
    let js: Value = serde_json::to_value(&r).unwrap();
    assert_eq!(js["seeds"], 3);
    // Against gumbel: the deltas and the test follow the baseline, delta_vs_dense_ffn stays.
    let g = Report::against("test", r.runs.clone(), "gumbel");
    assert_eq!(g.baseline.as_deref(), Some("gumbel"));
    let want = paired(&[Some(1.71), Some(1.762), Some(1.729)], &[Some(1.70), Some(1.75), Some(1.72)]).unwrap();
    assert_eq!(g.runs[1].delta_paired.as_ref(), Some(&want));
    assert_eq!((g.runs[1].delta_vs_baseline, g.runs[1].delta_vs_dense_ffn), (Some(want.diff.mean), Some(0.0)));
    let md = g.to_markdown();
    assert!(
        md.contains("| Δ vs gumbel |") && md.contains("Val loss against gumbel, paired by seed: dense_ffn +0.0103"),
        "{md}"
    );
    let grow = md.lines().find(|l| l.starts_with("| gumbel | gumbel | 3 |")).unwrap();
    assert!(grow.contains("] | – | – | – | "), "{grow}");
    assert_eq!(js["runs"][0]["per_seed"][1]["val_loss"], 1.75);
    assert_eq!(js["runs"][0]["per_seed"][1]["seed"], 11);
    // Each seed's own difference to the baseline's same seed; none where a seed failed.
    let d1 = js["runs"][0]["per_seed"][1]["delta_vs_baseline"].as_f64().unwrap();
    assert!((d1 - (1.75 - 1.762)).abs() < 1e-12, "{d1}");
    assert!(js["runs"][2]["per_seed"][1]["delta_vs_baseline"].is_null());
    assert_eq!(js["runs"][0]["val_loss_spread"]["n"], 3);
    assert_eq!(js["runs"][0]["delta_paired"]["significant"], true);
    assert!(js["runs"][0]["delta_paired"]["ci95"].is_array());
}

/// The binary end to end: one seed, then `--seeds 2` trains only the new seed, then a re-run
/// reuses both.
#[test]
fn compare_with_two_seeds_grows_and_reuses() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("tiny.toml");
    std::fs::write(
        &base,
        format!(
            "[data]\nsource = {:?}\n[model]\nblock_size = 16\nn_layer = 2\nn_head = 2\nn_embd = 32\n\
             [model.moe]\nnum_experts = 4\nexpert_hidden = 64\n[model.router]\nprefilter = 3\n\
             [train]\nbatch_size = 4\nwarmup_iters = 1\neval_interval = 1\neval_iters = 1\nlog_interval = 1\n\
             final_full_eval = false\n",
            common::shakespeare_path().display().to_string()
        ),
    )
    .unwrap();
    let out = d.path().join("cmp");
    let run_with = |seeds: &str, more: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_gumbel-moe"))
            .args(["compare", "--config"])
            .arg(&base)
            .args(["--routers", "gumbel,dense_ffn", "--steps", "2", "--jobs", "2", "--seeds", seeds, "--out"])
            .arg(&out)
            .args(more)
            .env("RAYON_NUM_THREADS", "1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{err}");
        err
    };
    let run = |seeds: &str| run_with(seeds, &[]);
    let report =
        || -> Value { serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap() };
    run("1");
    let js = report();
    assert_eq!(js["seeds"], 1);
    assert_eq!(js["runs"][0]["seed"], 1337);
    assert!(js["runs"][0].get("per_seed").is_none(), "one seed: the rows of before");
    // Two seeds: seed 0 is the run above, reused; seed 1338 trains.
    let err = run("2");
    assert!(err.contains("gumbel: finished with this config, reused"), "{err}");
    assert!(err.contains("dense_ffn: finished with this config, reused"), "{err}");
    assert!(err.contains("gumbel.seed1338: training ->") && err.contains("dense_ffn.seed1338: training ->"), "{err}");
    let js = report();
    assert_eq!(js["seeds"], 2);
    for (i, name) in ["gumbel", "dense_ffn"].iter().enumerate() {
        let row = &js["runs"][i];
        assert_eq!((row["name"].as_str(), row["status"].as_str()), (Some(*name), Some("ok")), "{row}");
        let seeds = row["per_seed"].as_array().unwrap();
        assert_eq!(seeds.len(), 2, "{row}");
        assert_eq!((seeds[0]["seed"].as_u64(), seeds[1]["seed"].as_u64()), (Some(1337), Some(1338)));
        assert_eq!(seeds[1]["name"], format!("{name}.seed1338"));
        let (a, b) = (seeds[0]["val_loss"].as_f64().unwrap(), seeds[1]["val_loss"].as_f64().unwrap());
        assert_ne!(a, b, "{name}: another seed, another loss");
        assert!((row["val_loss"].as_f64().unwrap() - (a + b) / 2.0).abs() < 1e-12);
        assert_eq!(row["val_loss_spread"]["n"], 2);
        let cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join(format!("{name}.seed1338/config.json"))).unwrap())
                .unwrap();
        assert_eq!(cfg["seed"], 1338);
    }
    assert_eq!(js["runs"][0]["delta_paired"]["n"], 2);
    assert!(std::fs::read_to_string(out.join("report.md")).unwrap().contains("2 seeds per run"));
    for f in ["val_loss.png", "train_loss.png", "gumbel/load.png", "gumbel.seed1338/load.png"] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    // Again: every seed reused, nothing trains.
    let err = run("2");
    assert!(err.contains("gumbel.seed1338: finished with this config, reused"), "{err}");
    assert!(!err.contains("training ->"), "{err}");
    // Against another baseline (reusing every seed); one that is not a run is refused.
    let err = run_with("2", &["--baseline", "gumbel"]);
    assert!(!err.contains("training ->"), "{err}");
    let js = report();
    assert_eq!(js["baseline"], "gumbel");
    assert_eq!(js["runs"][1]["delta_paired"]["n"], 2);
    assert!(std::fs::read_to_string(out.join("report.md")).unwrap().contains("| Δ vs gumbel |"));
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_gumbel-moe"))
        .args(["compare", "--config"])
        .arg(&base)
        .args(["--routers", "gumbel", "--baseline", "hash", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success() && err.contains("--baseline hash is not one of the runs (gumbel)"), "{err}");
}
