//! Late and failed peers: whom the shell reports to the leader as suspects (the leader
//! judges).

use tenax_cluster::peer::GrpcCollective;
use tenax_core::membership::MemberId;

use super::Shell;

impl Shell<'_> {
    /// Step `step + 1` is past its deadline: report the members it waits for.
    pub(super) fn suspect_late(&self, generation: u64, step: u64, waited_ms: u64) {
        let Some(comm) = self.comm_of(generation) else {
            return;
        };
        let late = match self.p.s.stages_across_nodes {
            false => comm.late_members(step, &self.slot_owner),
            true => self.late_pipelines(&comm, step),
        };
        for id in late {
            let me = self.me();
            eprintln!("warning: node {me}: step {} waits for {id} after {waited_ms} ms: reporting it as a suspect", step + 1);
            let why = format!("step {} still waits for it after {waited_ms} ms", step + 1);
            self.suspect(generation, id, why);
        }
    }

    /// With stages on different members a late slot names its pipeline's head stage
    /// (whose loss comes last), but any stage of that pipeline may be the one that
    /// hangs, this node's own pipeline included: the members of the pipelines of the late
    /// slots (this one left out), each once. The leader's probe then tells the hung one
    /// (no answer) from the ones waiting on it.
    fn late_pipelines(&self, comm: &GrpcCollective, step: u64) -> Vec<String> {
        let Some(plan) = self.gen_plan.as_ref() else {
            return Vec::new();
        };
        let me = self.me();
        let pipelines: Vec<u32> = match comm.progress(step) {
            Some((losses, chunks)) => {
                let late =
                    tenax_core::detector::late_members(&self.slot_owner, &losses, Some(&chunks));
                let members = &comm.spec().members;
                let late: Vec<&str> = late
                    .iter()
                    .filter_map(|&k| members.get(k).map(|m| m.id.as_str()))
                    .collect();
                plan.ranks
                    .iter()
                    .filter(|a| late.contains(&a.member.as_str()))
                    .map(|a| a.dp_index)
                    .collect()
            }
            // Nothing of the step reached the communicator here: this stage still waits
            // for its neighbours' messages, so its own pipeline is late.
            None => plan
                .ranks
                .iter()
                .filter(|a| a.member.as_str() == me)
                .map(|a| a.dp_index)
                .collect(),
        };
        let mut out: Vec<String> = Vec::new();
        for a in plan
            .ranks
            .iter()
            .filter(|a| pipelines.contains(&a.dp_index))
        {
            let id = a.member.as_str().to_string();
            if id != me && !out.contains(&id) {
                out.push(id);
            }
        }
        out
    }

    /// Report member `id` of `generation` as a suspect (the leader judges).
    pub(super) fn suspect(&self, generation: u64, id: String, why: String) {
        self.p.shared.view().suspicions += 1;
        self.p.member.suspect(generation, MemberId::new(id), why);
    }
}
