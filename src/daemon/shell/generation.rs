//! How the shell forms a generation and moves the node's state: the generation's view
//! and communicator, which member computes each slot, this node's stage of a pipeline,
//! state copies (fetch and serve), and starting and stopping the trainer.

use std::sync::Arc;

use tenax_actors::{PipelineSpec, Trainer};
use tenax_cluster::peer::{CommSpec, GrpcCollective, PeerAddr};
use tenax_core::guard::Guard;
use tenax_core::membership::{MemberId, Plan};
use tenax_core::node::Event;
use tenax_core::pipeline::{split_blocks, StageLayers};
use tokio_util::sync::CancellationToken;

use super::super::work::{self, TrainerKind};
use super::Shell;
use crate::train::Start;

impl<'a> Shell<'a> {
    /// A generation's communicator is built: keep it, and which member computes each
    /// slot.
    pub(super) fn install(&mut self, comm: Arc<GrpcCollective>, peers: Vec<PeerAddr>) {
        #[cfg(feature = "chaos-hooks")]
        if let Some(step) = crate::hooks::step(crate::hooks::EXIT_IN_ALL_GATHER) {
            comm.exit_during_all_gather(step);
        }
        let spec = comm.spec();
        let plan = self.p.member.current_plan();
        let plan = plan.filter(|plan| plan.generation == spec.generation);
        let ids = peers.iter().map(|p| p.id.as_str());
        let ranks = match plan {
            // Stages on different members: a slot's loss comes from its pipeline's head
            // stage, so a late slot names that member (the stage it waits for may be
            // another member of the pipeline).
            Some(plan) if self.p.s.stages_across_nodes && plan.pp_depth > 1 => peers
                .iter()
                .map(|p| {
                    plan.ranks
                        .iter()
                        .filter(|a| a.member.as_str() == p.id && a.stage + 1 == plan.pp_depth)
                        .map(|a| a.dp_index)
                        .collect()
                })
                .collect(),
            Some(p) => p.ranks_of_each(ids),
            None => vec![Vec::new(); peers.len()],
        };
        self.slot_owner =
            tenax_core::slots::slot_owners(spec.num_slots, u64::from(spec.world), &ranks);
        self.peers = peers;
        self.comm = Some(comm);
    }

    /// Form a generation: its view, and its communicator (built in the background).
    pub(super) fn build(&mut self, plan: Plan, reason: &str) {
        let me = self.me();
        self.gen_cancel.cancel();
        self.gen_cancel = CancellationToken::new();
        let local = plan.ranks_of(&MemberId::new(me.clone()));
        let leader = self.p.member.stats().leader;
        let reformed = self.formed > 0;
        (self.p.shared.view()).note_generation(&plan, &local, leader, reformed);
        self.formed += 1;
        println!("node {me}: {reason}");
        let (slots, params) = (
            self.p.prep.setup.batch.num_slots(),
            self.p.prep.param_layout.total,
        );
        let (job, reduction) = (&self.p.s.job, self.p.s.reduction);
        let spec = match self.stage_in(&plan) {
            Some((_, pipeline, layers)) => {
                let spec = CommSpec::for_generation(
                    job,
                    plan.generation,
                    vec![pipeline],
                    plan.dp_width,
                    slots,
                    params,
                    reduction,
                );
                let frames =
                    stage_frames_per_step(&self.p.prep.setup, plan.dp_width, spec.max_frame_floats);
                let part = tenax_actors::stage_part(&self.p.prep.setup.model, &layers, frames);
                CommSpec {
                    stage: Some(part),
                    ..spec
                }
            }
            None => CommSpec::for_generation(
                job,
                plan.generation,
                local,
                plan.world,
                slots,
                params,
                reduction,
            ),
        };
        self.gen_plan = Some(plan.clone());
        let (etcd, hub) = (self.p.etcd.clone(), self.p.shared.hub.clone());
        let f = work::build_comm(etcd, hub, plan, spec, me);
        self.work.push(Box::pin(f));
    }

    /// The hash of the state the shell holds (taken on a blocking thread when unknown).
    pub(super) fn state_hash(&mut self) -> String {
        if let Some(h) = &self.hash {
            return h.clone();
        }
        let h = match &self.state {
            Some(s) => tokio::task::block_in_place(|| tenax_actors::param_hash(&s.params)),
            None => String::new(),
        };
        self.hash = Some(h.clone());
        h
    }

    /// Copy the state of `step` (hash `hash`) from member `donor` of `generation`
    /// (in the background).
    pub(super) fn fetch(&mut self, generation: u64, donor: usize, step: u64, hash: String) {
        let Some(peer) = self.peers.get(donor).cloned() else {
            self.queue.push_back(Event::Failed {
                generation,
                peers_may_have_failed: false,
                error: format!("no member {donor} in generation {generation}"),
            });
            return;
        };
        let m = &self.machine;
        let had = m.holds_state().then(|| m.position().0);
        let f = work::fetch(work::Fetch {
            hub: self.p.shared.hub.clone(),
            shared: self.p.shared.clone(),
            generation,
            me: self.me(),
            donor: peer,
            step,
            hash,
            timeout: self.p.s.step_timeout,
            had,
        });
        self.work.push(Box::pin(f));
    }

    /// Send the state the shell holds to `receivers` of `generation` (in the background).
    pub(super) fn serve(&mut self, generation: u64, receivers: Vec<usize>) {
        let hash = self.state_hash();
        let (Some(comm), Some(state)) = (self.comm_of(generation), self.state.take()) else {
            return;
        };
        let names: Vec<String> = receivers
            .iter()
            .filter_map(|&i| self.peers.get(i).map(|p| p.id.clone()))
            .collect();
        let hub = self.p.shared.hub.clone();
        let f = work::serve(comm, hub, state, hash, names, self.p.s.step_timeout);
        self.work.push(Box::pin(f));
    }

    /// Start `generation`'s trainer from the state the shell holds, with the guard
    /// going on from its guard state (in the background).
    pub(super) fn start_trainer(&mut self, generation: u64) {
        let (Some(comm), Some(state)) = (self.comm_of(generation), self.state.take()) else {
            self.queue.push_back(Event::Fatal {
                error: format!("generation {generation}: no state or communicator to train with"),
            });
            return;
        };
        // The guard goes on from the state's guard state (every member's is the same: a
        // copy carries the donor's, a checkpoint the committer's).
        let mut state = state;
        let cfg = self.p.prep.cfg.guard();
        let rolls_back = cfg.enabled() && cfg.rollback_after > 0;
        self.guard_snapshot = None;
        self.guard = match state.guard.take() {
            Some(st) => {
                let (guard, holds) = Guard::resumed(cfg, st, state.step);
                if holds && rolls_back {
                    // The state this generation starts from is the snapshot's.
                    let snap = tenax_actors::Snapshot {
                        params: Arc::new(state.params.clone()),
                        opt: Arc::new(state.opt.clone()),
                    };
                    self.guard_snapshot = Some((state.step, snap));
                }
                guard
            }
            None => Guard::new(cfg),
        };
        #[cfg(feature = "chaos-hooks")]
        let state = match crate::hooks::flip_once(state, &self.me()) {
            (state, true) => {
                self.hash = None;
                state
            }
            (state, false) => state,
        };
        let (setup, data) = (self.p.prep.setup.clone(), self.p.prep.data.clone());
        let kind = match self.trainer_kind(generation) {
            Ok(k) => k,
            Err(error) => {
                self.queue.push_back(Event::Fatal { error });
                return;
            }
        };
        let f = work::start_trainer(comm, setup, data, state, kind, self.p.node);
        self.work.push(Box::pin(f));
    }

    /// With `--stages-across-nodes` and a plan of more than one stage: this node's
    /// stage, its pipeline and the stage's layers.
    fn stage_in(&self, plan: &Plan) -> Option<(u32, u32, StageLayers)> {
        if !self.p.s.stages_across_nodes || plan.pp_depth < 2 {
            return None;
        }
        let me = MemberId::new(self.me());
        let a = plan.ranks.iter().find(|a| a.member == me)?;
        let layers = split_blocks(self.p.prep.setup.model.n_layer as u32, plan.pp_depth)
            .ok()?
            .into_iter()
            .nth(a.stage as usize)?;
        let layers = StageLayers {
            stage: a.stage,
            blocks: layers,
            embeddings: a.stage == 0,
            head: a.stage + 1 == plan.pp_depth,
        };
        Some((a.stage, a.dp_index, layers))
    }

    /// What the trainer of `generation` runs: one stage of a pipeline on several
    /// members, whole pipelines here, or whole-model ranks.
    pub(super) fn trainer_kind(&self, generation: u64) -> Result<TrainerKind, String> {
        let plan = self
            .gen_plan
            .as_ref()
            .filter(|p| p.generation == generation);
        let schedule = self.p.prep.pipeline.map(|p| p.schedule).unwrap_or_default();
        match plan.and_then(|p| self.stage_in(p).map(|s| (p, s))) {
            Some((plan, (stage, pipeline, _))) => {
                let stages = plan.pp_depth;
                let pipeline_members = (0..stages)
                    .map(|k| {
                        let rank = pipeline * stages + k;
                        let member = plan.member_of(rank).map(|m| m.as_str().to_string());
                        member
                            .and_then(|id| self.peers.iter().position(|p| p.id == id))
                            .ok_or_else(|| {
                                format!("generation {generation}: rank {rank} has no member among the peers")
                            })
                    })
                    .collect::<Result<Vec<usize>, String>>()?;
                println!(
                    "node {}: generation {generation}: runs stage {stage} of {stages} of pipeline {pipeline} (of {}); it keeps the whole model's state",
                    self.me(),
                    plan.dp_width
                );
                Ok(TrainerKind::Stage {
                    spec: PipelineSpec { stages, schedule },
                    stage,
                    pipeline_members,
                })
            }
            None if self.p.s.stages_across_nodes => Ok(TrainerKind::Whole),
            None => Ok(match self.p.prep.pipeline {
                Some(p) => TrainerKind::Pipelines(p),
                None => TrainerKind::Whole,
            }),
        }
    }

    /// Take the trainer's state back (the last completed step) and stop it.
    pub(super) async fn stop_trainer(&mut self) {
        let Some(trainer) = self.trainer.take() else {
            return;
        };
        let (step, cursor) = self.machine.position();
        let snap = trainer.snapshot().await;
        Trainer::release(trainer).await;
        match snap {
            Ok(snap) => {
                self.state = Some(Start {
                    step,
                    cursor,
                    // The ranks are gone: the buffers are no longer shared.
                    params: Arc::unwrap_or_clone(snap.params),
                    opt: Arc::unwrap_or_clone(snap.opt),
                    guard: self.guard_state(),
                })
            }
            Err(e) => self.queue.push_back(Event::Fatal {
                error: format!("cannot read its state after step {step}: {e}"),
            }),
        }
    }
}

/// Most STAGE frames a stage sends any one member in a step: a pipeline's slots'
/// activations and input gradients (the first stage of two also sends the head its
/// embedding rows), each cut into frames of `max_frame_floats`, with room to spare.
fn stage_frames_per_step(
    setup: &tenax_actors::TrainSetup,
    pipelines: u32,
    max_frame_floats: usize,
) -> usize {
    let b = &setup.batch;
    let slots = tenax_core::slots::slots_for_rank(b.num_slots(), u64::from(pipelines.max(1)), 0);
    let slots = (slots.end - slots.start) as usize;
    let values = b.micro_batch_size as usize * setup.model.block_size * setup.model.n_embd;
    let per_message = values.div_ceil(max_frame_floats.max(1)).max(1);
    2 * slots * per_message + 8
}
