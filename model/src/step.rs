//! The GPT's training step without an autograd graph: a hand-written forward and
//! backward pass over flat parameters, built from the fused kernels of
//! [`crate::kernels`], with every activation in a [`Workspace`] that is allocated once and
//! reused every step.
//!
//! It computes exactly the model of [`crate::Gpt`] (same parameters, same layout, same
//! summed cross-entropy), and is what the trainer runs; `Gpt`'s candle graph stays the
//! reference the tests compare it with. The result does not depend on the thread count:
//! see [`crate::kernels`].

#![warn(clippy::undocumented_unsafe_blocks)]

use std::ops::Range;

use rayon::prelude::*;

use crate::config::GptConfig;
use crate::error::ModelError;
use crate::gpt::{check_flat_len, check_inputs_and_targets};
use crate::kernels::{self, Mat};
use crate::params::{block_prefix, ParamLayout};
use tenax_core::pipeline::StageLayers;

/// The whole model as one stage: every block, the embeddings and the head.
fn whole_model(config: &GptConfig) -> StageLayers {
    StageLayers {
        stage: 0,
        blocks: 0..config.n_layer as u32,
        embeddings: true,
        head: true,
    }
}

/// What a stage's forward pass reads: token ids (the stage with the embeddings) or the
/// previous stage's output activations, `(batch * t, C)`.
#[derive(Clone, Copy, Debug)]
pub enum StageInput<'a> {
    /// Token ids, `batch * t`.
    Tokens(&'a [u32]),
    /// Activations, `batch * t * C`.
    Acts(&'a [f32]),
}

/// The compute threads of a process: `CANDLE_NUM_THREADS` when set (the variable
/// candle's own kernels read), else one per available CPU.
pub fn default_threads() -> usize {
    std::env::var("CANDLE_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Where one block's parameters live in the flat vector.
#[derive(Clone, Debug)]
struct BlockParams {
    ln1_w: Range<usize>,
    ln1_b: Range<usize>,
    attn_w: Range<usize>,
    attn_b: Range<usize>,
    proj_w: Range<usize>,
    proj_b: Range<usize>,
    ln2_w: Range<usize>,
    ln2_b: Range<usize>,
    fc_w: Range<usize>,
    fc_b: Range<usize>,
    fcproj_w: Range<usize>,
    fcproj_b: Range<usize>,
}

/// Where every parameter of a stage lives in its flat vector (the whole model is the
/// one stage that holds everything). Parameters a stage does not hold have empty ranges.
#[derive(Clone, Debug)]
struct Offsets {
    /// The stage holds the embeddings: it embeds tokens (else its input is activations).
    embed: bool,
    /// The stage holds the final layer norm, the head and the loss.
    head: bool,
    wte: Range<usize>,
    wpe: Range<usize>,
    lnf_w: Range<usize>,
    lnf_b: Range<usize>,
    /// The stage's blocks, in order.
    blocks: Vec<BlockParams>,
}

impl Offsets {
    fn new(config: &GptConfig, layout: &ParamLayout, stage: &StageLayers) -> Self {
        let r = |name: &str| {
            layout
                .get(name)
                .unwrap_or_else(|| panic!("layout has no parameter `{name}`"))
                .range()
        };
        let held = |name: &str, holds: bool| if holds { r(name) } else { 0..0 };
        let blocks = (stage.blocks.start as usize..stage.blocks.end as usize)
            .map(|i| {
                let p = block_prefix(config, i);
                let g = |s: &str| r(&format!("{p}.{s}"));
                BlockParams {
                    ln1_w: g("ln_1.weight"),
                    ln1_b: g("ln_1.bias"),
                    attn_w: g("attn.c_attn.weight"),
                    attn_b: g("attn.c_attn.bias"),
                    proj_w: g("attn.c_proj.weight"),
                    proj_b: g("attn.c_proj.bias"),
                    ln2_w: g("ln_2.weight"),
                    ln2_b: g("ln_2.bias"),
                    fc_w: g("mlp.c_fc.weight"),
                    fc_b: g("mlp.c_fc.bias"),
                    fcproj_w: g("mlp.c_proj.weight"),
                    fcproj_b: g("mlp.c_proj.bias"),
                }
            })
            .collect();
        Self {
            embed: stage.embeddings,
            head: stage.head,
            wte: held("wte.weight", stage.embeddings || stage.head),
            wpe: held("wpe.weight", stage.embeddings),
            lnf_w: held("ln_f.weight", stage.head),
            lnf_b: held("ln_f.bias", stage.head),
            blocks,
        }
    }
}

/// Activations of one block, kept for the backward pass.
#[derive(Default)]
struct BlockActs {
    /// Block input (the residual stream), `(n, C)`.
    x: Vec<f32>,
    ln1: Vec<f32>,
    ln1_mean: Vec<f32>,
    ln1_rstd: Vec<f32>,
    /// `(n, 3C)`: q, k, v of every head.
    qkv: Vec<f32>,
    /// Attention probabilities, `(batch, heads, t, t)`, zero above the diagonal.
    att: Vec<f32>,
    /// Attention output before the projection, `(n, C)`.
    atty: Vec<f32>,
    /// Residual after attention, `(n, C)`.
    res2: Vec<f32>,
    ln2: Vec<f32>,
    ln2_mean: Vec<f32>,
    ln2_rstd: Vec<f32>,
    /// MLP hidden layer before its bias and GELU, `(n, 4C)`.
    fch: Vec<f32>,
    /// ... and after.
    fch_gelu: Vec<f32>,
    /// GELU's derivative at `fch + bias`, for the backward pass.
    fch_dgelu: Vec<f32>,
}

/// Every buffer of a step, allocated for the largest batch seen and reused.
pub struct Workspace {
    config: GptConfig,
    offsets: Offsets,
    total: usize,
    threads: usize,
    pool: Option<rayon::ThreadPool>,
    /// Rows (`batch * t`) and `(batch, t)` the buffers are sized for now.
    shape: (usize, usize),
    blocks: Vec<BlockActs>,
    /// Output of the last block, `(n, C)`.
    x_out: Vec<f32>,
    lnf: Vec<f32>,
    lnf_mean: Vec<f32>,
    lnf_rstd: Vec<f32>,
    /// Logits `(n, V)`; after the loss, its gradient.
    logits: Vec<f32>,
    losses: Vec<f32>,
    /// Gradient scratch.
    dres: Vec<f32>,
    dln: Vec<f32>,
    dtmp: Vec<f32>,
    dbig: Vec<f32>,
    dqkv: Vec<f32>,
    datt: Vec<f32>,
    scratch: Vec<f32>,
}

/// The start and length of a buffer, which may cross to other threads so that parallel
/// tasks can each write a disjoint part of it. Making one and offsetting it are safe
/// (offsets are checked against the length); reading or writing through it is not.
#[derive(Clone, Copy)]
struct SendPtr {
    ptr: *mut f32,
    len: usize,
}
// SAFETY: a `SendPtr` is an address and a length; every access through it is an
// `unsafe` block whose caller keeps the tasks' regions disjoint (see `SendPtr::slice`).
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    fn new(buf: &mut [f32]) -> Self {
        Self {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        }
    }

    /// The address of element `offset` (`offset == len` is the end).
    ///
    /// # Panics
    /// When `offset` is past the end of the buffer.
    fn at(self, offset: usize) -> *mut f32 {
        assert!(
            offset <= self.len,
            "offset {offset} past the end of a buffer of {}",
            self.len
        );
        // Wrapping arithmetic is safe whatever became of the buffer; the assert keeps
        // the address inside it.
        self.ptr.wrapping_add(offset)
    }

    /// Elements `start .. start + len` of the buffer.
    ///
    /// # Panics
    /// When the buffer does not hold them.
    ///
    /// # Safety
    /// The buffer this was made from must stay alive, unmoved and unresized for `'a`, and
    /// no other reference to these elements (another slice from here included) may be
    /// used while the returned slice lives.
    unsafe fn slice<'a>(self, start: usize, len: usize) -> &'a mut [f32] {
        assert!(
            start <= self.len && len <= self.len - start,
            "elements {start}..{} past the end of a buffer of {}",
            start.saturating_add(len),
            self.len
        );
        // SAFETY: in bounds by the assert; alive and unaliased by the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}

fn resize(v: &mut Vec<f32>, len: usize) {
    if v.len() != len {
        v.resize(len, 0.0);
    }
}

impl Workspace {
    /// A workspace for `config` (whose flat layout is `layout`) that runs on `threads`
    /// threads (1: the calling thread only; more: a pool of its own).
    pub fn new(config: &GptConfig, layout: &ParamLayout, threads: usize) -> Self {
        Self::with_stage(config, layout, &whole_model(config), threads)
    }

    /// A workspace for one pipeline stage of `config` (its parameters flat in
    /// [`ParamLayout::for_stage`]'s layout): see [`Workspace::stage_forward`].
    pub fn for_stage(config: &GptConfig, stage: &StageLayers, threads: usize) -> Self {
        let layout = ParamLayout::for_stage(config, stage);
        Self::with_stage(config, &layout, stage, threads)
    }

    fn with_stage(
        config: &GptConfig,
        layout: &ParamLayout,
        stage: &StageLayers,
        threads: usize,
    ) -> Self {
        let threads = threads.max(1);
        let pool = (threads > 1).then(|| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(|i| format!("tenax-step-{i}"))
                .build()
                .expect("a rayon pool starts")
        });
        Self {
            config: config.clone(),
            offsets: Offsets::new(config, layout, stage),
            total: layout.total,
            threads,
            pool,
            shape: (0, 0),
            blocks: stage.blocks.clone().map(|_| BlockActs::default()).collect(),
            x_out: Vec::new(),
            lnf: Vec::new(),
            lnf_mean: Vec::new(),
            lnf_rstd: Vec::new(),
            logits: Vec::new(),
            losses: Vec::new(),
            dres: Vec::new(),
            dln: Vec::new(),
            dtmp: Vec::new(),
            dbig: Vec::new(),
            dqkv: Vec::new(),
            datt: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// Runs `f` on this workspace's threads (on the calling thread when it has one):
    /// inside, rayon's parallel iterators (and [`crate::AdamW::update`]) use them.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(p) => p.install(f),
            None => f(),
        }
    }

    /// Threads this workspace computes on.
    pub fn threads(&self) -> usize {
        self.threads
    }

    fn ensure(&mut self, batch: usize, t: usize) {
        if self.shape == (batch, t) {
            return;
        }
        let c = self.config.n_embd;
        let n = batch * t;
        let att = batch * self.config.n_head * t * t;
        for b in &mut self.blocks {
            for (v, len) in [
                (&mut b.x, n * c),
                (&mut b.ln1, n * c),
                (&mut b.ln1_mean, n),
                (&mut b.ln1_rstd, n),
                (&mut b.qkv, n * 3 * c),
                (&mut b.att, att),
                (&mut b.atty, n * c),
                (&mut b.res2, n * c),
                (&mut b.ln2, n * c),
                (&mut b.ln2_mean, n),
                (&mut b.ln2_rstd, n),
                (&mut b.fch, n * 4 * c),
                (&mut b.fch_gelu, n * 4 * c),
                (&mut b.fch_dgelu, n * 4 * c),
            ] {
                resize(v, len);
            }
        }
        // Only the stage with the head computes logits.
        let v = if self.offsets.head {
            self.config.vocab_size
        } else {
            0
        };
        for (buf, len) in [
            (&mut self.x_out, n * c),
            (&mut self.lnf, n * c),
            (&mut self.lnf_mean, n),
            (&mut self.lnf_rstd, n),
            (&mut self.logits, n * v),
            (&mut self.losses, n),
            (&mut self.dres, n * c),
            (&mut self.dln, n * c),
            (&mut self.dtmp, n * c),
            (&mut self.dbig, n * 4 * c),
            (&mut self.dqkv, n * 3 * c),
            (&mut self.datt, att),
            (&mut self.scratch, 2 * c * self.threads),
        ] {
            resize(buf, len);
        }
        self.shape = (batch, t);
    }

    /// Checks the inputs; returns `t`.
    fn check(
        &self,
        params: &[f32],
        inputs: &[u32],
        targets: &[u32],
        batch: usize,
    ) -> Result<usize, ModelError> {
        check_flat_len(self.total, params.len())?;
        check_inputs_and_targets(&self.config, inputs, targets, batch)
    }

    /// Sum (not mean) of the next-token cross-entropy over all `batch * t` positions,
    /// without gradients.
    pub fn loss_sum(
        &mut self,
        params: &[f32],
        inputs: &[u32],
        targets: &[u32],
        batch: usize,
    ) -> Result<f32, ModelError> {
        let t = self.check(params, inputs, targets, batch)?;
        self.whole("loss_sum")?;
        self.ensure(batch, t);
        let pool = self.pool.take();
        let input = StageInput::Tokens(inputs);
        let loss = match &pool {
            Some(p) => p.install(|| self.run(params, input, targets, batch, t, None)),
            None => self.run(params, input, targets, batch, t, None),
        };
        self.pool = pool;
        Ok(loss)
    }

    /// [`Workspace::loss_sum`] and its gradient for every parameter, added to `grad`
    /// (flat, layout order): pass zeros to get the gradient itself, or a running sum to
    /// accumulate micro-batches.
    pub fn loss_sum_and_grad(
        &mut self,
        params: &[f32],
        inputs: &[u32],
        targets: &[u32],
        batch: usize,
        grad: &mut [f32],
    ) -> Result<f32, ModelError> {
        let t = self.check(params, inputs, targets, batch)?;
        if grad.len() != self.total {
            return Err(ModelError::Length {
                what: "gradient buffer",
                expected: self.total,
                got: grad.len(),
                hint: "size it to the parameter count",
            });
        }
        self.whole("loss_sum_and_grad")?;
        self.ensure(batch, t);
        let pool = self.pool.take();
        let input = StageInput::Tokens(inputs);
        let loss = match &pool {
            Some(p) => p.install(|| self.run(params, input, targets, batch, t, Some(grad))),
            None => self.run(params, input, targets, batch, t, Some(grad)),
        };
        self.pool = pool;
        Ok(loss)
    }

    /// `Err` unless this workspace computes the whole model.
    fn whole(&self, what: &str) -> Result<(), ModelError> {
        match self.offsets.embed && self.offsets.head {
            true => Ok(()),
            false => Err(ModelError::Stage {
                reason: format!(
                    "{what} needs the whole model; use stage_forward and stage_backward"
                ),
            }),
        }
    }

    fn run(
        &mut self,
        params: &[f32],
        input: StageInput<'_>,
        targets: &[u32],
        batch: usize,
        t: usize,
        grad: Option<&mut [f32]>,
    ) -> f32 {
        let n = batch * t;
        self.forward(params, input, targets, batch, t, grad.is_some());
        let loss: f64 = match self.offsets.head {
            true => self.losses[..n].iter().map(|&l| f64::from(l)).sum(),
            false => 0.0,
        };
        if let Some(grad) = grad {
            let tokens = match input {
                StageInput::Tokens(tokens) => tokens,
                StageInput::Acts(_) => &[],
            };
            self.backward(params, tokens, None, batch, t, grad);
        }
        loss as f32
    }

    /// One pipeline stage's forward pass over `batch` sequences: `input` is token ids on
    /// the stage with the embeddings, else the previous stage's output. On the stage with
    /// the head, returns the loss sum over `targets` (and, `with_grad`, keeps the
    /// logits' gradient for [`Workspace::stage_backward`]); elsewhere 0 and the output
    /// is [`Workspace::output`]. The activations stay in the workspace until the next
    /// forward pass: one workspace per micro-batch in flight.
    ///
    /// # Errors
    /// A parameter vector or input of the wrong length, or an input of the wrong kind.
    pub fn stage_forward(
        &mut self,
        params: &[f32],
        input: StageInput<'_>,
        targets: &[u32],
        batch: usize,
        with_grad: bool,
    ) -> Result<f32, ModelError> {
        check_flat_len(self.total, params.len())?;
        let c = self.config.n_embd;
        let t = match (input, self.offsets.embed) {
            (StageInput::Tokens(tokens), true) => {
                crate::gpt::check_tokens(&self.config, tokens, batch)?
            }
            (StageInput::Acts(acts), false) => {
                let t = match batch {
                    0 => 0,
                    _ => acts.len() / (batch * c),
                };
                if t == 0 || t > self.config.block_size || acts.len() != batch * t * c {
                    return Err(ModelError::Length {
                        what: "stage input activations",
                        expected: batch * self.config.block_size * c,
                        got: acts.len(),
                        hint: "pass batch * t * n_embd values, t <= block_size",
                    });
                }
                t
            }
            (_, embed) => {
                return Err(ModelError::Stage {
                    reason: format!(
                        "this stage {} the embeddings: its input is {}",
                        if embed { "holds" } else { "does not hold" },
                        if embed { "token ids" } else { "activations" }
                    ),
                })
            }
        };
        if self.offsets.head {
            if targets.len() != batch * t {
                return Err(ModelError::Length {
                    what: "targets",
                    expected: batch * t,
                    got: targets.len(),
                    hint: "pass one target per input position",
                });
            }
            crate::gpt::check_tokens(&self.config, targets, batch)?;
        }
        self.ensure(batch, t);
        let pool = self.pool.take();
        let loss = match &pool {
            Some(p) => p.install(|| self.forward_loss(params, input, targets, batch, t, with_grad)),
            None => self.forward_loss(params, input, targets, batch, t, with_grad),
        };
        self.pool = pool;
        Ok(loss)
    }

    fn forward_loss(
        &mut self,
        params: &[f32],
        input: StageInput<'_>,
        targets: &[u32],
        batch: usize,
        t: usize,
        with_grad: bool,
    ) -> f32 {
        self.forward(params, input, targets, batch, t, with_grad);
        match self.offsets.head {
            true => {
                let n = batch * t;
                let loss: f64 = self.losses[..n].iter().map(|&l| f64::from(l)).sum();
                loss as f32
            }
            false => 0.0,
        }
    }

    /// The output activations of the last forward pass, `(batch * t, C)` (the next
    /// stage's input).
    pub fn output(&self) -> &[f32] {
        let (batch, t) = self.shape;
        &self.x_out[..batch * t * self.config.n_embd]
    }

    /// The backward pass of the last [`Workspace::stage_forward`] (run `with_grad` on the
    /// stage with the head): `dout` is the gradient of [`Workspace::output`] from the next
    /// stage (`None` on the stage with the head); the gradient of every parameter the
    /// stage holds is added to `grad` (flat, the stage's layout). `tokens` are the
    /// forward's token ids when this stage holds both the embeddings and the head (the
    /// whole model), else unused. Afterwards [`Workspace::input_grad`] is the gradient of
    /// the stage's input: the previous stage's `dout`, or, on the first stage, the
    /// embeddings' output gradient that the stage with the head turns into the tied token
    /// embedding's gradient ([`Workspace::add_embedding_grad`]).
    ///
    /// # Errors
    /// A buffer of the wrong length, or `dout` missing (or given) where it must not be.
    pub fn stage_backward(
        &mut self,
        params: &[f32],
        tokens: &[u32],
        dout: Option<&[f32]>,
        grad: &mut [f32],
    ) -> Result<(), ModelError> {
        check_flat_len(self.total, params.len())?;
        let (batch, t) = self.shape;
        let n = batch * t;
        let c = self.config.n_embd;
        if grad.len() != self.total {
            return Err(ModelError::Length {
                what: "gradient buffer",
                expected: self.total,
                got: grad.len(),
                hint: "size it to the stage's parameter count",
            });
        }
        match (dout, self.offsets.head) {
            (None, true) => {}
            (Some(d), false) if d.len() == n * c => {}
            (Some(d), false) => {
                return Err(ModelError::Length {
                    what: "output gradient",
                    expected: n * c,
                    got: d.len(),
                    hint: "pass the gradient of this stage's output",
                })
            }
            (_, head) => {
                return Err(ModelError::Stage {
                    reason: format!(
                    "the output gradient comes from the next stage: {} on the stage with the head",
                    if head { "none" } else { "needed except" }
                ),
                })
            }
        }
        if self.offsets.embed && self.offsets.head && tokens.len() != n {
            return Err(ModelError::Length {
                what: "tokens",
                expected: n,
                got: tokens.len(),
                hint: "pass the forward pass's token ids",
            });
        }
        let pool = self.pool.take();
        match &pool {
            Some(p) => p.install(|| self.backward(params, tokens, dout, batch, t, grad)),
            None => self.backward(params, tokens, dout, batch, t, grad),
        }
        self.pool = pool;
        Ok(())
    }

    /// The gradient of the last backward pass's input, `(batch * t, C)`.
    pub fn input_grad(&self) -> &[f32] {
        let (batch, t) = self.shape;
        &self.dres[..batch * t * self.config.n_embd]
    }

    /// On the stage with the head (whose token embedding is the head's tied weight): adds
    /// the first stage's embedding-output gradient `dx` to the token embedding's gradient,
    /// row by row in order, as the whole model's backward pass does.
    ///
    /// # Errors
    /// Not the stage with the head, or buffers of the wrong length.
    pub fn add_embedding_grad(
        &self,
        grad: &mut [f32],
        tokens: &[u32],
        dx: &[f32],
    ) -> Result<(), ModelError> {
        let c = self.config.n_embd;
        if !self.offsets.head {
            return Err(ModelError::Stage {
                reason: "only the stage with the head forms the token embedding's gradient".into(),
            });
        }
        if grad.len() != self.total || dx.len() != tokens.len() * c {
            return Err(ModelError::Length {
                what: "embedding gradient",
                expected: tokens.len() * c,
                got: dx.len(),
                hint: "pass one row of n_embd values per token, and the stage's gradient",
            });
        }
        let v = self.config.vocab_size;
        if let Some((position, &token)) = tokens.iter().enumerate().find(|(_, &k)| k as usize >= v)
        {
            return Err(ModelError::TokenOutOfRange {
                token,
                position,
                vocab_size: v,
            });
        }
        add_token_rows(&mut grad[self.offsets.wte.clone()], dx, tokens, c);
        Ok(())
    }

    /// The forward pass and each row's loss (with `with_grad`, the logits' gradient
    /// too). Sequences do not interact before the loss, so the batch is cut into one run
    /// of whole sequences per thread, each computed start to finish on its own thread:
    /// one join per step instead of one per operation. Every kernel gives a row the same
    /// bits whatever rows it runs with (gemm's `k` blocking depends on `k` only), so the
    /// cut does not change the result.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &mut self,
        params: &[f32],
        input: StageInput<'_>,
        targets: &[u32],
        batch: usize,
        t: usize,
        with_grad: bool,
    ) {
        let parts = self.threads.min(batch).max(1);
        let inner_threads = (self.threads / parts).max(1);
        let bufs = FwdBufs::new(self);
        let per = batch.div_ceil(parts);
        let run = |part: usize| {
            let seqs = part * per..((part + 1) * per).min(batch);
            if !seqs.is_empty() {
                forward_part(
                    &self.config,
                    &self.offsets,
                    &bufs,
                    params,
                    input,
                    targets,
                    t,
                    seqs,
                    inner_threads,
                    with_grad,
                );
            }
        };
        if parts == 1 {
            run(0);
        } else {
            (0..parts).into_par_iter().for_each(run);
        }
    }

    fn backward(
        &mut self,
        params: &[f32],
        tokens: &[u32],
        dout: Option<&[f32]>,
        batch: usize,
        t: usize,
        grad: &mut [f32],
    ) {
        let c = self.config.n_embd;
        let nh = self.config.n_head;
        let v = self.config.vocab_size;
        let n = batch * t;
        let threads = self.threads;
        let o = &self.offsets;
        let p = |r: &Range<usize>| &params[r.clone()];
        if o.head {
            // LM head (tied to wte): dlnf = dlogits * wte; dwte += dlogits^T * lnf, side by
            // side as in `linear_bwd`.
            let (logits, lnf, dln) = (&self.logits, &self.lnf, &mut self.dln);
            let gwte = &mut grad[o.wte.clone()];
            let wte = p(&o.wte);
            assert!(dln.len() >= n * c && gwte.len() >= v * c);
            let mut input = |threads: usize| {
                // SAFETY: logits (n, V), wte (V, C), dln (n, C) (`ensure` sized the
                // buffers for this shape; the assert above checks the destinations).
                unsafe {
                    kernels::matmul(
                        n,
                        c,
                        v,
                        dln.as_mut_ptr(),
                        c,
                        false,
                        Mat::rows(logits, v),
                        Mat::rows(wte, c),
                        threads,
                    );
                }
            };
            let mut weights = |threads: usize| {
                // SAFETY: logits read transposed (V, n), lnf (n, C), gwte (V, C), as above;
                // distinct borrows do not overlap.
                unsafe {
                    kernels::matmul(
                        v,
                        c,
                        n,
                        gwte.as_mut_ptr(),
                        c,
                        true,
                        Mat::rows_t(logits, v),
                        Mat::rows(lnf, c),
                        threads,
                    );
                }
            };
            if threads >= 2 {
                let half = threads / 2;
                rayon::join(|| weights(half), || input(threads - half));
            } else {
                weights(1);
                input(1);
            }
            self.dres[..n * c].fill(0.0);
            let (dw, db) = grad_pair(grad, &o.lnf_w, &o.lnf_b);
            layer_norm_bwd(
                threads,
                &self.dln[..n * c],
                &self.x_out[..n * c],
                p(&o.lnf_w),
                &self.lnf_mean[..n],
                &self.lnf_rstd[..n],
                &mut self.dres[..n * c],
                &mut self.scratch,
                dw,
                db,
            );
        } else if let Some(dout) = dout {
            self.dres[..n * c].copy_from_slice(&dout[..n * c]);
        }
        for l in (0..o.blocks.len()).rev() {
            let bp = &o.blocks[l];
            let a = &self.blocks[l];
            // MLP output projection.
            let (dw, db) = grad_pair(grad, &bp.fcproj_w, &bp.fcproj_b);
            linear_bwd(
                threads,
                &self.dres[..n * c],
                &a.fch_gelu[..n * 4 * c],
                p(&bp.fcproj_w),
                dw,
                db,
                &mut self.dbig[..n * 4 * c],
                4 * c,
                c,
            );
            gelu_bwd(
                threads,
                &a.fch_dgelu[..n * 4 * c],
                &mut self.dbig[..n * 4 * c],
            );
            let (dw, db) = grad_pair(grad, &bp.fc_w, &bp.fc_b);
            linear_bwd(
                threads,
                &self.dbig[..n * 4 * c],
                &a.ln2[..n * c],
                p(&bp.fc_w),
                dw,
                db,
                &mut self.dln[..n * c],
                c,
                4 * c,
            );
            let (dw, db) = grad_pair(grad, &bp.ln2_w, &bp.ln2_b);
            layer_norm_bwd(
                threads,
                &self.dln[..n * c],
                &a.res2[..n * c],
                p(&bp.ln2_w),
                &a.ln2_mean[..n],
                &a.ln2_rstd[..n],
                &mut self.dres[..n * c],
                &mut self.scratch,
                dw,
                db,
            );
            // Attention.
            let (dw, db) = grad_pair(grad, &bp.proj_w, &bp.proj_b);
            linear_bwd(
                threads,
                &self.dres[..n * c],
                &a.atty[..n * c],
                p(&bp.proj_w),
                dw,
                db,
                &mut self.dtmp[..n * c],
                c,
                c,
            );
            attention_bwd(
                threads,
                &self.dtmp[..n * c],
                &a.qkv[..n * 3 * c],
                &a.att,
                &mut self.datt,
                &mut self.dqkv[..n * 3 * c],
                batch,
                t,
                nh,
                c,
            );
            let (dw, db) = grad_pair(grad, &bp.attn_w, &bp.attn_b);
            linear_bwd(
                threads,
                &self.dqkv[..n * 3 * c],
                &a.ln1[..n * c],
                p(&bp.attn_w),
                dw,
                db,
                &mut self.dln[..n * c],
                c,
                3 * c,
            );
            let (dw, db) = grad_pair(grad, &bp.ln1_w, &bp.ln1_b);
            layer_norm_bwd(
                threads,
                &self.dln[..n * c],
                &a.x[..n * c],
                p(&bp.ln1_w),
                &a.ln1_mean[..n],
                &a.ln1_rstd[..n],
                &mut self.dres[..n * c],
                &mut self.scratch,
                dw,
                db,
            );
        }
        // Embeddings, rows in order (the token embedding's only with the head, which it
        // is tied to: elsewhere that stage adds them, `add_embedding_grad`).
        if o.embed {
            let gwpe = &mut grad[o.wpe.clone()];
            for (r, row) in self.dres[..n * c].chunks_exact(c).enumerate() {
                kernels::add_rows(row, &mut gwpe[(r % t) * c..(r % t + 1) * c]);
            }
            if o.head {
                add_token_rows(&mut grad[o.wte.clone()], &self.dres[..n * c], tokens, c);
            }
        }
    }
}

/// Raw pointers to every buffer the forward pass writes, so that runs of sequences can
/// fill their own rows of them on different threads.
struct FwdBufs {
    blocks: Vec<[SendPtr; 14]>,
    x_out: SendPtr,
    lnf: SendPtr,
    lnf_mean: SendPtr,
    lnf_rstd: SendPtr,
    logits: SendPtr,
    losses: SendPtr,
}

impl FwdBufs {
    fn new(ws: &mut Workspace) -> Self {
        let ptr = |v: &mut Vec<f32>| SendPtr::new(v);
        Self {
            blocks: ws
                .blocks
                .iter_mut()
                .map(|b| {
                    [
                        ptr(&mut b.x),
                        ptr(&mut b.ln1),
                        ptr(&mut b.ln1_mean),
                        ptr(&mut b.ln1_rstd),
                        ptr(&mut b.qkv),
                        ptr(&mut b.att),
                        ptr(&mut b.atty),
                        ptr(&mut b.res2),
                        ptr(&mut b.ln2),
                        ptr(&mut b.ln2_mean),
                        ptr(&mut b.ln2_rstd),
                        ptr(&mut b.fch),
                        ptr(&mut b.fch_gelu),
                        ptr(&mut b.fch_dgelu),
                    ]
                })
                .collect(),
            x_out: ptr(&mut ws.x_out),
            lnf: ptr(&mut ws.lnf),
            lnf_mean: ptr(&mut ws.lnf_mean),
            lnf_rstd: ptr(&mut ws.lnf_rstd),
            logits: ptr(&mut ws.logits),
            losses: ptr(&mut ws.losses),
        }
    }
}

/// Rows `start .. start + len` of the buffer at `p`, whose rows hold `width` values:
/// elements `start * width .. (start + len) * width`.
///
/// # Panics
/// When the buffer does not hold them.
///
/// # Safety
/// As [`SendPtr::slice`]: the buffer outlives `'a`, and no other reference to these rows
/// is used while the slice lives.
unsafe fn rows<'a>(p: SendPtr, start: usize, len: usize, width: usize) -> &'a mut [f32] {
    // SAFETY: the caller's contract is `slice`'s.
    unsafe { p.slice(start * width, len * width) }
}

/// The forward pass of sequences `seqs` (and their rows' losses), on `threads` threads.
#[allow(clippy::too_many_arguments)]
fn forward_part(
    config: &GptConfig,
    o: &Offsets,
    bufs: &FwdBufs,
    params: &[f32],
    input: StageInput<'_>,
    targets: &[u32],
    t: usize,
    seqs: Range<usize>,
    threads: usize,
    with_grad: bool,
) {
    let (c, nh, v) = (config.n_embd, config.n_head, config.vocab_size);
    let (r0, n) = (seqs.start * t, seqs.len() * t);
    let batch = seqs.len();
    let p = |r: &Range<usize>| &params[r.clone()];
    // Every `rows` below takes rows r0 .. r0 + n (of att: sequences `seqs`) of a buffer
    // of `bufs`: `forward` gives each part its own sequences, keeps the workspace (and so
    // every buffer) borrowed until the parts have joined, and touches the buffers no
    // other way meanwhile; one part's views of one buffer never live at the same time.
    // SAFETY: as above.
    let x = unsafe { rows(bufs.blocks[0][0], r0, n, c) };
    match input {
        StageInput::Tokens(inputs) => {
            let (wte, wpe) = (p(&o.wte), p(&o.wpe));
            let inputs = &inputs[r0..r0 + n];
            for (r, (row, &tok)) in x.chunks_exact_mut(c).zip(inputs).enumerate() {
                let tok = tok as usize;
                kernels::add(
                    &wte[tok * c..(tok + 1) * c],
                    &wpe[(r % t) * c..(r % t + 1) * c],
                    row,
                );
            }
        }
        StageInput::Acts(acts) => x.copy_from_slice(&acts[r0 * c..(r0 + n) * c]),
    }
    let att_len = nh * t * t;
    for (l, bp) in o.blocks.iter().enumerate() {
        let b = &bufs.blocks[l];
        let [x, ln1, ln1_mean, ln1_rstd, qkv, att, atty, res2, ln2, ln2_mean, ln2_rstd, fch, fch_gelu, fch_dgelu] =
            *b;
        // This block's buffers are distinct, and its output is the next block's input
        // (or x_out), which no view of this iteration shares; the views of the last
        // iteration (the previous block's output is this one's `x`) are dead.
        let out = match bufs.blocks.get(l + 1) {
            Some(next) => next[0],
            None => bufs.x_out,
        };
        // SAFETY: as above.
        let (x, ln1, ln1_mean, ln1_rstd, qkv, att, atty, out) = unsafe {
            (
                rows(x, r0, n, c),
                rows(ln1, r0, n, c),
                rows(ln1_mean, r0, n, 1),
                rows(ln1_rstd, r0, n, 1),
                rows(qkv, r0, n, 3 * c),
                rows(att, seqs.start, batch, att_len),
                rows(atty, r0, n, c),
                rows(out, r0, n, c),
            )
        };
        // SAFETY: as above.
        let (res2, ln2, ln2_mean, ln2_rstd, fch, fch_gelu, fch_dgelu) = unsafe {
            (
                rows(res2, r0, n, c),
                rows(ln2, r0, n, c),
                rows(ln2_mean, r0, n, 1),
                rows(ln2_rstd, r0, n, 1),
                rows(fch, r0, n, 4 * c),
                rows(fch_gelu, r0, n, 4 * c),
                rows(fch_dgelu, r0, n, 4 * c),
            )
        };
        layer_norm(
            threads,
            x,
            p(&bp.ln1_w),
            p(&bp.ln1_b),
            ln1,
            ln1_mean,
            ln1_rstd,
        );
        kernels::fill_rows(p(&bp.attn_b), qkv);
        dense(threads, ln1, p(&bp.attn_w), qkv, c, 3 * c, true);
        attention_fwd(threads, qkv, att, atty, batch, t, nh, c);
        kernels::add_rows_bias(x, p(&bp.proj_b), res2);
        dense(threads, atty, p(&bp.proj_w), res2, c, c, true);
        layer_norm(
            threads,
            res2,
            p(&bp.ln2_w),
            p(&bp.ln2_b),
            ln2,
            ln2_mean,
            ln2_rstd,
        );
        // The MLP's first layer without its bias: GELU adds it in its own pass.
        dense(threads, ln2, p(&bp.fc_w), fch, c, 4 * c, false);
        bias_gelu(threads, fch, p(&bp.fc_b), fch_gelu, fch_dgelu);
        kernels::add_rows_bias(res2, p(&bp.fcproj_b), out);
        dense(threads, fch_gelu, p(&bp.fcproj_w), out, 4 * c, c, true);
    }
    if !o.head {
        return;
    }
    // SAFETY: as above; the blocks' views are dead.
    let (x_out, lnf, lnf_mean, lnf_rstd) = unsafe {
        (
            rows(bufs.x_out, r0, n, c),
            rows(bufs.lnf, r0, n, c),
            rows(bufs.lnf_mean, r0, n, 1),
            rows(bufs.lnf_rstd, r0, n, 1),
        )
    };
    layer_norm(
        threads,
        x_out,
        p(&o.lnf_w),
        p(&o.lnf_b),
        lnf,
        lnf_mean,
        lnf_rstd,
    );
    // SAFETY: as above.
    let logits = unsafe { rows(bufs.logits, r0, n, v) };
    // SAFETY: lnf is (n, C), wte (V, C) read transposed, logits (n, V).
    unsafe {
        kernels::matmul(
            n,
            v,
            c,
            logits.as_mut_ptr(),
            v,
            false,
            Mat::rows(lnf, c),
            Mat::rows_t(p(&o.wte), c),
            threads,
        );
    }
    // SAFETY: as above.
    let losses = unsafe { rows(bufs.losses, r0, n, 1) };
    let targets = &targets[r0..r0 + n];
    if with_grad {
        kernels::softmax_xent(logits, v, targets, losses);
    } else {
        kernels::xent_rows(logits, v, targets, losses);
    }
}

/// The gradients of two parameters at once (a weight and its bias): their disjoint
/// ranges `a` and `b` of the flat gradient.
///
/// # Panics
/// When the ranges overlap or `grad` does not hold them.
fn grad_pair<'a>(
    grad: &'a mut [f32],
    a: &Range<usize>,
    b: &Range<usize>,
) -> (&'a mut [f32], &'a mut [f32]) {
    if a.end <= b.start {
        let (lo, hi) = grad.split_at_mut(b.start);
        (&mut lo[a.clone()], &mut hi[..b.len()])
    } else {
        assert!(b.end <= a.start, "parameter ranges {a:?} and {b:?} overlap");
        let (lo, hi) = grad.split_at_mut(a.start);
        (&mut hi[..a.len()], &mut lo[b.clone()])
    }
}

/// Adds row `r` of `dx` to row `tokens[r]` of the token embedding's gradient, in order.
fn add_token_rows(gwte: &mut [f32], dx: &[f32], tokens: &[u32], c: usize) {
    for (row, &tok) in dx.chunks_exact(c).zip(tokens) {
        let tok = tok as usize;
        kernels::add_rows(row, &mut gwte[tok * c..(tok + 1) * c]);
    }
}

/// Splits `n` rows into one contiguous run per thread.
fn chunk_rows(threads: usize, n: usize) -> usize {
    n.div_ceil(threads).max(1)
}

/// Elements per parallel task of the element-wise kernels.
fn chunk_elems(threads: usize, len: usize) -> usize {
    len.div_ceil(threads).max(1)
}

/// Bias plus GELU forward, split across threads by row runs.
fn bias_gelu(threads: usize, x: &[f32], b: &[f32], out: &mut [f32], dgelu: &mut [f32]) {
    if threads <= 1 {
        return kernels::bias_gelu_fwd(x, b, out, dgelu);
    }
    let chunk = chunk_rows(threads, x.len() / b.len()) * b.len();
    x.par_chunks(chunk)
        .zip(out.par_chunks_mut(chunk))
        .zip(dgelu.par_chunks_mut(chunk))
        .for_each(|((x, o), d)| kernels::bias_gelu_fwd(x, b, o, d));
}

/// GELU backward, split across threads by element runs.
fn gelu_bwd(threads: usize, dgelu: &[f32], dout: &mut [f32]) {
    if threads <= 1 {
        return kernels::gelu_bwd(dgelu, dout);
    }
    let chunk = chunk_elems(threads, dout.len());
    dgelu
        .par_chunks(chunk)
        .zip(dout.par_chunks_mut(chunk))
        .for_each(|(g, d)| kernels::gelu_bwd(g, d));
}

/// Row-parallel LayerNorm forward.
fn layer_norm(
    threads: usize,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
) {
    let c = w.len();
    let n = mean.len();
    if threads <= 1 {
        return kernels::layer_norm_fwd(x, w, b, out, mean, rstd);
    }
    let chunk = chunk_rows(threads, n);
    x.par_chunks(chunk * c)
        .zip(out.par_chunks_mut(chunk * c))
        .zip(mean.par_chunks_mut(chunk))
        .zip(rstd.par_chunks_mut(chunk))
        .for_each(|(((x, o), m), r)| kernels::layer_norm_fwd(x, w, b, o, m, r));
}

/// LayerNorm backward: the input gradient is added to `dx_acc` (row-parallel), the
/// parameter gradients to `dw` and `db` (rows in order, on this thread).
#[allow(clippy::too_many_arguments)]
fn layer_norm_bwd(
    threads: usize,
    dout: &[f32],
    x: &[f32],
    w: &[f32],
    mean: &[f32],
    rstd: &[f32],
    dx_acc: &mut [f32],
    scratch: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
) {
    let c = w.len();
    let n = mean.len();
    if threads <= 1 {
        kernels::layer_norm_bwd_input(dout, x, w, mean, rstd, dx_acc, scratch);
    } else {
        let chunk = chunk_rows(threads, n);
        dout.par_chunks(chunk * c)
            .zip(x.par_chunks(chunk * c))
            .zip(mean.par_chunks(chunk))
            .zip(rstd.par_chunks(chunk))
            .zip(dx_acc.par_chunks_mut(chunk * c))
            .zip(scratch.par_chunks_mut(2 * c))
            .for_each(|(((((d, x), m), r), dx), s)| {
                kernels::layer_norm_bwd_input(d, x, w, m, r, dx, s)
            });
    }
    kernels::layer_norm_bwd_params(dout, x, mean, rstd, dw, db);
}

/// `out = x * w` (`accumulate`: `out += x * w`) for `x` `(n, d_in)`, `w` `(d_in, d_out)`,
/// `out` `(n, d_out)`. A bias is the caller's: filled in before, or added in a later pass.
fn dense(
    threads: usize,
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    d_in: usize,
    d_out: usize,
    accumulate: bool,
) {
    let n = x.len() / d_in;
    assert!(
        w.len() >= d_in * d_out && out.len() >= n * d_out,
        "dense: w of {} and out of {} values for {n} x {d_in} -> {d_out}",
        w.len(),
        out.len()
    );
    // SAFETY: x (n, d_in), w (d_in, d_out), out (n, d_out) by the assert; distinct
    // borrows do not overlap.
    unsafe {
        kernels::matmul(
            n,
            d_out,
            d_in,
            out.as_mut_ptr(),
            d_out,
            accumulate,
            Mat::rows(x, d_in),
            Mat::rows(w, d_out),
            threads,
        );
    }
}

/// Backward of a linear layer `y = x w + b`: `dw += x^T dy`, `db += sum_rows(dy)`, `dx = dy w^T`.
///
/// The two products are independent: with two threads or more they run side by side,
/// each on half the threads, which scales better than splitting each product.
#[allow(clippy::too_many_arguments)]
fn linear_bwd(
    threads: usize,
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    dw: &mut [f32],
    db: &mut [f32],
    dx: &mut [f32],
    d_in: usize,
    d_out: usize,
) {
    let n = dy.len() / d_out;
    assert!(
        x.len() >= n * d_in
            && w.len() >= d_in * d_out
            && dw.len() >= d_in * d_out
            && dx.len() >= n * d_in,
        "linear_bwd: x {}, w {}, dw {}, dx {} values for {n} x {d_in} -> {d_out}",
        x.len(),
        w.len(),
        dw.len(),
        dx.len()
    );
    let mut weights = |threads: usize| {
        kernels::add_rows(dy, db);
        // SAFETY: x (n, d_in) read transposed, dy (n, d_out), dw (d_in, d_out), by the
        // assert; distinct borrows do not overlap.
        unsafe {
            kernels::matmul(
                d_in,
                d_out,
                n,
                dw.as_mut_ptr(),
                d_out,
                true,
                Mat::rows_t(x, d_in),
                Mat::rows(dy, d_out),
                threads,
            );
        }
    };
    let mut input = |threads: usize| {
        // SAFETY: dy (n, d_out), w (d_in, d_out) read transposed, dx (n, d_in), by the
        // assert; distinct borrows do not overlap.
        unsafe {
            kernels::matmul(
                n,
                d_in,
                d_out,
                dx.as_mut_ptr(),
                d_in,
                false,
                Mat::rows(dy, d_out),
                Mat::rows_t(w, d_out),
                threads,
            );
        }
    };
    if threads >= 2 {
        let half = threads / 2;
        rayon::join(|| weights(half), || input(threads - half));
    } else {
        weights(1);
        input(1);
    }
}

/// The `(sequence, head)` pairs of a batch, one task each.
fn head_tasks(threads: usize, tasks: usize, f: impl Fn(usize) + Sync + Send) {
    if threads <= 1 {
        (0..tasks).for_each(f);
    } else {
        (0..tasks).into_par_iter().for_each(f);
    }
}

/// Causal self-attention forward of every head: from `qkv` `(batch * t, 3C)` (q, k, v,
/// each `heads` blocks of `C / heads` columns), the probabilities into `att`
/// `(batch, heads, t, t)` and the outputs into `y` `(batch * t, C)`. Scores are scaled
/// by `1 / sqrt(C / heads)`. Heads run in parallel when `threads > 1`.
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd(
    threads: usize,
    qkv: &[f32],
    att: &mut [f32],
    y: &mut [f32],
    batch: usize,
    t: usize,
    nh: usize,
    c: usize,
) {
    let hd = c / nh;
    let scale = 1.0 / (hd as f32).sqrt();
    let (n, tt) = (batch * t, t * t);
    assert!(
        qkv.len() == n * 3 * c && att.len() >= batch * nh * tt && y.len() == n * c,
        "attention_fwd: buffers of {}, {}, {} values for batch {batch}, t {t}, {nh} heads, \
         C {c}: pass qkv (batch * t, 3C), att (batch, heads, t, t), y (batch * t, C)",
        qkv.len(),
        att.len(),
        y.len(),
    );
    if n == 0 {
        return;
    }
    let (att_p, y_p) = (SendPtr::new(att), SendPtr::new(y));
    let rs3 = 3 * c as isize;
    head_tasks(threads, batch * nh, |task| {
        let (b, h) = (task / nh, task % nh);
        // q, k, v of head h of sequence b: t rows of hd columns at stride 3C.
        let q_at = b * t * 3 * c + h * hd;
        let q = Mat::strided(&qkv[q_at..], rs3, 1);
        let k_t = Mat::strided(&qkv[q_at + c..], 1, rs3);
        let v = Mat::strided(&qkv[q_at + 2 * c..], rs3, 1);
        // SAFETY: by the assert above, the (b, h) block of att holds t x t values and
        // y's rows of sequence b hold columns h * hd .. (h + 1) * hd <= C; each task
        // writes only its own block of att and its own columns of y, and reads q, k, v
        // (t x hd at stride 3C) inside qkv, which no task writes.
        unsafe {
            let s = att_p.slice(task * tt, tt);
            kernels::matmul(t, t, hd, s.as_mut_ptr(), t, false, q, k_t, 1);
            kernels::causal_softmax(s, t, scale);
            let s = Mat::rows(s, t);
            kernels::matmul(t, hd, t, y_p.at(b * t * c + h * hd), c, false, s, v, 1);
        }
    });
}

/// Causal self-attention backward: from the output gradient `dy` `(batch * t, C)`, the
/// saved `qkv` and probabilities `att` of [`attention_fwd`], writes `dqkv`
/// `(batch * t, 3C)`; `datt` is scratch of the size of `att`.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd(
    threads: usize,
    dy: &[f32],
    qkv: &[f32],
    att: &[f32],
    datt: &mut [f32],
    dqkv: &mut [f32],
    batch: usize,
    t: usize,
    nh: usize,
    c: usize,
) {
    let hd = c / nh;
    let scale = 1.0 / (hd as f32).sqrt();
    let (n, tt) = (batch * t, t * t);
    assert!(
        dy.len() == n * c
            && qkv.len() == n * 3 * c
            && att.len() >= batch * nh * tt
            && datt.len() >= batch * nh * tt
            && dqkv.len() == n * 3 * c,
        "attention_bwd: buffers of {}, {}, {}, {}, {} values for batch {batch}, t {t}, \
         {nh} heads, C {c}: pass dy (batch * t, C), qkv and dqkv (batch * t, 3C), att and \
         datt (batch, heads, t, t)",
        dy.len(),
        qkv.len(),
        att.len(),
        datt.len(),
        dqkv.len(),
    );
    if n == 0 {
        return;
    }
    let (datt_p, dqkv_p) = (SendPtr::new(datt), SendPtr::new(dqkv));
    let rs3 = 3 * c as isize;
    head_tasks(threads, batch * nh, |task| {
        let (b, h) = (task / nh, task % nh);
        let q_at = b * t * 3 * c + h * hd;
        let (q, k, v) = (&qkv[q_at..], &qkv[q_at + c..], &qkv[q_at + 2 * c..]);
        let p = &att[task * tt..(task + 1) * tt];
        let dyh = &dy[b * t * c + h * hd..];
        let dq = dqkv_p.at(q_at);
        let (dk, dv) = (dqkv_p.at(q_at + c), dqkv_p.at(q_at + 2 * c));
        // SAFETY: by the assert above, each task's (b, h) block of datt holds t x t
        // values and dq, dk, dv (t rows of hd columns at stride 3C) lie inside dqkv's rows
        // of sequence b; each task writes only its own block of datt and its own columns
        // of dqkv, and reads q, k, v, p, dy (t x hd at stride 3C, t x t, t x hd at
        // stride C), which no task writes.
        unsafe {
            let dp = datt_p.slice(task * tt, tt);
            // dP = dY V^T; dV = P^T dY.
            kernels::matmul(
                t,
                t,
                hd,
                dp.as_mut_ptr(),
                t,
                false,
                Mat::strided(dyh, c as isize, 1),
                Mat::strided(v, 1, rs3),
                1,
            );
            kernels::matmul(
                t,
                hd,
                t,
                dv,
                3 * c,
                false,
                Mat::rows_t(p, t),
                Mat::strided(dyh, c as isize, 1),
                1,
            );
            kernels::causal_softmax_bwd(p, dp, t, scale);
            // dQ = dS K; dK = dS^T Q.
            kernels::matmul(
                t,
                hd,
                t,
                dq,
                3 * c,
                false,
                Mat::rows(dp, t),
                Mat::strided(k, rs3, 1),
                1,
            );
            kernels::matmul(
                t,
                hd,
                t,
                dk,
                3 * c,
                false,
                Mat::rows_t(dp, t),
                Mat::strided(q, rs3, 1),
                1,
            );
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpt::Gpt;
    use crate::params::init_params;
    use tenax_core::rng::SplitMix64;

    fn tokens(rng: &mut SplitMix64, n: usize, vocab: usize) -> Vec<u32> {
        (0..n).map(|_| rng.below(vocab as u64) as u32).collect()
    }

    /// Max over elements of `|a - b| / max(|b|, 1e-3 * max|b|)`.
    fn max_rel_err(a: &[f32], b: &[f64]) -> f64 {
        let scale = b.iter().fold(0f64, |m, x| m.max(x.abs()));
        a.iter()
            .zip(b)
            .map(|(&x, &y)| (f64::from(x) - y).abs() / y.abs().max(1e-3 * scale).max(1e-30))
            .fold(0.0, f64::max)
    }

    #[test]
    fn the_fused_step_matches_the_candle_graph() {
        for (preset, vocab, batch, t) in [
            ("tiny", 23, 3, 16),
            ("tiny", 50, 2, 11),
            ("nano", 65, 2, 64),
        ] {
            let config = GptConfig::preset(preset, vocab).unwrap();
            let layout = ParamLayout::for_config(&config);
            let params = init_params(&config, &layout, 3);
            let reference = Gpt::new_with_dtype(config.clone(), candle_core::DType::F64).unwrap();
            reference.set_params(&params).unwrap();
            let mut rng = SplitMix64::new(9);
            let inputs = tokens(&mut rng, batch * t, vocab);
            let targets = tokens(&mut rng, batch * t, vocab);
            let (want_loss, want_grad) = reference
                .loss_sum_and_grad_f64(&inputs, &targets, batch)
                .unwrap();
            // The candle graph in f32 sets the bar: f32 rounding alone, composed unfused.
            let unfused = Gpt::new(config.clone()).unwrap();
            unfused.set_params(&params).unwrap();
            let (_, unfused_grad) = unfused.loss_sum_and_grad(&inputs, &targets, batch).unwrap();
            let mut first: Option<Vec<u32>> = None;
            for threads in [1, 2, 3] {
                let mut ws = Workspace::new(&config, &layout, threads);
                let mut grad = vec![0f32; layout.total];
                let loss = ws
                    .loss_sum_and_grad(&params, &inputs, &targets, batch, &mut grad)
                    .unwrap();
                let rel = (f64::from(loss) - want_loss).abs() / want_loss;
                assert!(rel < 1e-5, "{preset}: loss {loss} vs {want_loss}");
                for e in &layout.entries {
                    let err = max_rel_err(&grad[e.range()], &want_grad[e.range()]);
                    let bar = max_rel_err(&unfused_grad[e.range()], &want_grad[e.range()]);
                    assert!(
                        err <= (10.0 * bar).max(1e-4),
                        "{preset} threads {threads}: {} rel err {err:e}, unfused f32 {bar:e}",
                        e.name
                    );
                }
                let fwd = ws.loss_sum(&params, &inputs, &targets, batch).unwrap();
                assert_eq!(fwd.to_bits(), loss.to_bits());
                // The gradient is added to the buffer: a second pass doubles it.
                let mut twice = grad.clone();
                ws.loss_sum_and_grad(&params, &inputs, &targets, batch, &mut twice)
                    .unwrap();
                let scale = grad.iter().fold(0f32, |m, g| m.max(g.abs()));
                for (a, b) in twice.iter().zip(&grad) {
                    assert!((a - 2.0 * b).abs() <= 1e-5 * scale, "{a} vs 2 x {b}");
                }
                // The same bits at any thread count.
                let bits: Vec<u32> = grad.iter().map(|g| g.to_bits()).collect();
                match &first {
                    None => first = Some(bits),
                    Some(f) => assert!(f == &bits, "{preset}: threads {threads} changed the bits"),
                }
            }
        }
    }
}

#[cfg(test)]
mod stages {
    use super::*;
    use crate::params::init_params;
    use tenax_core::rng::SplitMix64;

    /// Each stage's parameters, gathered by name from the whole model's.
    fn stage_params(whole: &ParamLayout, stage: &ParamLayout, params: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; stage.total];
        for e in &stage.entries {
            out[e.range()].copy_from_slice(&params[whole.get(&e.name).unwrap().range()]);
        }
        out
    }

    /// A model split into S pipeline stages computes the same loss and the same
    /// gradient, bit for bit, as the whole model: each stage runs its blocks on the
    /// activations it is handed, the head stage forms the tied embedding's gradient from
    /// the rows the first stage hands back, and the stages' gradients put side by side by
    /// name are the whole model's.
    #[test]
    fn a_model_split_into_stages_keeps_its_bits() {
        let mut config = GptConfig::preset("tiny", 37).unwrap();
        config.n_layer = 5;
        let whole = ParamLayout::for_config(&config);
        let params = init_params(&config, &whole, 5);
        let mut rng = SplitMix64::new(11);
        let (batch, t) = (3, config.block_size - 3);
        let toks: Vec<u32> = (0..2 * batch * t).map(|_| rng.below(37) as u32).collect();
        let (inputs, targets) = toks.split_at(batch * t);
        let mut ws = Workspace::new(&config, &whole, 2);
        let mut want = vec![0f32; whole.total];
        let want_loss = ws
            .loss_sum_and_grad(&params, inputs, targets, batch, &mut want)
            .unwrap();
        for stages in [1u32, 2, 3, 5] {
            for threads in [1, 2] {
                let layers: Vec<StageLayers> =
                    tenax_core::pipeline::split_blocks(config.n_layer as u32, stages)
                        .unwrap()
                        .into_iter()
                        .enumerate()
                        .map(|(i, blocks)| StageLayers {
                            stage: i as u32,
                            blocks,
                            embeddings: i == 0,
                            head: i + 1 == stages as usize,
                        })
                        .collect();
                let layouts: Vec<ParamLayout> = layers
                    .iter()
                    .map(|l| ParamLayout::for_stage(&config, l))
                    .collect();
                let sp: Vec<Vec<f32>> = layouts
                    .iter()
                    .map(|l| stage_params(&whole, l, &params))
                    .collect();
                let mut wss: Vec<Workspace> = layers
                    .iter()
                    .map(|l| Workspace::for_stage(&config, l, threads))
                    .collect();
                // Forward, stage by stage.
                let mut acts: Vec<f32> = Vec::new();
                let mut loss = 0f32;
                for (i, w) in wss.iter_mut().enumerate() {
                    let input = match i {
                        0 => StageInput::Tokens(inputs),
                        _ => StageInput::Acts(&acts),
                    };
                    loss = w
                        .stage_forward(&sp[i], input, targets, batch, true)
                        .unwrap();
                    acts = w.output().to_vec();
                }
                assert_eq!(loss.to_bits(), want_loss.to_bits(), "S = {stages}: loss");
                // Backward, last stage first.
                let mut grads: Vec<Vec<f32>> =
                    layouts.iter().map(|l| vec![0f32; l.total]).collect();
                let mut dout: Option<Vec<f32>> = None;
                for i in (0..layers.len()).rev() {
                    wss[i]
                        .stage_backward(&sp[i], inputs, dout.as_deref(), &mut grads[i])
                        .unwrap();
                    dout = Some(wss[i].input_grad().to_vec());
                }
                let last = layers.len() - 1;
                if last > 0 {
                    let dx = wss[0].input_grad().to_vec();
                    wss[last]
                        .add_embedding_grad(&mut grads[last], inputs, &dx)
                        .unwrap();
                }
                // Side by side by name; the head stage's token embedding gradient is the one.
                let mut got = vec![0f32; whole.total];
                for (i, l) in layouts.iter().enumerate() {
                    for e in &l.entries {
                        if e.name == "wte.weight" && !layers[i].head {
                            assert!(grads[i][e.range()].iter().all(|&g| g == 0.0));
                            continue;
                        }
                        got[whole.get(&e.name).unwrap().range()]
                            .copy_from_slice(&grads[i][e.range()]);
                    }
                }
                for e in &whole.entries {
                    let (a, b) = (&got[e.range()], &want[e.range()]);
                    assert!(
                        a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                        "S = {stages}, threads {threads}: {} differs",
                        e.name
                    );
                }
            }
        }
    }

    /// A stage refuses what another stage does.
    #[test]
    fn stages_refuse_the_wrong_input() {
        let config = GptConfig::preset("tiny", 37).unwrap();
        let first = StageLayers {
            stage: 0,
            blocks: 0..1,
            embeddings: true,
            head: false,
        };
        let second = StageLayers {
            stage: 1,
            blocks: 1..2,
            embeddings: false,
            head: true,
        };
        let (l0, l1) = (
            ParamLayout::for_stage(&config, &first),
            ParamLayout::for_stage(&config, &second),
        );
        let (p0, p1) = (vec![0.01f32; l0.total], vec![0.01f32; l1.total]);
        let mut w0 = Workspace::for_stage(&config, &first, 1);
        let mut w1 = Workspace::for_stage(&config, &second, 1);
        let toks = vec![1u32; 2 * 8];
        let acts = vec![0f32; 2 * 8 * config.n_embd];
        assert!(matches!(
            w0.stage_forward(&p0, StageInput::Acts(&acts), &[], 2, true),
            Err(ModelError::Stage { .. })
        ));
        assert!(matches!(
            w1.stage_forward(&p1, StageInput::Tokens(&toks), &toks, 2, true),
            Err(ModelError::Stage { .. })
        ));
        assert!(matches!(
            w0.loss_sum(&p0, &toks, &toks, 2),
            Err(ModelError::Stage { .. })
        ));
        assert!(matches!(
            w1.stage_forward(&p1, StageInput::Acts(&acts[1..]), &toks, 2, true),
            Err(ModelError::Length { .. })
        ));
        w0.stage_forward(&p0, StageInput::Tokens(&toks), &[], 2, true)
            .unwrap();
        let mut g0 = vec![0f32; l0.total];
        assert!(matches!(
            w0.stage_backward(&p0, &toks, None, &mut g0),
            Err(ModelError::Stage { .. })
        ));
        assert!(w1
            .add_embedding_grad(&mut vec![0f32; l1.total], &toks, &acts)
            .is_ok());
        assert!(matches!(
            w0.add_embedding_grad(&mut g0, &toks, &acts),
            Err(ModelError::Stage { .. })
        ));
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use crate::params::init_params;
    use std::time::Instant;
    use tenax_core::rng::SplitMix64;

    /// Not a test: the nano step and its attention alone, at 1 and 2 threads.
    /// `cargo test -p tenax-model --release --lib timing -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn time_nano_step_parts() {
        let config = GptConfig::preset("nano", 65).unwrap();
        let layout = ParamLayout::for_config(&config);
        let params = init_params(&config, &layout, 1);
        let mut rng = SplitMix64::new(1);
        let (batch, t, c, nh) = (12, 64, 128, 4);
        let inputs: Vec<u32> = (0..batch * t).map(|_| rng.below(65) as u32).collect();
        let targets: Vec<u32> = (0..batch * t).map(|_| rng.below(65) as u32).collect();
        for threads in [1, 2] {
            let mut ws = Workspace::new(&config, &layout, threads);
            let mut grad = vec![0f32; layout.total];
            let reps = 30;
            ws.loss_sum_and_grad(&params, &inputs, &targets, batch, &mut grad)
                .unwrap();
            let t0 = Instant::now();
            for _ in 0..reps {
                ws.loss_sum_and_grad(&params, &inputs, &targets, batch, &mut grad)
                    .unwrap();
            }
            let step = t0.elapsed().as_secs_f64() * 1e3 / reps as f64;
            let t0 = Instant::now();
            for _ in 0..reps {
                ws.loss_sum(&params, &inputs, &targets, batch).unwrap();
            }
            let forward = t0.elapsed().as_secs_f64() * 1e3 / reps as f64;
            let qkv: Vec<f32> = (0..batch * t * 3 * c)
                .map(|_| rng.next_normal() as f32)
                .collect();
            let mut att = vec![0f32; batch * nh * t * t];
            let mut datt = att.clone();
            let mut y = vec![0f32; batch * t * c];
            let mut dqkv = qkv.clone();
            let t0 = Instant::now();
            for _ in 0..reps {
                ws.install(|| attention_fwd(threads, &qkv, &mut att, &mut y, batch, t, nh, c));
            }
            let fwd = t0.elapsed().as_secs_f64() * 1e3 / reps as f64;
            let t0 = Instant::now();
            for _ in 0..reps {
                ws.install(|| {
                    attention_bwd(
                        threads, &y, &qkv, &att, &mut datt, &mut dqkv, batch, t, nh, c,
                    )
                });
            }
            let bwd = t0.elapsed().as_secs_f64() * 1e3 / reps as f64;
            println!(
                "threads {threads}: step {step:.2} ms (forward alone {forward:.2} ms); attention per layer fwd {fwd:.3} ms, bwd {bwd:.3} ms (x{} layers)",
                config.n_layer
            );
        }
    }
}
