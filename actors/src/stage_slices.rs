//! The stages of pipelines whose data-parallel replicas live in other processes meet
//! in one whole-model collective (the node's [`Collective`] over the peer plane).
//!
//! Each stage of a local pipeline hands its slot gradients to its [`StageView`]. The
//! [`Assembler`] places every stage's tensors by name into that slot's whole-model
//! gradient (zeros first; the first stage's copy of the tied token embedding is left
//! out, the head stage answers for it) and takes the slot's loss from the head stage;
//! once all S stages of the slot are in, it hands the whole slot to the collective,
//! exactly as a data-parallel rank of the whole model would. The collective folds the
//! slots in slot order across every process; each stage then reads its tensors back out
//! of the reduced whole (the first stage's copy of the token embedding gets the head's).
//! A slot's gradient is the same whether its values come from one stage or S, and the
//! fold adds each value in the same order, so the bits are those of an unsplit run.
//!
//! The collective is asked for a step's result once per local pipeline (it counts one
//! taker per local rank, and a pipeline is one rank of the data-parallel group); that
//! pipeline's other stages read the same result.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tenax_cluster::{Collective, CollectiveError, Reduced, SlotContribution};
use tenax_model::ParamLayout;

/// How one stage's flat layout maps onto the whole model's.
struct StageMap {
    /// The stage's flat size.
    total: usize,
    /// (range in the stage, range in the whole model) of each tensor the stage
    /// contributes.
    gives: Vec<(Range<usize>, Range<usize>)>,
    /// (range in the stage, range in the whole model) of each tensor it reads back.
    takes: Vec<(Range<usize>, Range<usize>)>,
}

/// A slot being assembled.
struct Partial {
    grad: Vec<f32>,
    loss: f32,
    stages_in: usize,
}

/// A step's result taken from the collective for one local pipeline.
struct Taken {
    step: u64,
    result: Arc<Reduced>,
    reads: usize,
}

/// Steps that may be assembled at once (a pipeline a step ahead of another).
const OPEN_STEPS: usize = 2;

/// See the module docs.
pub(crate) struct Assembler {
    inner: Arc<dyn Collective>,
    whole_total: usize,
    maps: Vec<StageMap>,
    head: usize,
    partial: Mutex<BTreeMap<(u64, u64), Partial>>,
    /// Per local pipeline.
    taken: Vec<Mutex<Option<Taken>>>,
}

impl Assembler {
    /// An assembler over `inner` for `local_pipelines` pipelines of the stages
    /// `layouts` (stage order); `tied` names the token embedding tied to the head.
    pub(crate) fn new(
        inner: Arc<dyn Collective>,
        whole: &ParamLayout,
        layouts: &[ParamLayout],
        tied: &str,
        local_pipelines: usize,
    ) -> Result<Self, String> {
        let head = layouts.len().saturating_sub(1);
        let mut maps = Vec::with_capacity(layouts.len());
        for (s, layout) in layouts.iter().enumerate() {
            let (mut gives, mut takes) = (Vec::new(), Vec::new());
            for e in &layout.entries {
                let w = whole
                    .get(&e.name)
                    .ok_or_else(|| format!("stage {s} holds {}, which the model has not", e.name))?
                    .range();
                if w.len() != e.range().len() {
                    return Err(format!(
                        "stage {s}: {} has another size than the model's",
                        e.name
                    ));
                }
                takes.push((e.range(), w.clone()));
                if !(e.name == tied && s != head) {
                    gives.push((e.range(), w));
                }
            }
            maps.push(StageMap {
                total: layout.total,
                gives,
                takes,
            });
        }
        let given: usize = maps
            .iter()
            .flat_map(|m| &m.gives)
            .map(|(r, _)| r.len())
            .sum();
        if given != whole.total {
            return Err(format!(
                "the stages give {given} gradient values, the model has {}",
                whole.total
            ));
        }
        Ok(Self {
            inner,
            whole_total: whole.total,
            maps,
            head,
            partial: Mutex::new(BTreeMap::new()),
            taken: (0..local_pipelines).map(|_| Mutex::new(None)).collect(),
        })
    }

    /// The view stage `stage` of local pipeline `pipeline` contributes through.
    pub(crate) fn view(self: &Arc<Self>, pipeline: usize, stage: usize) -> StageView {
        StageView {
            asm: Arc::clone(self),
            pipeline,
            stage,
        }
    }

    fn contribute(
        &self,
        stage: usize,
        step: u64,
        c: SlotContribution,
    ) -> Result<(), CollectiveError> {
        let bad = |reason: String| CollectiveError::BadContribution { step, reason };
        let map = &self.maps[stage];
        if c.grad.len() != map.total {
            return Err(bad(format!(
                "stage {stage} slot {}: {} gradient values, the stage has {}",
                c.slot,
                c.grad.len(),
                map.total
            )));
        }
        let whole = {
            let mut partial = self.partial.lock().unwrap_or_else(PoisonError::into_inner);
            let open: std::collections::BTreeSet<u64> = partial.keys().map(|k| k.0).collect();
            if !open.contains(&step) && open.len() >= OPEN_STEPS {
                return Err(bad(format!("steps {open:?} are still being assembled")));
            }
            let p = partial.entry((step, c.slot)).or_insert_with(|| Partial {
                grad: vec![0f32; self.whole_total],
                loss: 0.0,
                stages_in: 0,
            });
            for (mine, w) in &map.gives {
                p.grad[w.clone()].copy_from_slice(&c.grad[mine.clone()]);
            }
            if stage == self.head {
                p.loss = c.loss_sum;
            }
            p.stages_in += 1;
            match p.stages_in == self.maps.len() {
                true => partial.remove(&(step, c.slot)),
                false => None,
            }
        };
        match whole {
            Some(p) => self.inner.contribute(
                step,
                SlotContribution {
                    slot: c.slot,
                    loss_sum: p.loss,
                    grad: p.grad,
                },
            ),
            None => Ok(()),
        }
    }

    fn reduced(
        &self,
        pipeline: usize,
        stage: usize,
        step: u64,
        timeout: Duration,
    ) -> Result<Arc<Reduced>, CollectiveError> {
        // Held while the collective is asked: the pipeline's other stages wait for the
        // same result rather than take another.
        let mut taken = self.taken[pipeline]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let result = match taken.as_mut().filter(|t| t.step == step) {
            Some(t) => {
                t.reads += 1;
                Arc::clone(&t.result)
            }
            None => {
                let result = self.inner.reduced(step, timeout)?;
                *taken = Some(Taken {
                    step,
                    result: Arc::clone(&result),
                    reads: 1,
                });
                result
            }
        };
        if taken.as_ref().is_some_and(|t| t.reads == self.maps.len()) {
            *taken = None;
        }
        drop(taken);
        let map = &self.maps[stage];
        let mut grad = vec![0f32; map.total];
        for (mine, w) in &map.takes {
            grad[mine.clone()].copy_from_slice(&result.grad_sum[w.clone()]);
        }
        Ok(Arc::new(Reduced {
            step,
            loss_sum: result.loss_sum,
            grad_sum: grad,
        }))
    }
}

/// One stage's door into the [`Assembler`]: a [`Collective`] sized to the stage.
pub(crate) struct StageView {
    asm: Arc<Assembler>,
    pipeline: usize,
    stage: usize,
}

impl Collective for StageView {
    fn contribute(&self, step: u64, contribution: SlotContribution) -> Result<(), CollectiveError> {
        self.asm.contribute(self.stage, step, contribution)
    }

    fn reduced(&self, step: u64, timeout: Duration) -> Result<Arc<Reduced>, CollectiveError> {
        self.asm.reduced(self.pipeline, self.stage, step, timeout)
    }

    fn abort(&self, reason: &str) {
        self.asm
            .partial
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        self.asm.inner.abort(reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tenax_cluster::InProcessCollective;
    use tenax_core::pipeline::{split_blocks, StageLayers};
    use tenax_model::GptConfig;

    fn layouts(model: &GptConfig, stages: u32) -> Vec<ParamLayout> {
        let blocks = split_blocks(model.n_layer as u32, stages).unwrap();
        let last = blocks.len() - 1;
        let layers = blocks
            .into_iter()
            .enumerate()
            .map(|(s, blocks)| StageLayers {
                stage: s as u32,
                blocks,
                embeddings: s == 0,
                head: s == last,
            });
        layers.map(|l| ParamLayout::for_stage(model, &l)).collect()
    }

    /// Slot gradients handed in by stages, in any order, reduce to what whole-model
    /// slots handed to the collective directly reduce to, bit for bit; each stage reads
    /// its own tensors back (the first stage's tied copy the head's).
    #[test]
    fn stages_reduce_to_the_whole_models_bits() {
        let model = GptConfig::preset("nano", 64).unwrap();
        let whole = ParamLayout::for_config(&model);
        let slots = 3u64;
        let value = |slot: u64, i: usize| ((i as f32) * 0.37 + slot as f32).sin() / 7.0;
        let direct = InProcessCollective::new(slots);
        for slot in 0..slots {
            let grad = (0..whole.total).map(|i| value(slot, i)).collect();
            let c = SlotContribution {
                slot,
                loss_sum: slot as f32 + 0.5,
                grad,
            };
            direct.contribute(4, c).unwrap();
        }
        let want = direct.reduced(4, Duration::from_secs(5)).unwrap();
        for stages in [1u32, 2, 3] {
            let ls = layouts(&model, stages);
            let inner = Arc::new(InProcessCollective::new(slots));
            let asm = Arc::new(Assembler::new(inner, &whole, &ls, "wte.weight", 1).unwrap());
            // Stages in reverse order, slots backwards: order must not matter.
            for slot in (0..slots).rev() {
                for (s, l) in ls.iter().enumerate().rev() {
                    let mut grad = vec![0f32; l.total];
                    for e in &l.entries {
                        let w = whole.get(&e.name).unwrap().range();
                        let tied_copy = e.name == "wte.weight" && s + 1 != ls.len();
                        for (k, wi) in w.enumerate() {
                            grad[e.range().start + k] =
                                if tied_copy { 9.0 } else { value(slot, wi) };
                        }
                    }
                    let head = s + 1 == ls.len();
                    let loss = if head { slot as f32 + 0.5 } else { 0.0 };
                    let c = SlotContribution {
                        slot,
                        loss_sum: loss,
                        grad,
                    };
                    asm.view(0, s).contribute(4, c).unwrap();
                }
            }
            for (s, l) in ls.iter().enumerate() {
                let got = asm.view(0, s).reduced(4, Duration::from_secs(5)).unwrap();
                assert_eq!(got.loss_sum.to_bits(), want.loss_sum.to_bits());
                for e in &l.entries {
                    let w = whole.get(&e.name).unwrap().range();
                    let (a, b) = (&got.grad_sum[e.range()], &want.grad_sum[w]);
                    let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "S={stages} stage {s}: {} differs", e.name);
                }
            }
        }
    }

    /// A stage of the wrong size is refused with what it is.
    #[test]
    fn a_contribution_of_the_wrong_size_is_refused() {
        let model = GptConfig::preset("nano", 64).unwrap();
        let whole = ParamLayout::for_config(&model);
        let ls = layouts(&model, 2);
        let inner = Arc::new(InProcessCollective::new(1));
        let asm = Arc::new(Assembler::new(inner, &whole, &ls, "wte.weight", 1).unwrap());
        let c = SlotContribution {
            slot: 0,
            loss_sum: 0.0,
            grad: vec![0.0; 3],
        };
        let e = asm.view(0, 1).contribute(0, c).unwrap_err();
        assert!(
            e.to_string().contains("stage 1 slot 0: 3 gradient values"),
            "{e}"
        );
    }
}
