//! The etcd records of a job (tenax-cluster `records`): every decoder on any bytes returns
//! a value or a `RecordError`, never a panic; a plan that decodes is safe for what a
//! member does with it next (rank lookups, slot arithmetic, the next plan).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tenax_cluster::records::{
    decode_checkpoint, decode_config, decode_gen_value, decode_member_info, decode_plan,
    decode_plan_envelope, decode_suspect_report, encode_plan, encode_plan_envelope,
    parse_suspect_key,
};
use tenax_core::membership::{compute_plan, MemberInfo, PlannerConfig};
use tenax_core::slots::slots_for_rank;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_suspect_key(text);
    }
    if let Ok((generation, plan)) = decode_plan_envelope(data) {
        let _ = decode_plan(generation, &plan);
    }
    // The plan JSON alone, as the generation it says it is (when it says one).
    if let Ok(p) = decode_plan(1, data) {
        let _ = p.ranks_of(&p.members[0]);
    }
    if let Ok(plan) = decode_gen_value(data) {
        for r in 0..plan.world {
            let m = plan.member_of(r).expect("a valid plan hosts every rank");
            let _ = plan.ranks_of(m);
            for slots in [1, 7, u64::from(plan.world), 1000] {
                let _ = slots_for_rank(slots, u64::from(plan.world), u64::from(r));
            }
        }
        let _ = plan.ranks_of_each(plan.members.iter().map(|m| m.as_str()));
        // The plan round-trips through the writer's encoding.
        let again = encode_plan_envelope(plan.generation, &encode_plan(&plan));
        assert_eq!(decode_gen_value(&again).as_ref(), Ok(&plan));
        // The next generation's plan from this one, its members registered again.
        let infos: Vec<MemberInfo> = plan
            .members
            .iter()
            .map(|id| MemberInfo {
                id: id.clone(),
                devices: plan.ranks_of(id).len().max(1) as u32,
                joined_gen: 0,
                addr: "h:1".into(),
                metrics_addr: String::new(),
            })
            .collect();
        if let Some(next) = plan.generation.checked_add(1) {
            let _ = compute_plan(Some(&plan), &infos, &PlannerConfig::default(), next);
        }
    }
    let _ = decode_member_info("a", data);
    let _ = decode_config(data);
    let _ = decode_checkpoint(data);
    let _ = decode_suspect_report("s", "r", data);
});
