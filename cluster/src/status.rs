//! The job status `tenax status` shows: the members' Status replies summarised into one
//! JSON object ([`summarize`], the `--json` output) and the human table
//! ([`render_table`]). Pure functions of the replies; the querying is the CLI's.

use serde_json::{json, Value};
use tenax_core::membership::MemberInfo;
use tenax_proto::v1::StatusReply;

/// How many characters of a parameter hash the table shows.
const HASH_CHARS: usize = 12;

/// `v` as JSON, or null when it is NaN or infinite.
fn finite(v: f64) -> Value {
    if v.is_finite() {
        json!(v)
    } else {
        Value::Null
    }
}

/// A string as JSON, or null when it is empty.
fn non_empty(s: &str) -> Value {
    if s.is_empty() {
        Value::Null
    } else {
        json!(s)
    }
}

/// The `--json` object of `tenax status` for `job`, from the stored plan's generation
/// and each registered member's answer (or error).
///
/// Job-level `step` is the highest member step; `target_steps`, `loss` and
/// `tokens_per_s` come from a member at that step (the leader if it is one);
/// `generation` is the plan's, else the highest a member reports; `last_checkpoint` is
/// the newest one any member knows (null if none); `leader` is the member that says it
/// leads (the one in the highest generation if several do). Members are sorted by id. A
/// member that answers under another member id is listed with an error.
pub fn summarize(
    job: &str,
    plan_gen: Option<u64>,
    replies: Vec<(MemberInfo, Result<StatusReply, String>)>,
) -> Value {
    let mut replies = replies;
    replies.sort_by(|a, b| a.0.id.cmp(&b.0.id));
    // A reply from someone other than the registered member is not this member's.
    let replies: Vec<(MemberInfo, Result<StatusReply, String>)> = replies
        .into_iter()
        .map(|(info, r)| {
            let r = match r {
                Ok(s) if !s.member_id.is_empty() && s.member_id != info.id.as_str() => {
                    Err(format!(
                        "{} answered as member {}: the registration is stale",
                        info.addr, s.member_id
                    ))
                }
                r => r,
            };
            (info, r)
        })
        .collect();
    let ok: Vec<(&MemberInfo, &StatusReply)> = replies
        .iter()
        .filter_map(|(i, r)| r.as_ref().ok().map(|r| (i, r)))
        .collect();
    let best = ok
        .iter()
        .max_by_key(|(_, r)| (r.step, r.leader, r.generation))
        .map(|(_, r)| *r);
    let generation = plan_gen.or_else(|| ok.iter().map(|(_, r)| r.generation).max());
    let leader = ok
        .iter()
        .filter(|(_, r)| r.leader)
        .max_by_key(|(_, r)| r.generation)
        .map(|(i, _)| i.id.as_str());
    let last_checkpoint = ok
        .iter()
        .map(|(_, r)| r)
        .filter(|r| r.last_checkpoint_step > 0)
        .max_by_key(|r| r.last_checkpoint_step)
        .map(|r| json!({"step": r.last_checkpoint_step, "url": r.last_checkpoint_url}));
    let members: Vec<Value> = replies
        .iter()
        .map(|(info, r)| match r {
            Ok(r) => json!({
                "id": info.id.as_str(),
                "addr": non_empty(&info.addr),
                "rank": r.ranks.first(),
                "ranks": r.ranks,
                "pipeline_stages": r.pipeline_stages.max(1),
                "pipeline_schedule": non_empty(&r.pipeline_schedule),
                "stages_across_nodes": r.stages_across_nodes,
                "step": r.step,
                "param_hash": non_empty(&r.param_hash),
                "loss": finite(r.loss),
                "phase": non_empty(&r.phase),
                "leader": r.leader,
                "generation": r.generation,
                "stale_refused": r.stale_refused,
                "metrics_addr": if r.metrics_addr.is_empty() {
                    non_empty(&info.metrics_addr)
                } else {
                    json!(r.metrics_addr)
                },
                "error": Value::Null,
            }),
            Err(e) => json!({
                "id": info.id.as_str(),
                "addr": non_empty(&info.addr),
                "rank": Value::Null,
                "ranks": Value::Null,
                "pipeline_stages": Value::Null,
                "pipeline_schedule": Value::Null,
                "stages_across_nodes": Value::Null,
                "step": Value::Null,
                "param_hash": Value::Null,
                "loss": Value::Null,
                "phase": Value::Null,
                "leader": Value::Null,
                "generation": Value::Null,
                "stale_refused": Value::Null,
                "metrics_addr": non_empty(&info.metrics_addr),
                "error": e,
            }),
        })
        .collect();
    json!({
        "job": job,
        "generation": generation,
        "step": best.map(|r| r.step),
        "target_steps": best.map(|r| r.target_steps),
        "loss": best.map_or(Value::Null, |r| finite(r.loss)),
        "tokens_per_s": best.map_or(Value::Null, |r| finite(r.tokens_per_s)),
        "last_checkpoint": last_checkpoint,
        "leader": leader,
        "members": members,
    })
}

/// Ranks as a short list with runs of three or more collapsed: `0-3,6,7`.
fn format_ranks(ranks: &[u64]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < ranks.len() {
        let mut j = i;
        while j + 1 < ranks.len() && ranks[j + 1] == ranks[j] + 1 {
            j += 1;
        }
        parts.push(if j < i + 2 {
            (i..=j)
                .map(|k| ranks[k].to_string())
                .collect::<Vec<_>>()
                .join(",")
        } else {
            format!("{}-{}", ranks[i], ranks[j])
        });
        i = j + 1;
    }
    if parts.is_empty() {
        "-".to_string()
    } else {
        parts.join(",")
    }
}

/// A JSON scalar as table text; null is `-`.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A number with `decimals` decimals, or `-`.
fn number(v: &Value, decimals: usize) -> String {
    v.as_f64()
        .map_or_else(|| "-".to_string(), |x| format!("{x:.decimals$}"))
}

/// The human table of `tenax status`, from a [`summarize`] object: two lines about the
/// job, a blank line, then a header and one line per member (id, addr, ranks with the
/// pipeline they run as when it has stages, step,
/// phase, the first 12 characters of the parameter hash, then notes: `leader`, a
/// generation other than the job's, a parameter hash that differs from the
/// leading member's at the same step, or `(unreachable: ...)`).
pub fn render_table(summary: &Value) -> String {
    let step = match (summary["step"].as_u64(), summary["target_steps"].as_u64()) {
        (Some(s), Some(t)) if t > 0 => format!("{s}/{t}"),
        (Some(s), _) => s.to_string(),
        _ => "-".to_string(),
    };
    let checkpoint = match summary["last_checkpoint"].as_object() {
        Some(c) => match c.get("url").and_then(Value::as_str) {
            Some(url) if !url.is_empty() => format!("step {} ({url})", cell(&c["step"])),
            _ => format!("step {}", cell(&c["step"])),
        },
        None => "none".to_string(),
    };
    let mut out = format!(
        "job {}   generation {}   leader {}\nstep {step}   loss {}   tokens/s {}   last checkpoint {checkpoint}\n\n",
        cell(&summary["job"]),
        cell(&summary["generation"]),
        cell(&summary["leader"]),
        number(&summary["loss"], 4),
        number(&summary["tokens_per_s"], 1),
    );
    let job_gen = summary["generation"].as_u64();
    let job_step = summary["step"].as_u64();
    let empty = Vec::new();
    let members = summary["members"].as_array().unwrap_or(&empty);
    // The reference hash: the leader's at the job step, else the first at that step.
    let at_job_step = |m: &&Value| job_step.is_some() && m["step"].as_u64() == job_step;
    let reference_hash = members
        .iter()
        .filter(at_job_step)
        .find(|m| m["leader"] == json!(true))
        .or_else(|| members.iter().find(at_job_step))
        .and_then(|m| m["param_hash"].as_str());

    let mut rows = vec![[
        "ID".to_string(),
        "ADDR".to_string(),
        "RANKS".to_string(),
        "STEP".to_string(),
        "PHASE".to_string(),
        "PARAM_HASH".to_string(),
        String::new(),
    ]];
    for m in members {
        let mut notes = Vec::new();
        if let Some(e) = m["error"].as_str() {
            notes.push(format!("(unreachable: {e})"));
        } else {
            if m["leader"] == json!(true) {
                notes.push("leader".to_string());
            }
            if let (Some(g), Some(jg)) = (m["generation"].as_u64(), job_gen) {
                if g != jg {
                    notes.push(format!("generation {g}"));
                }
            }
            if let (Some(h), Some(r)) = (m["param_hash"].as_str(), reference_hash) {
                if at_job_step(&m) && h != r {
                    notes.push("param_hash differs".to_string());
                }
            }
        }
        let ranks: Vec<u64> = m["ranks"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default();
        let hash: String = cell(&m["param_hash"]).chars().take(HASH_CHARS).collect();
        rows.push([
            cell(&m["id"]),
            cell(&m["addr"]),
            match (m["ranks"].is_null(), m["pipeline_stages"].as_u64()) {
                (true, _) => "-".to_string(),
                (false, Some(s)) if s > 1 && m["stages_across_nodes"] == true => ranks
                    .iter()
                    .map(|r| format!("{r} (stage {} of {s}, pipeline {})", r % s, r / s))
                    .collect::<Vec<_>>()
                    .join(", "),
                (false, Some(s)) if s > 1 => format!(
                    "{} ({s} stages, {})",
                    format_ranks(&ranks),
                    cell(&m["pipeline_schedule"])
                ),
                (false, _) => format_ranks(&ranks),
            },
            cell(&m["step"]),
            cell(&m["phase"]),
            hash,
            notes.join(", "),
        ]);
    }
    let mut widths = [0usize; 7];
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    for row in &rows {
        let mut line = String::new();
        for (i, (c, w)) in row.iter().zip(widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(c);
            if i + 1 < row.len() {
                line.push_str(&" ".repeat(w - c.chars().count()));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tenax_core::membership::MemberId;

    fn info(id: &str, addr: &str) -> MemberInfo {
        MemberInfo {
            id: MemberId::new(id),
            devices: 1,
            joined_gen: 0,
            addr: addr.to_string(),
            metrics_addr: format!("{addr}9"),
        }
    }

    fn reply(id: &str, step: u64, ranks: Vec<u32>, leader: bool) -> StatusReply {
        StatusReply {
            job: "j".into(),
            member_id: id.into(),
            addr: String::new(),
            generation: 3,
            ranks,
            world: 4,
            step,
            target_steps: 100,
            loss: 2.5 + step as f64 / 100.0,
            tokens_per_s: 1000.0 + step as f64,
            param_hash: format!("{:0>64}", step),
            last_checkpoint_step: step / 10 * 10,
            last_checkpoint_url: if step >= 10 {
                format!("file:///c/{}", step / 10 * 10)
            } else {
                String::new()
            },
            phase: "training".into(),
            leader,
            stale_refused: 1,
            metrics_addr: String::new(),
            config_hash: "cfg".into(),
            pipeline_stages: 0,
            pipeline_schedule: String::new(),
            stages_across_nodes: false,
        }
    }

    #[test]
    fn summarize_table() {
        struct Case {
            what: &'static str,
            plan_gen: Option<u64>,
            replies: Vec<(MemberInfo, Result<StatusReply, String>)>,
            want: Value,
        }
        let cases = vec![
            Case {
                what: "two members, one unreachable, plan generation wins",
                plan_gen: Some(4),
                replies: vec![
                    (info("b", "h:2"), Err("connection refused".into())),
                    (info("a", "h:1"), Ok(reply("a", 42, vec![0, 1], true))),
                ],
                want: json!({
                    "job": "j", "generation": 4, "step": 42, "target_steps": 100,
                    "loss": 2.92, "tokens_per_s": 1042.0,
                    "last_checkpoint": {"step": 40, "url": "file:///c/40"},
                    "leader": "a",
                    "members": [
                        {"id": "a", "addr": "h:1", "rank": 0, "pipeline_stages": 1, "pipeline_schedule": null, "stages_across_nodes": false, "ranks": [0, 1], "step": 42,
                         "param_hash": format!("{:0>64}", 42), "loss": 2.92, "phase": "training",
                         "leader": true, "generation": 3, "stale_refused": 1,
                         "metrics_addr": "h:19", "error": null},
                        {"id": "b", "addr": "h:2", "rank": null, "ranks": null, "pipeline_stages": null, "pipeline_schedule": null, "stages_across_nodes": null, "step": null,
                         "param_hash": null, "loss": null, "phase": null, "leader": null,
                         "generation": null, "stale_refused": null, "metrics_addr": "h:29",
                         "error": "connection refused"},
                    ],
                }),
            },
            Case {
                what:
                    "max step wins, no plan: max member generation, NaN loss is null, no checkpoint",
                plan_gen: None,
                replies: vec![
                    (info("a", "h:1"), Ok(reply("a", 5, vec![], true))),
                    (
                        info("b", ""),
                        Ok({
                            let mut r = reply("b", 7, vec![2], false);
                            r.loss = f64::NAN;
                            r.generation = 5;
                            r.metrics_addr = "m:1".into();
                            r
                        }),
                    ),
                ],
                want: json!({
                    "job": "j", "generation": 5, "step": 7, "target_steps": 100,
                    "loss": null, "tokens_per_s": 1007.0, "last_checkpoint": null,
                    "leader": "a",
                    "members": [
                        {"id": "a", "addr": "h:1", "rank": null, "pipeline_stages": 1, "pipeline_schedule": null, "stages_across_nodes": false, "ranks": [], "step": 5,
                         "param_hash": format!("{:0>64}", 5), "loss": 2.55, "phase": "training",
                         "leader": true, "generation": 3, "stale_refused": 1,
                         "metrics_addr": "h:19", "error": null},
                        {"id": "b", "addr": null, "rank": 2, "pipeline_stages": 1, "pipeline_schedule": null, "stages_across_nodes": false, "ranks": [2], "step": 7,
                         "param_hash": format!("{:0>64}", 7), "loss": null, "phase": "training",
                         "leader": false, "generation": 5, "stale_refused": 1,
                         "metrics_addr": "m:1", "error": null},
                    ],
                }),
            },
            Case {
                what: "nobody answers; a wrong member id is an error",
                plan_gen: None,
                replies: vec![
                    (info("a", "h:1"), Ok(reply("z", 5, vec![0], true))),
                    (info("b", "h:2"), Err("no answer within 5s".into())),
                ],
                want: json!({
                    "job": "j", "generation": null, "step": null, "target_steps": null,
                    "loss": null, "tokens_per_s": null, "last_checkpoint": null, "leader": null,
                    "members": [
                        {"id": "a", "addr": "h:1", "rank": null, "ranks": null, "pipeline_stages": null, "pipeline_schedule": null, "stages_across_nodes": null, "step": null,
                         "param_hash": null, "loss": null, "phase": null, "leader": null,
                         "generation": null, "stale_refused": null, "metrics_addr": "h:19",
                         "error": "h:1 answered as member z: the registration is stale"},
                        {"id": "b", "addr": "h:2", "rank": null, "ranks": null, "pipeline_stages": null, "pipeline_schedule": null, "stages_across_nodes": null, "step": null,
                         "param_hash": null, "loss": null, "phase": null, "leader": null,
                         "generation": null, "stale_refused": null, "metrics_addr": "h:29",
                         "error": "no answer within 5s"},
                    ],
                }),
            },
            Case {
                what: "newest checkpoint from any member; leader in the highest generation",
                plan_gen: Some(9),
                replies: vec![
                    (info("a", "h:1"), Ok(reply("a", 25, vec![0], true))),
                    (
                        info("b", "h:2"),
                        Ok({
                            let mut r = reply("b", 19, vec![1], true);
                            r.generation = 9;
                            r.last_checkpoint_step = 30;
                            r.last_checkpoint_url = "s3://b/30".into();
                            r
                        }),
                    ),
                ],
                want: json!({
                    "job": "j", "generation": 9, "step": 25, "target_steps": 100,
                    "loss": 2.75, "tokens_per_s": 1025.0,
                    "last_checkpoint": {"step": 30, "url": "s3://b/30"},
                    "leader": "b",
                    "members": [
                        {"id": "a", "addr": "h:1", "rank": 0, "pipeline_stages": 1, "pipeline_schedule": null, "stages_across_nodes": false, "ranks": [0], "step": 25,
                         "param_hash": format!("{:0>64}", 25), "loss": 2.75, "phase": "training",
                         "leader": true, "generation": 3, "stale_refused": 1,
                         "metrics_addr": "h:19", "error": null},
                        {"id": "b", "addr": "h:2", "rank": 1, "pipeline_stages": 1, "pipeline_schedule": null, "stages_across_nodes": false, "ranks": [1], "step": 19,
                         "param_hash": format!("{:0>64}", 19), "loss": 2.69, "phase": "training",
                         "leader": true, "generation": 9, "stale_refused": 1,
                         "metrics_addr": "h:29", "error": null},
                    ],
                }),
            },
        ];
        for c in cases {
            let got = summarize("j", c.plan_gen, c.replies);
            assert_eq!(got, c.want, "case {}:\n{got:#}", c.what);
        }
    }

    #[test]
    fn render_table_cases() {
        let summary = summarize(
            "j",
            Some(4),
            vec![
                (
                    info("a", "10.0.0.1:7000"),
                    Ok(reply("a", 42, vec![0, 1, 2, 5], true)),
                ),
                (
                    info("c", "10.0.0.3:7000"),
                    Ok({
                        let mut r = reply("c", 42, vec![6], false);
                        r.generation = 4;
                        r.param_hash = "f".repeat(64);
                        r.pipeline_stages = 2;
                        r.pipeline_schedule = "1f1b".into();
                        r
                    }),
                ),
                (info("b", "10.0.0.2:7000"), Err("connection refused".into())),
            ],
        );
        let want = "\
job j   generation 4   leader a
step 42/100   loss 2.9200   tokens/s 1042.0   last checkpoint step 40 (file:///c/40)

ID  ADDR           RANKS               STEP  PHASE     PARAM_HASH
a   10.0.0.1:7000  0-2,5               42    training  000000000000  leader, generation 3
b   10.0.0.2:7000  -                   -     -         -             (unreachable: connection refused)
c   10.0.0.3:7000  6 (2 stages, 1f1b)  42    training  ffffffffffff  param_hash differs
";
        assert_eq!(render_table(&summary), want);

        // Each member one stage of a pipeline on several members.
        let across = |id: &str, rank: u32| {
            let mut r = reply(id, 9, vec![rank], rank == 0);
            r.pipeline_stages = 2;
            r.pipeline_schedule = "gpipe".into();
            r.stages_across_nodes = true;
            (info(id, "h:1"), Ok(r))
        };
        let stages = summarize("j", Some(3), vec![across("a", 0), across("b", 3)]);
        let table = render_table(&stages);
        for want in [
            "0 (stage 0 of 2, pipeline 0)",
            "3 (stage 1 of 2, pipeline 1)",
        ] {
            assert!(table.contains(want), "{table}");
        }
        assert_eq!(stages["members"][1]["stages_across_nodes"], true);

        let nobody = summarize("j", None, vec![(info("a", "h:1"), Err("x".into()))]);
        let want = "\
job j   generation -   leader -
step -   loss -   tokens/s -   last checkpoint none

ID  ADDR  RANKS  STEP  PHASE  PARAM_HASH
a   h:1   -      -     -      -           (unreachable: x)
";
        assert_eq!(render_table(&nobody), want);
    }

    #[test]
    fn ranks_read_as_ranges() {
        assert_eq!(format_ranks(&[]), "-");
        assert_eq!(format_ranks(&[3]), "3");
        assert_eq!(format_ranks(&[0, 1, 2, 3, 7, 9, 10]), "0-3,7,9,10");
    }
}
