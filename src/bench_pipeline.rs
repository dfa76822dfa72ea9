//! `tenax bench pipeline`: the single-process pipeline runtime
//! ([`Trainer::start_pipeline`]) against one rank ([`Trainer::start`]) on the same model,
//! batch and total compute threads, both schedules, several micro-batch counts M.
//!
//! Every configuration's trainer starts first; then `--rounds` rounds each give every
//! configuration `--seconds / --rounds` of timed steps, in an order rotated each round,
//! so slow phases of a noisy machine fall on all of them alike. Each round also times
//! every stage's forward and backward alone on one micro-batch ([`StageProbe`]), on the
//! threads a stage rank gets. One JSON line per configuration reports the median step
//! time, tokens/s, the bubble (measured several ways, against the textbook
//! `(S - 1) / (M + S - 1)`), and each stage's peak activation memory.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;
use tenax_actors::{PipelineSpec, TrainData, TrainSetup, Trainer};
use tenax_core::pipeline::{
    peak_in_flight, stage_ops, textbook_bubble_fraction, Op, PipelineConfig, PipelinePlan,
    Schedule, StageLayers,
};
use tenax_core::rng::SplitMix64;
use tenax_core::slots::BatchLayout;
use tenax_model::{AdamW, AdamWConfig, GptConfig, ParamLayout, StageInput, Workspace};

/// Options of `tenax bench pipeline`.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchPipelineArgs {
    /// Model preset (tiny, nano, gpt2-small).
    #[arg(long, default_value = "nano")]
    pub preset: String,
    /// Vocabulary size of the synthetic tokens (65: tinyshakespeare's char vocabulary).
    #[arg(long, default_value_t = 65)]
    pub vocab: usize,
    /// Samples per step (the same for every configuration).
    #[arg(long, default_value_t = 16)]
    pub batch_size: u64,
    /// Micro-batch slots per step M to measure (each must divide --batch-size).
    #[arg(long, value_delimiter = ',', default_value = "2,4,8")]
    pub slots: Vec<u64>,
    /// Pipeline stages S (at most the preset's blocks).
    #[arg(long, default_value_t = 2)]
    pub stages: u32,
    /// Timed seconds per configuration, spread over the rounds.
    #[arg(long, default_value_t = 15.0)]
    pub seconds: f64,
    /// Rounds: each gives every configuration `seconds / rounds` of steps.
    #[arg(long, default_value_t = 10)]
    pub rounds: u32,
    /// Untimed warm-up steps per configuration (before its first round).
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,
    /// Forward+backward passes per stage and round timed alone (the stage costs).
    #[arg(long, default_value_t = 4)]
    pub probe_reps: u32,
}

/// One measured configuration: a trainer and its step times.
struct Run {
    /// Micro-batch slots per step.
    slots: u64,
    /// Stages (1: one data-parallel rank, [`Trainer::start`]).
    stages: u32,
    /// The schedule (none for one stage).
    schedule: Option<Schedule>,
    trainer: Trainer,
    /// The next step number (also its sample cursor / batch size).
    next_step: u64,
    /// Timed step times, seconds.
    times_s: Vec<f64>,
    /// Median step time of each round, seconds.
    round_medians_s: Vec<f64>,
    /// Per timed step (pipelines): the runtime's own figures (`StepReport::stages`),
    /// `1 - sum of the stages' busy seconds / (S x the step's wall time)`.
    step_bubbles: Vec<f64>,
    /// Per timed step (pipelines): the stages' mean `StageTime::bubble` (the waits
    /// within their op lists, before the reduction).
    ops_bubbles: Vec<f64>,
    /// The last step's (sum of the stages' busy seconds, mean op-list bubble).
    last_stages: Option<(f64, f64)>,
}

/// One stage's forward and backward on one micro-batch, timed alone: the stage's
/// compute cost without the pipeline's messages, reduction or optimizer.
struct StageProbe {
    slots: u64,
    layers: StageLayers,
    ws: Workspace,
    params: Vec<f32>,
    grad: Vec<f32>,
    tokens: Vec<u32>,
    /// The input activations (every stage but the first).
    acts: Option<Vec<f32>>,
    /// The output gradient (every stage but the last).
    dout: Option<Vec<f32>>,
    /// The first stage's embedding-output gradient the head stage folds in.
    emb_dx: Vec<f32>,
    batch: usize,
    fwd_s: Vec<f64>,
    bwd_s: Vec<f64>,
    /// Per round: the median forward + backward of that round's passes.
    round_pass_s: Vec<f64>,
}

/// A trainer of a freshly initialised `model` (seed 1) on 512 windows of uniformly random
/// tokens below `vocab` (as `tenax bench train`): one rank, or one pipeline of `stages`.
async fn start_trainer(
    model: &GptConfig,
    vocab: usize,
    batch: BatchLayout,
    stages: u32,
    schedule: Option<Schedule>,
) -> Result<Trainer> {
    let layout = ParamLayout::for_config(model);
    let mut rng = SplitMix64::new(7);
    let tokens: Vec<u32> = (0..(model.block_size + 1) * 512)
        .map(|_| rng.below(vocab as u64) as u32)
        .collect();
    let data = Arc::new(TrainData::in_memory(tokens.clone(), tokens));
    let setup = TrainSetup {
        model: model.clone(),
        adamw: AdamWConfig {
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
        },
        grad_clip: 1.0,
        batch,
        seed: 1,
        ranks: stages as usize,
        step_timeout: Duration::from_secs(600),
        device: Default::default(),
    };
    let params = tenax_model::init_params(model, &layout, 1);
    let opt = AdamW::new(layout.total);
    let started = match schedule {
        None => Trainer::start(setup, data, params, opt).await,
        Some(schedule) => {
            let spec = PipelineSpec { stages, schedule };
            Trainer::start_pipeline(setup, spec, data, params, opt).await
        }
    };
    started.map_err(|e| anyhow!("{e}"))
}

impl Run {
    /// `warmup` untimed steps, then timed steps until `seconds` have passed (at least 2).
    async fn round(&mut self, batch_size: u64, seconds: f64, warmup: u64) -> Result<()> {
        for _ in 0..warmup {
            self.step(batch_size).await?;
        }
        let start = Instant::now();
        let mut times = Vec::new();
        while times.len() < 2 || start.elapsed().as_secs_f64() < seconds {
            let wall = self.step(batch_size).await?;
            times.push(wall);
            if let Some((busy, ops_bubble)) = self.last_stages.take() {
                let s = f64::from(self.stages);
                self.step_bubbles.push(1.0 - busy / (s * wall));
                self.ops_bubbles.push(ops_bubble);
            }
        }
        self.round_medians_s.push(median(&times));
        self.times_s.extend(times);
        Ok(())
    }

    /// One step; its wall time in seconds.
    async fn step(&mut self, batch_size: u64) -> Result<f64> {
        let step = self.next_step;
        self.next_step += 1;
        let t0 = Instant::now();
        let report = self
            .trainer
            .step(step, step * batch_size, 1e-3)
            .await
            .map_err(|e| anyhow!("{}: step {step}: {e}", self.name()))?;
        let wall = t0.elapsed().as_secs_f64();
        let st = &report.stages;
        self.last_stages = (!st.is_empty()).then(|| {
            let busy = st.iter().map(|t| t.busy_s).sum();
            let bubble = st.iter().map(|t| t.bubble()).sum::<f64>() / st.len() as f64;
            (busy, bubble)
        });
        Ok(wall)
    }

    fn name(&self) -> String {
        match self.schedule {
            None => format!("S=1 M={}", self.slots),
            Some(s) => format!("S={} {s} M={}", self.stages, self.slots),
        }
    }
}

impl StageProbe {
    fn new(
        model: &GptConfig,
        layers: &StageLayers,
        slots: u64,
        micro: usize,
        threads: usize,
    ) -> Self {
        let layout = ParamLayout::for_stage(model, layers);
        let mut rng = SplitMix64::new(11);
        let n = micro * model.block_size;
        let mut acts = |len: usize| -> Vec<f32> {
            (0..len).map(|_| (rng.next_normal() * 0.1) as f32).collect()
        };
        let c = model.n_embd;
        Self {
            slots,
            layers: layers.clone(),
            ws: Workspace::for_stage(model, layers, threads),
            params: tenax_model::init_params(model, &layout, 1),
            grad: vec![0.0; layout.total],
            acts: (!layers.embeddings).then(|| acts(n * c)),
            dout: (!layers.head).then(|| acts(n * c)),
            emb_dx: acts(n * c),
            tokens: (0..n).map(|i| (i % model.vocab_size) as u32).collect(),
            batch: micro,
            fwd_s: Vec::new(),
            bwd_s: Vec::new(),
            round_pass_s: Vec::new(),
        }
    }

    /// Time `reps` forwards and backwards (the gradient formed into zeros, as every slot's
    /// is, and on the head stage the tied embedding's rows folded in).
    fn sample(&mut self, reps: u32) -> Result<()> {
        let mut passes = Vec::new();
        for _ in 0..reps {
            let input = match &self.acts {
                Some(a) => StageInput::Acts(a),
                None => StageInput::Tokens(&self.tokens),
            };
            let t0 = Instant::now();
            self.ws
                .stage_forward(&self.params, input, &self.tokens, self.batch, true)?;
            self.fwd_s.push(t0.elapsed().as_secs_f64());
            let t1 = Instant::now();
            self.grad.fill(0.0);
            self.ws.stage_backward(
                &self.params,
                &self.tokens,
                self.dout.as_deref(),
                &mut self.grad,
            )?;
            if self.layers.head && !self.layers.embeddings {
                self.ws
                    .add_embedding_grad(&mut self.grad, &self.tokens, &self.emb_dx)?;
            }
            self.bwd_s.push(t1.elapsed().as_secs_f64());
            passes.push(t0.elapsed().as_secs_f64());
        }
        self.round_pass_s.push(median(&passes));
        Ok(())
    }
}

/// The median of `v` (0 when empty).
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Bytes of every buffer of one [`Workspace::for_stage`] of `layers` once it has run a
/// micro-batch of `micro` sequences of `block_size` tokens on `threads` threads. There is
/// no accessor for it: this follows `Workspace::ensure` in model/src/step.rs buffer by
/// buffer (f32s). Per block: `x, ln1, atty, res2, ln2` (n C each), `qkv` (3 n C),
/// `fch, fch_gelu, fch_dgelu` (4 n C each), four layer-norm statistics (n each) and the
/// attention probabilities `att` (micro x heads x T x T); per workspace: `x_out, lnf,
/// dres, dln, dtmp` (n C each), `dbig` (4 n C), `dqkv` (3 n C), `datt`, `lnf_mean,
/// lnf_rstd, losses` (n each), `logits` (n V, head stage only), `scratch` (2 C threads).
pub fn workspace_bytes(
    model: &GptConfig,
    layers: &StageLayers,
    micro: usize,
    threads: usize,
) -> u64 {
    let (c, t) = (model.n_embd as u64, model.block_size as u64);
    let n = micro as u64 * t;
    let att = micro as u64 * model.n_head as u64 * t * t;
    let per_block = 20 * n * c + 4 * n + att;
    let blocks = u64::from(layers.blocks.end - layers.blocks.start);
    let vocab = if layers.head {
        model.vocab_size as u64
    } else {
        0
    };
    let rest = 12 * n * c + att + 3 * n + n * vocab + 2 * c * threads.max(1) as u64;
    4 * (blocks * per_block + rest)
}

/// The makespan of one pipeline step when stage `i`'s forward takes `fwd_s[i]` and its
/// backward `bwd_s[i]`: the execution model of `tenax_core::pipeline::simulate_ops`
/// (sends never block, messages are free, receives wait for them) with a cost per
/// stage, which that function's `cost(op)` cannot express. NaN if the lists stall.
pub fn makespan_s(schedule: Schedule, slots: u32, fwd_s: &[f64], bwd_s: &[f64]) -> f64 {
    let s = fwd_s.len();
    let lists: Vec<Vec<Op>> = (0..s)
        .map(|i| stage_ops(schedule, s as u32, i as u32, slots))
        .collect();
    let (mut pc, mut clock) = (vec![0usize; s], vec![0f64; s]);
    // Messages into stage i: the times they are available, in order.
    let mut acts: Vec<VecDeque<f64>> = vec![VecDeque::new(); s];
    let mut grads: Vec<VecDeque<f64>> = vec![VecDeque::new(); s];
    let mut progressed = true;
    while progressed {
        progressed = false;
        for i in 0..s {
            while let Some(&op) = lists[i].get(pc[i]) {
                let inbox = match op {
                    Op::RecvActivation { .. } => Some(&mut acts[i]),
                    Op::RecvGrad { .. } => Some(&mut grads[i]),
                    _ => None,
                };
                if let Some(q) = inbox {
                    match q.pop_front() {
                        Some(at) => clock[i] = clock[i].max(at),
                        None => break,
                    }
                }
                match op {
                    Op::Forward { .. } => clock[i] += fwd_s[i],
                    Op::Backward { .. } => clock[i] += bwd_s[i],
                    Op::SendActivation { .. } => acts[i + 1].push_back(clock[i]),
                    Op::SendGrad { .. } => grads[i - 1].push_back(clock[i]),
                    _ => {}
                }
                pc[i] += 1;
                progressed = true;
            }
        }
    }
    match (0..s).all(|i| pc[i] == lists[i].len()) {
        true => clock.iter().copied().fold(0.0, f64::max),
        false => f64::NAN,
    }
}

/// The stage split of `model` into `stages` for `slots` slots (one pipeline).
fn stage_layers(
    model: &GptConfig,
    stages: u32,
    slots: u64,
    schedule: Schedule,
) -> Result<Vec<StageLayers>> {
    let config = PipelineConfig {
        pipelines: 1,
        stages,
        blocks: model.n_layer as u32,
        slots: slots as u32,
        schedule,
    };
    let plan = PipelinePlan::new(config, stages).map_err(|e| anyhow!("--stages {stages}: {e}"))?;
    Ok(plan.layers().to_vec())
}

/// Start every configuration's trainer and every stage probe.
async fn start_all(
    a: &BenchPipelineArgs,
    model: &GptConfig,
    threads: usize,
) -> Result<(Vec<Run>, Vec<StageProbe>)> {
    let (mut runs, mut probes) = (Vec::new(), Vec::new());
    let stage_threads = (threads / a.stages as usize).max(1);
    for &m in &a.slots {
        if m == 0 || !a.batch_size.is_multiple_of(m) {
            bail!("--slots {m}: must divide --batch-size {}", a.batch_size);
        }
        let micro = a.batch_size / m;
        let batch = BatchLayout::new(a.batch_size, micro).map_err(|e| anyhow!("{e}"))?;
        let variants = [None, Some(Schedule::GPipe), Some(Schedule::OneFOneB)];
        for schedule in variants {
            let stages = if schedule.is_some() { a.stages } else { 1 };
            let trainer = start_trainer(model, a.vocab, batch, stages, schedule)
                .await
                .with_context(|| format!("starting S={stages} M={m}"))?;
            runs.push(Run {
                slots: m,
                stages,
                schedule,
                trainer,
                next_step: 0,
                times_s: Vec::new(),
                round_medians_s: Vec::new(),
                step_bubbles: Vec::new(),
                ops_bubbles: Vec::new(),
                last_stages: None,
            });
        }
        for layers in stage_layers(model, a.stages, m, Schedule::OneFOneB)? {
            probes.push(StageProbe::new(
                model,
                &layers,
                m,
                micro as usize,
                stage_threads,
            ));
        }
    }
    Ok((runs, probes))
}

/// Run the benchmark: one JSON line per configuration (see the module docs).
pub async fn pipeline(a: BenchPipelineArgs) -> Result<()> {
    let model = GptConfig::preset(&a.preset, a.vocab).map_err(|e| anyhow!("--preset: {e}"))?;
    if a.stages < 2 || a.rounds == 0 || a.slots.is_empty() {
        bail!("--stages must be at least 2, --rounds at least 1, --slots not empty");
    }
    let threads = tenax_model::step::default_threads();
    let (mut runs, mut probes) = start_all(&a, &model, threads).await?;
    let per_round_s = a.seconds / f64::from(a.rounds);
    eprintln!(
        "bench pipeline: {} configurations x {} rounds x {per_round_s:.1} s, {threads} threads",
        runs.len(),
        a.rounds
    );
    for round in 0..a.rounds as usize {
        let k = runs.len();
        for j in 0..k {
            let run = &mut runs[(j + round) % k];
            let warmup = if round == 0 { a.warmup } else { 0 };
            run.round(a.batch_size, per_round_s, warmup).await?;
        }
        let reps = a.probe_reps;
        tokio::task::block_in_place(|| probes.iter_mut().try_for_each(|p| p.sample(reps)))?;
        eprintln!("bench pipeline: round {} of {} done", round + 1, a.rounds);
    }
    for line in report(&a, &model, threads, &runs, &probes)? {
        println!("{line}");
    }
    for run in runs {
        run.trainer.shutdown().await;
    }
    Ok(())
}

/// The JSON lines: for each M, the one-rank run, then each schedule's pipeline.
fn report(
    a: &BenchPipelineArgs,
    model: &GptConfig,
    threads: usize,
    runs: &[Run],
    probes: &[StageProbe],
) -> Result<Vec<serde_json::Value>> {
    let tokens = (a.batch_size as usize * model.block_size) as f64;
    let params = ParamLayout::for_config(model).total;
    let whole = stage_layers(model, 1, 1, Schedule::GPipe)?.remove(0);
    let mut lines = Vec::new();
    for &m in &a.slots {
        let micro = (a.batch_size / m) as usize;
        let single = runs
            .iter()
            .find(|r| r.slots == m && r.schedule.is_none())
            .context("the one-rank run")?;
        let t1 = median(&single.times_s);
        lines.push(json!({
            "bench": "pipeline", "preset": a.preset, "params": params, "batch_size": a.batch_size,
            "micro_batch_size": micro, "slots": m, "stages": 1, "schedule": null,
            "threads_total": threads, "threads_per_rank": threads,
            "steps": single.times_s.len(), "ms_per_step_median": t1 * 1e3,
            "ms_round_medians": ms(&single.round_medians_s), "tokens_per_s": tokens / t1,
            "workspace_bytes": workspace_bytes(model, &whole, micro, threads),
        }));
        let mine: Vec<&StageProbe> = probes.iter().filter(|p| p.slots == m).collect();
        for run in runs.iter().filter(|r| r.slots == m && r.schedule.is_some()) {
            lines.push(pipeline_line(a, model, threads, run, single, &mine));
        }
    }
    Ok(lines)
}

/// Seconds to milliseconds, for a list.
fn ms(v: &[f64]) -> Vec<f64> {
    v.iter().map(|s| s * 1e3).collect()
}

/// One pipelined configuration's line: throughput, bubble several ways, memory per stage.
///
/// - `bubble_measured`: `1 - (T1 / S) / T_S` with the median step times T1 (one rank,
///   all threads) and T_S; it assumes balanced stages and that T1 on S times the threads
///   of a stage is S times faster than one stage's thread, so it also counts the
///   pipeline's messages, reduction and optimizer, and T1's thread scaling.
/// - `bubble_measured_paired`: the same from the median of the per-round speedups.
/// - `bubble_from_stage_costs`: `1 - M sum_i (f_i + b_i) / (S T_S)`, the share of the
///   stages' wall time not spent in their forwards and backwards, with `f_i`, `b_i` each
///   stage's forward and backward timed alone on its own threads: no thread-scaling term.
/// - `bubble_from_stage_costs_paired`: the same within each round (that round's step
///   and stage-cost medians), then the median over the rounds.
/// - `bubble_runtime_step`, `bubble_runtime_ops`: from the runtime's own per-stage
///   times (`StepReport::stages`), the median over steps of `1 - sum_i busy_i / (S x
///   step wall time)` and of the stages' mean waits within their op lists.
/// - `bubble_sim_stage_costs`: the same over [`makespan_s`] of those costs instead of
///   T_S: the schedule's bubble with the measured (im)balance, messages free.
fn pipeline_line(
    a: &BenchPipelineArgs,
    model: &GptConfig,
    threads: usize,
    run: &Run,
    single: &Run,
    probes: &[&StageProbe],
) -> serde_json::Value {
    let t1 = median(&single.times_s);
    // The speedup within each round (the same stretch of machine load), then its median.
    let ratios: Vec<f64> = (single.round_medians_s.iter().zip(&run.round_medians_s))
        .map(|(a, b)| a / b)
        .collect();
    let paired = median(&ratios);
    // The stage-cost bubble within each round, then its median.
    let busy_rounds: Vec<f64> = (0..run.round_medians_s.len())
        .map(|k| {
            let busy: f64 = probes.iter().filter_map(|p| p.round_pass_s.get(k)).sum();
            1.0 - f64::from(run.slots as u32) * busy
                / (f64::from(run.stages) * run.round_medians_s[k])
        })
        .collect();
    let schedule = run.schedule.unwrap_or_default();
    let (s, m) = (run.stages, run.slots as u32);
    let micro = (a.batch_size / run.slots) as usize;
    let stage_threads = (threads / s as usize).max(1);
    let ts = median(&run.times_s);
    let tokens = (a.batch_size as usize * model.block_size) as f64;
    let fwd: Vec<f64> = probes.iter().map(|p| median(&p.fwd_s)).collect();
    let bwd: Vec<f64> = probes.iter().map(|p| median(&p.bwd_s)).collect();
    let busy: f64 = fwd
        .iter()
        .zip(&bwd)
        .map(|(f, b)| f64::from(m) * (f + b))
        .sum();
    let sim = makespan_s(schedule, m, &fwd, &bwd);
    let peaks: Vec<usize> = (0..s)
        .map(|i| peak_in_flight(&stage_ops(schedule, s, i, m)))
        .collect();
    let ws: Vec<u64> = probes
        .iter()
        .map(|p| workspace_bytes(model, &p.layers, micro, stage_threads))
        .collect();
    let peak_bytes: Vec<u64> = peaks.iter().zip(&ws).map(|(&k, &b)| k as u64 * b).collect();
    let blocks: Vec<[u32; 2]> = probes
        .iter()
        .map(|p| [p.layers.blocks.start, p.layers.blocks.end])
        .collect();
    json!({
        "bench": "pipeline", "preset": a.preset, "batch_size": a.batch_size,
        "micro_batch_size": micro, "slots": m, "stages": s, "schedule": schedule.as_str(),
        "threads_total": threads, "threads_per_rank": stage_threads, "stage_blocks": blocks,
        "steps": run.times_s.len(), "ms_per_step_median": ts * 1e3,
        "ms_round_medians": ms(&run.round_medians_s), "tokens_per_s": tokens / ts,
        "speedup_vs_s1": t1 / ts, "speedup_vs_s1_paired": paired,
        "bubble_theory": textbook_bubble_fraction(s, m),
        "bubble_measured": 1.0 - (t1 / f64::from(s)) / ts,
        "bubble_measured_paired": 1.0 - paired / f64::from(s),
        "bubble_from_stage_costs": 1.0 - busy / (f64::from(s) * ts),
        "bubble_from_stage_costs_paired": median(&busy_rounds),
        "bubble_sim_stage_costs": 1.0 - busy / (f64::from(s) * sim),
        "bubble_runtime_step": median(&run.step_bubbles),
        "bubble_runtime_ops": median(&run.ops_bubbles),
        "ms_sim_step": sim * 1e3, "ms_stage_fwd": ms(&fwd), "ms_stage_bwd": ms(&bwd),
        "peak_in_flight": peaks, "workspace_bytes": ws, "peak_activation_bytes": peak_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Uniform stage costs give the textbook makespan `(M + S - 1)(f + b)` for both
    /// schedules; a slower stage stretches it.
    #[test]
    fn makespan_matches_the_textbook_for_balanced_stages() {
        for schedule in Schedule::ALL {
            for (s, m) in [(2usize, 1u32), (2, 4), (3, 8), (4, 2)] {
                let got = makespan_s(schedule, m, &vec![1.0; s], &vec![2.0; s]);
                assert_eq!(
                    got,
                    f64::from(m + s as u32 - 1) * 3.0,
                    "{schedule} S={s} M={m}"
                );
            }
            let slow = makespan_s(schedule, 4, &[1.0, 2.0], &[2.0, 4.0]);
            assert!(slow > 5.0 * 3.0, "{schedule}: {slow}");
        }
    }

    /// The head stage counts the logits; a stage with more blocks counts more.
    #[test]
    fn workspace_bytes_follow_the_shape() {
        let model = GptConfig::preset("nano", 65).unwrap();
        let layers = stage_layers(&model, 2, 4, Schedule::GPipe).unwrap();
        let first = workspace_bytes(&model, &layers[0], 4, 1);
        let last = workspace_bytes(&model, &layers[1], 4, 1);
        assert_eq!(last - first, 4 * 4 * 64 * 65);
        let whole = stage_layers(&model, 1, 4, Schedule::GPipe)
            .unwrap()
            .remove(0);
        assert!(workspace_bytes(&model, &whole, 4, 1) > last);
    }
}
