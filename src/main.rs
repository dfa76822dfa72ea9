//! tenax: pre-train GPT-style language models, and keep training when machines fail.
//!
//! This binary only wires subcommands to the crates that do the work:
//! `train` (src/train.rs), `daemon` (src/daemon.rs), `status` and `control`
//! (src/status.rs), `ckpt` (src/ckpt.rs), `bench` (src/bench.rs, and src/bench_*.rs), `chaos` (src/chaos.rs),
//! `data` (src/data_cmd.rs), `certs` (src/certs.rs), `eval memorisation` and the canaries of
//! `train --canaries` (src/memorisation.rs);
//! test-only fault hooks and their guard in src/hooks.rs.

mod bench;
mod bench_ckpt;
mod bench_cluster;
mod bench_gpu;
mod bench_pipeline;
mod bench_state;
mod bench_stream;
mod certs;
mod chaos;
mod ckpt;
mod config;
mod daemon;
mod data_cmd;
mod etcd_args;
mod hooks;
mod malloc;
mod memorisation;
mod metrics;
mod plot;
mod status;
mod stream;
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
    /// Train a GPT in this process (N data-parallel ranks, checkpoints to any store).
    ///
    /// With no flags it trains the `nano` preset for 6000 steps on a built-in corpus
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
    /// Run one node of a distributed job: join it through etcd, train with the other
    /// nodes, checkpoint to <store>/<job>/, serve control gRPC and /metrics.
    ///
    /// Start one per node with the same --job, --etcd, --store and training flags; the
    /// job starts once --start-nodes have joined and ends (exit 0) at --steps, after the
    /// final checkpoint. Starting the nodes again resumes from the last committed
    /// checkpoint. SIGTERM drains the node with a final checkpoint.
    Daemon(Box<daemon::DaemonArgs>),
    /// Show a job's members, generation, step, loss and checkpoints (asks each node).
    Status(status::StatusArgs),
    /// Ask a node to drain, checkpoint now, pause or resume.
    Control {
        #[command(subcommand)]
        command: status::ControlCommand,
    },
    /// List, inspect, verify, prune, export and evaluate checkpoints in a store (file://, s3://).
    ///
    /// S3 is configured by the standard environment: AWS_ENDPOINT, AWS_ALLOW_HTTP,
    /// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION (default us-east-1).
    Ckpt {
        #[command(subcommand)]
        command: CkptCommand,
    },
    /// Prove a cluster survives faults: seeded chaos scenarios with invariant checks and a
    /// report, or a local demo cluster to break by hand.
    Chaos {
        #[command(subcommand)]
        command: chaos::ChaosCommand,
    },
    /// Make the cluster CA and the node and operator certificates of mutual TLS.
    ///
    /// `tenax certs init --out DIR` once, then `tenax certs issue --ca DIR --node ID` per
    /// node and `--operator NAME` per operator.
    Certs {
        #[command(subcommand)]
        command: certs::CertsCommand,
    },
    /// Prepare pre-training data: dedup, filter, scrub and tokenize sources into shards.
    Data {
        #[command(subcommand)]
        command: data_cmd::DataCommand,
    },
    /// Evaluate what a trained model holds: `tenax eval memorisation RUN_OR_CKPT`.
    Eval {
        #[command(subcommand)]
        command: EvalCommand,
    },
    /// Benchmarks that print one JSON line.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Subcommand, Debug)]
enum CkptCommand {
    /// Every save attempt in the store, oldest first: committed, incomplete or corrupt.
    ///
    /// Reads the manifests and compares file sizes with the listing; `verify` re-hashes.
    List {
        /// Store URL, e.g. file:///abs/runs/default/checkpoints or s3://bucket/prefix.
        url: String,
        /// One JSON array, an object per attempt: step, generation, attempt, status,
        /// bytes, url, folder (and created_unix_ms, data_cursor, problem where known).
        #[arg(long)]
        json: bool,
    },
    /// The manifest of the newest checkpoint (or of --step, or of the checkpoint URL given).
    Inspect {
        /// Store URL, or one checkpoint's URL (<store>/step-...).
        url: String,
        /// Which step (default: the newest).
        #[arg(long)]
        step: Option<u64>,
    },
    /// Re-read and re-hash every checkpoint (or --step's, or the one given); exits 1 naming
    /// each bad file.
    Verify {
        /// Store URL, or one checkpoint's URL.
        url: String,
        /// Which step (default: all).
        #[arg(long)]
        step: Option<u64>,
        /// Accept only manifests signed by this ed25519 public key (FILE.pub of `tenax ckpt
        /// keygen`): unsigned ones, or signed by another key, or edited after signing, are BAD.
        #[arg(long, value_name = "FILE.pub")]
        trust_key: Option<PathBuf>,
    },
    /// Delete old checkpoints: keep the newest K and every Mth; never the newest good one.
    ///
    /// The newest checkpoints are re-hashed until one verifies; that one is always kept.
    /// Attempts that never committed are deleted once older than --min-age-s. Each folder
    /// is deleted manifest first, so an interrupted prune never leaves a torn checkpoint.
    Prune {
        /// Store URL.
        url: String,
        /// Keep the newest K committed checkpoints (0: keep all committed).
        #[arg(long, value_name = "K")]
        keep_last: usize,
        /// Also keep checkpoints whose step is a multiple of M (0: off).
        #[arg(long, value_name = "M", default_value_t = 0)]
        keep_every: u64,
        /// Incomplete attempts younger than this may still be being written: kept.
        #[arg(long, value_name = "SECONDS", default_value_t = 3600)]
        min_age_s: u64,
        /// Print what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Write a checkpoint's model weights: one safetensors file, or a Hugging Face directory.
    ///
    /// From the newest good checkpoint of a store, or from --step, or from the checkpoint
    /// URL given. `--format safetensors` (default): one file, names as in the model
    /// (wte.weight, h.00.attn.c_attn.weight, ...); identical weights give a byte-identical
    /// file. `--format hf`: a directory that transformers'
    /// `GPT2LMHeadModel.from_pretrained(DIR)` loads as it is: config.json (gpt2, exact
    /// "gelu", layer_norm_epsilon 1e-5, tied embeddings), model.safetensors with
    /// transformers' names (transformer.h.0.attn.c_attn.weight, ...), and the tokenizer:
    /// for gpt2, GPT-2's vocab.json and merges.txt (AutoTokenizer loads them); for bytes
    /// and char, which transformers has no tokenizer for, tenax_tokenizer.json saying how
    /// ids map to text (bytes: id i is byte i; char: an id-to-character table).
    Export {
        /// Store URL, or one checkpoint's URL.
        url: String,
        /// Which step (default: the newest that verifies).
        #[arg(long)]
        step: Option<u64>,
        /// Output file (safetensors) or directory (hf).
        #[arg(long, value_name = "FILE.safetensors|DIR")]
        out: PathBuf,
        /// What to write: safetensors (one file) or hf (a transformers GPT-2 directory).
        #[arg(long, value_enum, default_value_t = ckpt::ExportFormat::Safetensors)]
        format: ckpt::ExportFormat,
        /// Export only a checkpoint whose manifest is signed by this ed25519 public key
        /// (FILE.pub of `tenax ckpt keygen`); from a store, the newest one that is.
        #[arg(long, value_name = "FILE.pub")]
        trust_key: Option<PathBuf>,
    },
    /// A checkpoint's loss on a text: mean next-token cross-entropy in nats per token.
    ///
    /// The text is encoded with the checkpoint's tokenizer and cut into windows of block
    /// size + 1 tokens overlapping by one (every token after the first predicted once; a
    /// remainder shorter than a window is left out). scripts/hf-check compares it with
    /// transformers' loss on the same tokens.
    Eval {
        /// Store URL, or one checkpoint's URL.
        url: String,
        /// Which step (default: the newest that verifies).
        #[arg(long)]
        step: Option<u64>,
        /// The text file (UTF-8).
        #[arg(long, value_name = "FILE")]
        text: PathBuf,
        /// One JSON object: loss, counts, and the token ids evaluated.
        #[arg(long)]
        json: bool,
        /// Evaluate only a checkpoint signed by this ed25519 public key (FILE.pub).
        #[arg(long, value_name = "FILE.pub")]
        trust_key: Option<PathBuf>,
    },
    /// Write a new ed25519 key pair for signing checkpoint manifests: FILE (private, mode
    /// 0600, for --sign-key) and FILE.pub (public, for --trust-key). Never overwrites.
    Keygen {
        /// The private key file; the public key goes to FILE.pub.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum EvalCommand {
    /// Memorisation: the exposure of the run's canaries (with `tenax train --canaries`)
    /// and verbatim extraction: greedy-decode k tokens after a k-token prefix of training
    /// sequences, and of validation ones as a baseline; the share reproduced exactly.
    Memorisation(memorisation::MemorisationArgs),
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Training throughput (tokens/s) on synthetic data.
    Train(bench::BenchTrainArgs),
    /// Kill -9 training runs during saves; count torn loads (must be 0).
    ///
    /// Runs checkpoint every step; each is killed at a seeded random moment and resumed
    /// until it finishes, and every finished run must match a run never killed, bit for
    /// bit.
    CkptKill(bench::BenchCkptKillArgs),
    /// Training stall per checkpoint save; upload/restore throughput versus plain puts/gets.
    ///
    /// The ratios compare our save and load with plain object_store puts and gets of the
    /// same bytes to the same store, side by side.
    Ckpt(bench::BenchCkptArgs),
    /// Step time of N daemons (processes + gRPC; exact and ring reduction) against
    /// `tenax train --ranks N` in one process, on this machine (starts etcd and moto).
    Daemons(bench::BenchDaemonsArgs),
    /// Membership on etcd: time and etcd requests to re-form N members after one leaves.
    ///
    /// N members form a generation, one lease is revoked; reform_s runs until every
    /// member has observed the next generation.
    Rendezvous(bench::BenchRendezvousArgs),
    /// SIGKILL one of N daemons at a time: time to the survivors' first step in the next
    /// generation (p50, p99), steps lost per failure, and the restarted daemon's state
    /// copy from a peer (starts etcd and moto).
    Recovery(bench::BenchRecoveryArgs),
    /// Throughput of a joining daemon's state copy from a peer: a donor process and this
    /// one on loopback, over the peer data plane (gRPC FetchState and the state stream,
    /// each without and with mutual TLS) against bare TCP and TLS sockets.
    StateCopy(bench::BenchStateCopyArgs),
    /// Pipeline parallelism in one process: tokens/s of S stages against one rank (same
    /// model, batch and total threads), GPipe and 1F1B, for several micro-batch counts;
    /// the bubble against (S-1)/(M+S-1); each stage's peak activation memory.
    Pipeline(bench_pipeline::BenchPipelineArgs),
    /// Training on a prepared dataset streamed from S3 (moto, started here) against the
    /// in-memory path, side by side: tokens/s of each, RSS over the streamed steps, shards
    /// fetched and crossed, with a dataset many times the prefetch budget.
    Stream(bench_stream::BenchStreamArgs),
    /// The GPU path on one device: measured bf16 matmul peak, tokens/s and MFU of nano
    /// and gpt2-small with the whole step on the device (bf16, f32 master weights), and
    /// the CPU trainer's losses against the device's in f32 and bf16 on the same batches.
    ///
    /// Needs a build with `--features cuda` and a GPU (scripts/gpu-check runs it there);
    /// `--device cpu` runs the same on candle's CPU device.
    Gpu(bench_gpu::BenchGpuArgs),
    /// The donor process of `bench state-copy` (internal).
    #[command(hide = true)]
    StateDonor(bench::StateDonorArgs),
}

fn main() -> ExitCode {
    // Before any thread starts: the allocator settings of a long-lived process (see
    // src/malloc.rs; a variable the operator set wins).
    if let Err(line) = malloc::tune() {
        eprintln!("error: {line}");
        return ExitCode::FAILURE;
    }
    // Before anything runs: a hook variable this build cannot honour is an error, never
    // silently ignored (see src/hooks.rs).
    let names: Vec<String> = std::env::vars_os()
        .map(|(name, _)| name.to_string_lossy().into_owned())
        .collect();
    if let Err(line) = hooks::check_env(names.iter().map(String::as_str), hooks::compiled()) {
        eprintln!("error: {line}");
        return ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    // One rustls crypto provider for every TLS client and server of the process.
    tenax_cluster::tls::install_crypto_provider();
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
            Command::Daemon(args) => daemon::run(*args).await,
            Command::Status(args) => status::status(args).await,
            Command::Control { command } => status::control(command).await,
            Command::Ckpt { command } => match command {
                CkptCommand::List { url, json } => ckpt::list(&url, json).await,
                CkptCommand::Inspect { url, step } => ckpt::inspect(&url, step).await,
                CkptCommand::Verify {
                    url,
                    step,
                    trust_key,
                } => ckpt::verify(&url, step, trust_key.as_deref()).await,
                CkptCommand::Prune {
                    url,
                    keep_last,
                    keep_every,
                    min_age_s,
                    dry_run,
                } => ckpt::prune(&url, keep_last, keep_every, min_age_s, dry_run).await,
                CkptCommand::Export {
                    url,
                    step,
                    out,
                    format,
                    trust_key,
                } => ckpt::export(&url, step, &out, format, trust_key.as_deref()).await,
                CkptCommand::Eval {
                    url,
                    step,
                    text,
                    json,
                    trust_key,
                } => ckpt::eval(&url, step, &text, json, trust_key.as_deref()).await,
                CkptCommand::Keygen { out } => ckpt::keygen(&out),
            },
            Command::Chaos { command } => match command {
                chaos::ChaosCommand::Run(a) => chaos::run(a).await,
                chaos::ChaosCommand::Up(a) => chaos::up(a).await,
                chaos::ChaosCommand::Report(a) => chaos::report(a),
            },
            Command::Certs { command } => certs::run(command),
            Command::Data { command } => match command {
                data_cmd::DataCommand::Prepare(a) => data_cmd::prepare(a).await,
                data_cmd::DataCommand::Report(a) => data_cmd::report(a).await,
            },
            Command::Eval { command } => match command {
                EvalCommand::Memorisation(a) => memorisation::eval(a).await,
            },
            Command::Bench { command } => match command {
                BenchCommand::Train(a) => bench::train(a).await,
                BenchCommand::CkptKill(a) => bench::ckpt_kill(a).await,
                BenchCommand::Ckpt(a) => bench::ckpt(a).await,
                BenchCommand::Daemons(a) => bench::daemons(a).await,
                BenchCommand::Rendezvous(a) => bench::rendezvous(a).await,
                BenchCommand::Recovery(a) => bench::recovery(a).await,
                BenchCommand::StateCopy(a) => bench::state_copy(a).await,
                BenchCommand::StateDonor(a) => bench::state_donor(a).await,
                BenchCommand::Pipeline(a) => bench_pipeline::pipeline(a).await,
                BenchCommand::Stream(a) => bench_stream::stream(a).await,
                BenchCommand::Gpu(a) => {
                    tokio::task::spawn_blocking(move || bench_gpu::gpu(a)).await?
                }
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
