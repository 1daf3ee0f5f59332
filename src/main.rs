//! The `gumbel-moe` command line: train, generate, eval, compare (train several routers on one
//! budget and report), plot (a run's curves).

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use gumbel_moe::generate::{generate, SampleConfig};
use gumbel_moe::nn::Ctx;
use gumbel_moe::report::{compare, plot_run, CompareArgs};
use gumbel_moe::train::schedule::tau_at;
use gumbel_moe::{train::Trainer, Config};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "gumbel-moe", version, about = "Train sparse MoE language models with a Gumbel-Softmax router")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a model from a config (or continue one with --resume).
    Train {
        /// TOML config file (see configs/). Optional with --resume.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override a config key, e.g. --set model.router.tau_min=0.3 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Output directory for metrics.jsonl and checkpoints (default runs/<config name>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Continue from a checkpoint directory or a run directory (its newest checkpoint).
        #[arg(long)]
        resume: Option<PathBuf>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Sample text from a checkpoint.
    Generate {
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 500)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = 0.8)]
        temperature: f64,
        #[arg(long, default_value_t = 200)]
        top_k: usize,
        #[arg(long, default_value_t = 1337)]
        seed: u64,
        /// Device override (cpu, cuda, metal).
        #[arg(long)]
        device: Option<String>,
    },
    /// Validation loss of a checkpoint over the whole validation split.
    Eval {
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        device: Option<String>,
    },
    /// Train several routers (or variants) on the same data, seed and step budget, then write
    /// OUT/report.md, OUT/report.json, OUT/val_loss.png, OUT/train_loss.png and OUT/NAME/load.png.
    /// Finished runs with the same config are reused; unfinished ones with a checkpoint are resumed.
    Compare {
        /// Base TOML config shared by every run.
        #[arg(long)]
        config: PathBuf,
        /// Router kinds to compare (model.router.kind), comma-separated; `dense_ffn` is the dense
        /// twin (model.moe_every=0). E.g. gumbel,softmax_topk,dense,dense_ffn.
        #[arg(long, value_delimiter = ',')]
        routers: Vec<String>,
        /// Steps per run: sets train.max_iters and train.lr_decay_iters.
        #[arg(long)]
        steps: Option<usize>,
        /// Override a config key in every run (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// An extra run NAME with these overrides on top of the base (repeatable), e.g.
        /// --variant tau03:model.router.tau_min=0.3,model.router.tau0=2.
        #[arg(long = "variant", value_name = "NAME:KEY=VALUE,...")]
        variants: Vec<String>,
        /// Runs trained at once.
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        /// Output folder: one subfolder per run, plus the report and plots.
        #[arg(long)]
        out: PathBuf,
    },
    /// Draw RUN_DIR/val_loss.png, RUN_DIR/train_loss.png and RUN_DIR/load.png from RUN_DIR/metrics.jsonl.
    Plot {
        /// A run folder (holding metrics.jsonl).
        run_dir: PathBuf,
    },
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Train { config, overrides, out, resume, quiet } => {
            let mut trainer = match (&resume, &config) {
                (Some(ckpt), _) => {
                    if config.is_some() {
                        eprintln!("note: --resume uses the checkpoint's config.json; --config is ignored");
                    }
                    Trainer::resume(ckpt, &overrides, out.as_deref())?
                }
                (None, Some(path)) => {
                    let cfg = Config::from_file(path, &overrides)?;
                    let name = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or("run".into());
                    let out = out.unwrap_or_else(|| PathBuf::from("runs").join(name));
                    Trainer::new(cfg, &out)?
                }
                (None, None) => anyhow::bail!("train needs --config FILE or --resume DIR"),
            };
            trainer.progress = !quiet;
            eprintln!(
                "training {} parameters on {} ({} steps) -> {}",
                trainer.params.num_elements(),
                trainer.cfg.train.device,
                trainer.cfg.train.max_iters,
                trainer.out_dir.display()
            );
            let s = trainer.fit()?;
            println!(
                "{}",
                serde_json::json!({"event": "done", "step": s.step, "val_loss": s.val_loss, "wall_s": s.wall_s, "tok_per_s": s.tok_per_s})
            );
        }
        Cmd::Generate { checkpoint, prompt, max_new_tokens, temperature, top_k, seed, device } => {
            let t = Trainer::for_inference(&checkpoint, device.as_deref())?;
            let s = SampleConfig { max_new_tokens, temperature, top_k, seed };
            let tau = tau_at(&t.cfg.model.router, t.state.step as usize);
            let text = generate(&t.model, &t.tokenizer, &prompt, &s, &t.device, Ctx::eval(t.cfg.seed, tau))?;
            println!("{text}");
        }
        Cmd::Eval { checkpoint, device } => {
            let t = Trainer::for_inference(&checkpoint, device.as_deref())?;
            let loss = t.full_val_loss()?;
            println!("{}", serde_json::json!({"checkpoint": checkpoint, "step": t.state.step, "val_loss": loss}));
        }
        Cmd::Compare { config, routers, steps, overrides, variants, jobs, out } => {
            let exe = std::env::current_exe().context("cannot find the gumbel-moe binary to run the trainings")?;
            let args = CompareArgs { config, routers, variants, sets: overrides, steps, jobs, out };
            let report = compare(&exe, &args)?;
            let failed: Vec<&str> = report.runs.iter().filter(|r| r.status != "ok").map(|r| r.name.as_str()).collect();
            if !failed.is_empty() {
                // The report is written; the exit status still tells scripts that runs failed.
                anyhow::bail!(
                    "{} of {} runs failed: {} (see their train.log)",
                    failed.len(),
                    report.runs.len(),
                    failed.join(", ")
                );
            }
        }
        Cmd::Plot { run_dir } => {
            for p in plot_run(&run_dir)? {
                println!("{}", p.display());
            }
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Candle's backward walks the graph recursively: give it a large stack.
    let h = std::thread::Builder::new().stack_size(512 << 20).spawn(move || run(cli)).context("spawning the worker")?;
    match h.join() {
        Ok(r) => r,
        Err(_) => anyhow::bail!("the worker thread panicked"),
    }
}
