//! Training-step throughput of a config on this machine: forward, backward and optimizer time per
//! step and tokens per second, after warm-up. Baseline in the same run: the dense twin
//! (`model.moe_every=0`), so the MoE overhead shows as a ratio.
//!
//! `cargo run --release --example bench_step -- [CONFIG] [STEPS] [--set k=v ...]`

#[path = "common/step_timer.rs"]
mod step_timer;

use anyhow::Result;
use gumbel_moe::Config;
use step_timer::time_steps;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args.first().cloned().unwrap_or_else(|| "configs/shakespeare-char-cpu.toml".into());
    let steps: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(20);
    let sets: Vec<String> = args.iter().skip(2).filter(|a| a.contains('=')).cloned().collect();
    println!("| model | fwd ms | bwd ms | opt ms | step ms | tok/s |");
    println!("|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for (name, extra) in [("moe (config)", None), ("dense twin", Some("model.moe_every=0"))] {
        let mut o = sets.clone();
        o.extend(extra.map(String::from));
        let cfg = Config::from_file(path.as_ref(), &o)?;
        let tm = time_steps(cfg, 3, steps)?;
        let n = steps as f64;
        let step_s = tm.total() / n;
        let tok_s = tm.tok_per_s();
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} |",
            tm.fwd / n * 1e3,
            tm.bwd / n * 1e3,
            tm.opt / n * 1e3,
            step_s * 1e3,
            tok_s
        );
        rows.push(tok_s);
    }
    println!("\nMoE / dense-twin throughput ratio: {:.2}", rows[0] / rows[1]);
    Ok(())
}
