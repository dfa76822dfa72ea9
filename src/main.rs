//! tenax: pre-train GPT-style language models, and keep training when machines fail.
//!
//! This binary only wires subcommands to the crates that do the work:
//! `train` (src/train.rs), `ckpt` (src/ckpt.rs), `bench` (src/bench.rs).

mod bench;
mod ckpt;
mod config;
mod plot;
mod train;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Pre-train GPT-style language models that keep training when machines fail.
#[derive(Parser, Debug)]
#[command(name = "tenax", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a GPT in this process (N data-parallel ranks, local checkpoints).
    ///
    /// With no flags it trains the `nano` preset for 500 steps on a built-in corpus
    /// (the Rust sources of tenax's dependencies) and writes runs/default/.
    Train {
        /// TOML file with the same keys as the flags (snake_case); flags win.
        #[arg(long, value_name = "FILE.toml")]
        config: Option<PathBuf>,
        /// Continue from the newest checkpoint of the store that verifies.
        #[arg(long)]
        resume: bool,
        #[command(flatten)]
        args: Box<config::TrainArgs>,
    },
    /// List, inspect and verify checkpoints in a store (file://, s3://).
    Ckpt {
        #[command(subcommand)]
        command: CkptCommand,
    },
    /// Benchmarks that print one JSON line.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Subcommand, Debug)]
enum CkptCommand {
    /// Every checkpoint in the store, oldest first, and attempts that never committed.
    List {
        /// Store URL, e.g. file:///abs/runs/default/checkpoints.
        url: String,
    },
    /// The manifest of the newest checkpoint (or of --step).
    Inspect {
        /// Store URL.
        url: String,
        /// Which step (default: the newest).
        #[arg(long)]
        step: Option<u64>,
    },
    /// Re-read and re-hash every checkpoint (or --step's); exits 1 if any is bad.
    Verify {
        /// Store URL.
        url: String,
        /// Which step (default: all).
        #[arg(long)]
        step: Option<u64>,
    },
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Training throughput (tokens/s) on synthetic data.
    Train(bench::BenchTrainArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TENAX_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Train {
                config,
                resume,
                args,
            } => {
                let args = match config {
                    Some(path) => (*args).or(config::TrainArgs::from_toml_file(&path)?),
                    None => *args,
                };
                train::run(args, resume).await
            }
            Command::Ckpt { command } => match command {
                CkptCommand::List { url } => ckpt::list(&url).await,
                CkptCommand::Inspect { url, step } => ckpt::inspect(&url, step).await,
                CkptCommand::Verify { url, step } => ckpt::verify(&url, step).await,
            },
            Command::Bench { command } => match command {
                BenchCommand::Train(a) => bench::train(a).await,
            },
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
