//! The `gumbel-moe` command line: train, generate, eval, compare (train several routers on one
//! budget and report), plot (a run's curves), export-hf / import-hf (transformers Mixtral and
//! Qwen2-MoE checkpoints), prepare (a corpus tokenized once into memory-mapped shards).

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use gumbel_moe::config::DEFAULT_CONFIG_NAME;
use gumbel_moe::generate::{generate_streaming, SampleConfig, MAX_NEW_TOKENS};
use gumbel_moe::nn::Ctx;
use gumbel_moe::report::{compare, plot_run, CompareArgs};
use gumbel_moe::train::schedule::tau_at;
use gumbel_moe::train::IfRunExists;
use gumbel_moe::{train::Trainer, Config};
use std::io::Write;
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
        /// TOML config file (see configs/). Without it (and without --resume) the built-in default,
        /// configs/shakespeare-char-cpu.toml, is trained.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override a config key, e.g. --set model.router.tau_min=0.3 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Output directory for metrics.jsonl and checkpoints (default runs/<config name>; with
        /// --resume, the checkpoint's own run directory). A new run refuses a directory that already
        /// holds a run.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Continue from a checkpoint directory or a run directory (its newest checkpoint). Only the
        /// newest checkpoint of a run continues in place; from an older one, branch off with --out.
        #[arg(long)]
        resume: Option<PathBuf>,
        /// Start a new run from this checkpoint's weights (fresh optimizer, schedule and step
        /// count) with --config (default: the checkpoint's config) and --set; its tokenizer is
        /// kept, and every tensor must match by name and shape.
        #[arg(long, conflicts_with = "resume")]
        init_from: Option<PathBuf>,
        /// Start afresh in an --out directory that holds an earlier run: deletes that run's
        /// checkpoints, best/, config.json, metrics.jsonl and plots first (other files are kept).
        #[arg(long)]
        overwrite: bool,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        /// Train even when the estimated training memory (printed at start) exceeds the memory
        /// available on this machine.
        #[arg(long)]
        ignore_memory_check: bool,
    },
    /// Sample text from a checkpoint.
    Generate {
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        prompt: String,
        /// Tokens to sample (at most 100000); the text is printed as it comes.
        #[arg(long, default_value_t = 500, value_parser = parse_max_new_tokens)]
        max_new_tokens: usize,
        /// Sampling temperature, finite and >= 0; 0 = greedy (always the most likely token).
        #[arg(long, default_value_t = 0.8, allow_negative_numbers = true, value_parser = parse_temperature)]
        temperature: f64,
        /// Sample only among the K most likely tokens; 0 = no limit (all tokens).
        #[arg(long, default_value_t = 200, value_name = "K")]
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
    /// Train several routers (or variants) on the same data, seed (or N seeds each: --seeds) and
    /// step budget, then write OUT/report.md, OUT/report.json, OUT/val_loss.png,
    /// OUT/train_loss.png and OUT/NAME/load.png.
    /// Finished runs with the same config are reused; unfinished ones with a checkpoint are resumed;
    /// a run whose config changed is retrained, its old folder kept in OUT/.prev/G/NAME.
    Compare {
        /// Base TOML config shared by every run.
        #[arg(long)]
        config: PathBuf,
        /// Router kinds to compare (model.router.kind), comma-separated; `dense_ffn` is the dense
        /// twin (model.moe_every=0). E.g. gumbel,softmax_topk,dense,dense_ffn.
        #[arg(long, value_delimiter = ',')]
        routers: Vec<String>,
        /// Steps per run: sets train.max_iters and train.lr_decay_iters (not with a --set of either).
        #[arg(long)]
        steps: Option<usize>,
        /// Override a config key in every run (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// An extra run NAME with these overrides on top of the base (repeatable), e.g.
        /// --variant tau03:model.router.tau_min=0.3,model.router.tau0=2.
        #[arg(long = "variant", value_name = "NAME:KEY=VALUE,...")]
        variants: Vec<String>,
        /// Seeds per run (each run trains N times, its `seed` + 0..N, in OUT/NAME and
        /// OUT/NAME.seedS); the report gives mean, sd and 95% intervals and the difference to
        /// the baseline paired by seed.
        #[arg(long, default_value_t = 1)]
        seeds: usize,
        /// The run the others are compared with (its name; default dense_ffn).
        #[arg(long)]
        baseline: Option<String>,
        /// Runs trained at once (at least 1).
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
    ExportHf(gumbel_moe::hf::cli::ExportArgs),
    ImportHf(gumbel_moe::hf::cli::ImportArgs),
    Prepare(gumbel_moe::data::prepare::PrepareArgs),
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Train { config, overrides, out, resume, init_from, overwrite, quiet, ignore_memory_check } => {
            gumbel_moe::train::memory::ignore_check(ignore_memory_check);
            let if_exists = if overwrite { IfRunExists::Overwrite } else { IfRunExists::Refuse };
            let mut trainer = match (&resume, &config) {
                (None, _) if init_from.is_some() => {
                    let from = init_from.as_deref().context("--init-from")?;
                    let stem = config.as_ref().and_then(|c| c.file_stem()).map(|s| PathBuf::from("runs").join(s));
                    let out =
                        out.or(stem).context("--init-from without --config needs --out (the new run's directory)")?;
                    Trainer::init_from(from, config.as_deref(), &overrides, &out, if_exists)?
                }
                (Some(ckpt), _) => {
                    if config.is_some() {
                        eprintln!("note: --resume uses the checkpoint's config.json; --config is ignored");
                    }
                    Trainer::resume_with(ckpt, &overrides, out.as_deref(), if_exists)?
                }
                (None, config) => {
                    let (cfg, name) = match config {
                        Some(path) => {
                            let name = path.file_stem().map(|s| s.to_string_lossy().to_string());
                            (Config::from_file(path, &overrides)?, name.unwrap_or("run".into()))
                        }
                        None => (Config::default_recipe(&overrides)?, DEFAULT_CONFIG_NAME.to_string()),
                    };
                    let out = out.unwrap_or_else(|| PathBuf::from("runs").join(name));
                    if overwrite && !gumbel_moe::train::run_dir::run_files(&out)?.is_empty() {
                        eprintln!("note: --overwrite: deleting the earlier run's files in {}", out.display());
                    }
                    Trainer::new_with(cfg, &out, &gumbel_moe::moe::build_router, if_exists)?
                }
            };
            trainer.progress = !quiet;
            let lead = trainer.comm.rank() == 0;
            let size = trainer.comm.size();
            if size > 1 {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .or_else(|_| std::env::var("HOSTNAME"))
                    .map(|h| format!(" on {}", h.trim()))
                    .unwrap_or_default();
                let rank = trainer.comm.rank();
                let (f, n) = gumbel_moe::dist::my_share(trainer.cfg.train.grad_accum, rank, size);
                let g = trainer.cfg.train.expert_parallel;
                let experts = if g > 1 {
                    let mine = gumbel_moe::moe::ExpertGroup::new(trainer.comm.clone(), g)?
                        .mine(trainer.cfg.model.moe.num_experts);
                    format!(", experts {mine:?} of each MoE layer")
                } else {
                    String::new()
                };
                // One write, so the launcher does not interleave it with another rank's.
                let line = format!(
                    "rank {rank} of {size} ({}): pid {}{host}, micro-batches {:?} of each step{experts}\n",
                    trainer.comm.kind(),
                    std::process::id(),
                    f..f + n
                );
                std::io::stderr().write_all(line.as_bytes())?;
                let (a, w) = (trainer.cfg.train.grad_accum, size);
                if lead && !gumbel_moe::train::data_parallel::exact_split(a, w) {
                    eprintln!(
                        "note: {} micro-batches per rank is not a power of two: the gradients sum in another \
                         order than one process's, so results match one process to rounding, not to the bit",
                        a / w
                    );
                }
            }
            if lead && resume.is_some() && trainer.steps_left() == 0 {
                eprintln!(
                    "note: the checkpoint is at step {}, already at or past train.max_iters = {}: nothing \
                     left to train, only the final evaluation runs (train further with --set \
                     train.max_iters=N, N > {})",
                    trainer.state.step, trainer.cfg.train.max_iters, trainer.state.step
                );
            }
            if lead {
                eprintln!(
                    "training {} parameters on {} ({} steps{}) -> {}",
                    trainer.params.num_elements(),
                    trainer.cfg.train.device,
                    trainer.cfg.train.max_iters,
                    if size > 1 { format!(", {size} ranks") } else { String::new() },
                    trainer.out_dir.display()
                );
            }
            let s = trainer.fit()?;
            if lead {
                println!(
                    "{}",
                    serde_json::json!({"event": "done", "step": s.step, "val_loss": s.val_loss, "wall_s": s.wall_s, "tok_per_s": s.tok_per_s})
                );
            }
        }
        Cmd::Generate { checkpoint, prompt, max_new_tokens, temperature, top_k, seed, device } => {
            one_process("generate")?;
            let t = Trainer::for_inference(&checkpoint, device.as_deref())?;
            let s = SampleConfig { max_new_tokens, temperature, top_k, seed };
            let tau = tau_at(&t.cfg.model.router, t.state.step as usize);
            // Each piece is flushed as it comes: Ctrl-C keeps what was printed.
            let mut out = std::io::stdout().lock();
            let mut show = |piece: &str| -> Result<()> {
                out.write_all(piece.as_bytes())?;
                Ok(out.flush()?)
            };
            generate_streaming(&t.model, &t.tokenizer, &prompt, &s, &t.device, Ctx::eval(t.cfg.seed, tau), &mut show)?;
            println!();
        }
        Cmd::Eval { checkpoint, device } => {
            // Under mpirun the validation batches are shared by the ranks; rank 0 prints.
            let t = Trainer::for_inference(&checkpoint, device.as_deref())?;
            let loss = t.full_val_loss()?;
            if t.comm.rank() != 0 {
                return Ok(());
            }
            println!("{}", serde_json::json!({"checkpoint": checkpoint, "step": t.state.step, "val_loss": loss}));
        }
        Cmd::Compare { config, routers, steps, overrides, variants, seeds, baseline, jobs, out } => {
            one_process("compare")?;
            let exe = std::env::current_exe().context("cannot find the gumbel-moe binary to run the trainings")?;
            let args = CompareArgs { config, routers, variants, sets: overrides, steps, seeds, baseline, jobs, out };
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
        Cmd::ExportHf(args) => {
            one_process("export-hf")?;
            args.run()?
        }
        Cmd::ImportHf(args) => {
            one_process("import-hf")?;
            args.run()?
        }
        Cmd::Prepare(args) => {
            one_process("prepare")?;
            args.run()?
        }
        Cmd::Plot { run_dir } => {
            one_process("plot")?;
            for p in plot_run(&run_dir)? {
                println!("{}", p.display());
            }
        }
    }
    Ok(())
}

/// Refuses a command that runs in one process when a launcher started several (they would all
/// write the same files).
fn one_process(cmd: &str) -> Result<()> {
    let w = gumbel_moe::dist::world()?;
    if w.size() > 1 {
        anyhow::bail!(
            "`{cmd}` runs in one process, but this is rank {} of {}: run it without mpirun (only `train` and `eval` \
             use several ranks)",
            w.rank(),
            w.size()
        );
    }
    Ok(())
}

/// `--max-new-tokens`: 0 ..= [`MAX_NEW_TOKENS`].
fn parse_max_new_tokens(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<u128>() {
        Ok(n) if n <= MAX_NEW_TOKENS as u128 => Ok(n as usize),
        Ok(n) => Err(format!("{n} is above the maximum of {MAX_NEW_TOKENS} new tokens per request")),
        Err(_) => Err(format!("expected a whole number of tokens, 0 to {MAX_NEW_TOKENS}, got `{s}`")),
    }
}

/// `--temperature`: a finite number >= 0.
fn parse_temperature(s: &str) -> std::result::Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(t) if t.is_finite() && t >= 0.0 => Ok(t),
        Ok(t) => Err(format!("the temperature must be finite and >= 0 (0 = greedy), got {t}")),
        Err(_) => Err(format!("the temperature must be a number >= 0 (0 = greedy), got `{s}`")),
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    gumbel_moe::train::alloc::tune_allocator();
    // Candle's backward walks the graph recursively: give it a large stack.
    let h = std::thread::Builder::new().stack_size(512 << 20).spawn(move || run(cli)).context("spawning the worker")?;
    let r = match h.join() {
        Ok(r) => r,
        Err(_) => Err(anyhow::anyhow!("the worker thread panicked")),
    };
    match (r, gumbel_moe::dist::world_if_open()) {
        // One of several ranks failed: say which, and end the whole job (the others would wait for
        // it at their next exchange).
        (Err(e), Some(w)) if w.size() > 1 => {
            // One write, so the launcher does not interleave it with another rank's.
            let line = format!("Error on rank {} of {}: {e:#}\n", w.rank(), w.size());
            let _ = std::io::stderr().write_all(line.as_bytes());
            w.abort(1)
        }
        (r, _) => {
            gumbel_moe::dist::finish();
            r
        }
    }
}
