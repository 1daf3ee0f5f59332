//! report.md of a comparison with several seeds per run: mean +- sd and the 95% interval of the
//! final validation loss, the difference to `dense_ffn` paired by seed with its interval and
//! whether that excludes 0, the other figures as means over the seeds; then every seed's loss.

use super::stats::Spread;
use super::table::{num, Report};

fn ci(s: Option<&Spread>) -> String {
    match s.and_then(|s| s.ci95) {
        Some([lo, hi]) => format!("[{lo:.4}, {hi:.4}]"),
        None => "–".into(),
    }
}

fn mean_sd(s: Option<&Spread>) -> String {
    match s {
        Some(Spread { mean, sd: Some(sd), .. }) => format!("{mean:.4} ± {sd:.4}"),
        Some(Spread { mean, .. }) => format!("{mean:.4}"),
        None => "–".into(),
    }
}

pub fn markdown(r: &Report) -> String {
    let mut s = format!("# Router comparison\n\n{} {} seeds per run.\n\n", r.title, r.seeds);
    let base = r.baseline_name();
    s += &format!("| run | router | seeds | val loss (mean ± sd) | 95% CI | Δ vs {base} | Δ 95% CI | Δ ≠ 0 | tok/s | load CV | router entropy | top-1 prob | dropped % | dead experts | wall (s) |\n");
    s += "|---|---|---:|---:|---:|---:|---:|:-:|---:|---:|---:|---:|---:|---:|---:|\n";
    for row in &r.runs {
        let done = row.per_seed.iter().filter(|p| p.status == "ok").count();
        if row.status != "ok" {
            let log = row.log.as_deref().unwrap_or("?");
            s += &format!(
                "| {} | {} | {done} of {} | failed: see `{log}` | {} | | | | | | | | | | |\n",
                row.name,
                row.router,
                row.per_seed.len(),
                mean_sd(row.val_loss_spread.as_ref()),
            );
            continue;
        }
        let p = row.delta_paired.as_ref();
        let sig = match p {
            _ if row.name == base => "–".into(),
            Some(p) if p.diff.ci95.is_some() => if p.significant { "yes" } else { "no" }.to_string(),
            _ => "–".into(),
        };
        s += &format!(
            "| {} | {} | {done} | {} | {} | {} | {} | {sig} | {} | {} | {} | {} | {} | {} | {} |\n",
            row.name,
            row.router,
            mean_sd(row.val_loss_spread.as_ref()),
            ci(row.val_loss_spread.as_ref()),
            if row.name == base {
                "–".into()
            } else {
                row.delta_vs_baseline.map_or("–".into(), |d| format!("{d:+.4}"))
            },
            if row.name == base { "–".into() } else { ci(p.map(|p| &p.diff)) },
            num(row.tok_per_s, 0),
            num(row.load_cv, 3),
            num(row.router_entropy, 3),
            num(row.top1_prob, 3),
            num(row.dropped_pct, 2),
            row.dead_experts.map_or("–".into(), |d| d.to_string()),
            num(row.wall_s, 1),
        );
    }
    s += "\n";
    s += &sentence(r);
    s += &format!("\n\nval loss: the final validation loss of the done line (the whole validation split when \
          train.final_full_eval), mean ± sample standard deviation (n - 1) over the seeds; 95% CI: mean ± \
          t(0.975, n - 1) sd / sqrt(n). Δ vs {base}: the run's loss minus {base}'s, seed by seed \
          (seed k of each run is its base seed + k), mean and 95% CI of those differences; Δ ≠ 0 is yes \
          when that interval excludes 0. Load CV, router entropy (nats), top-1 prob, dropped %, dead \
          experts, tok/s and wall: means over the seeds (each seed's as in a one-seed report: \
          its last log line, over the MoE layers).\n\n## Final val loss per seed\n\n| run | seed: val loss |\n|---|---|\n");
    for row in &r.runs {
        let cells: Vec<String> = row
            .per_seed
            .iter()
            .map(|p| {
                let seed = p.seed.map_or("?".into(), |x| x.to_string());
                if p.status == "ok" {
                    format!("{seed}: {}", num(p.val_loss, 4))
                } else {
                    format!("{seed}: failed")
                }
            })
            .collect();
        s += &format!("| {} | {} |\n", row.name, cells.join(", "));
    }
    s
}

/// "Best run by mean over N seeds: X (...). Against dense_ffn, paired by seed: a +0.01 [lo, hi]
/// (interval excludes 0), ..." and the failed runs.
pub fn sentence(r: &Report) -> String {
    let mut s = match r.best.as_ref().and_then(|b| r.runs.iter().find(|x| &x.name == b)) {
        Some(b) => format!(
            "Best run by mean over {} seeds: **{}** (final val loss {}).",
            r.seeds,
            b.name,
            mean_sd(b.val_loss_spread.as_ref())
        ),
        None => "No run finished every seed.".to_string(),
    };
    if r.baseline.is_some() {
        let d: Vec<String> = r
            .runs
            .iter()
            .filter(|x| x.name != r.baseline_name())
            .filter_map(|x| {
                let p = x.delta_paired.as_ref()?;
                let verdict = match (p.diff.ci95.is_some(), p.significant) {
                    (false, _) => "",
                    (true, true) => ", significant",
                    (true, false) => ", not significant",
                };
                Some(format!("{} {:+.4} {}{verdict}", x.name, p.diff.mean, ci(Some(&p.diff))))
            })
            .collect();
        if !d.is_empty() {
            s += &format!(" Val loss against {}, paired by seed: {}.", r.baseline_name(), d.join("; "));
        }
    }
    let failed: Vec<&str> = r.runs.iter().filter(|x| x.status != "ok").map(|x| x.name.as_str()).collect();
    if !failed.is_empty() {
        s += &format!(" Failed (a seed or more): {}.", failed.join(", "));
    }
    s
}
