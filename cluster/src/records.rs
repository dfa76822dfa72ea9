//! The typed records of a job's etcd keys: every key name under `/tenax/<job>/` and every
//! value's encoding and decoding, in one place.
//!
//! | key (under `/tenax/<job>/`) | value | Rust type | codec |
//! |---|---|---|---|
//! | [`GEN_KEY`] `gen` | the plan envelope `{"generation":N,"plan":<plan JSON>}` | [`Plan`] | [`encode_plan`], [`encode_plan_envelope`]; [`decode_plan_envelope`], [`decode_plan`] |
//! | [`member_key`] `members/<id>` | the member's registration, under its lease | [`MemberInfo`] | [`encode_member_info`], [`decode_member_info`] |
//! | [`CONFIG_KEY`] `config` | the job's training config, fixed by the first node | [`ConfigRecord`] | [`encode_config`], [`decode_config`] |
//! | [`CHECKPOINT_KEY`] `checkpoint` | the newest committed checkpoint (a fenced put) | [`CheckpointRecord`] | [`encode_checkpoint`], [`decode_checkpoint`] |
//! | [`suspect_key`] `suspects/<suspect>/<reporter>` | a suspicion report, under the reporter's lease | [`SuspectRecord`] | [`encode_suspect_report`], [`decode_suspect_report`] |
//! | [`LEADER_PREFIX`] `leader/<lease hex>` | etcd's election keys (the campaigner's id) | bytes | etcd's election API |
//!
//! Every value is JSON (readable with `etcdctl get`). A decoder returns a
//! [`RecordError`] that names the key and what is wrong; nothing here panics on what
//! etcd holds. A plan is decoded only together with [`Plan::validate`] and a check that
//! it carries its envelope's generation, so that a plan that reaches a member (and its
//! rank lookups, communicator and slot arithmetic) has ranks exactly `0..world` hosted
//! by its members. A watcher that meets a malformed value logs one warning naming the
//! key and skips it.
//!
//! Unknown fields are ignored when decoding (no `deny_unknown_fields`), so a record
//! written by an older or newer tenax with an extra field still decodes; e.g. a plan
//! with the `transfers` field earlier versions wrote.

use serde::{Deserialize, Serialize};
use tenax_core::membership::{MemberInfo, Plan};

/// The plan of the current generation (one value: the plan envelope).
pub const GEN_KEY: &str = "gen";

/// The job's training-config record ([`ConfigRecord`]).
pub const CONFIG_KEY: &str = "config";

/// The newest committed checkpoint ([`CheckpointRecord`]).
pub const CHECKPOINT_KEY: &str = "checkpoint";

/// The prefix of the member keys: `members/<id>`.
pub const MEMBERS_PREFIX: &str = "members/";

/// The prefix of the suspicion reports: `suspects/<suspect>/<reporter>`.
pub const SUSPECTS_PREFIX: &str = "suspects/";

/// The election name; its keys are `leader/<lease hex>`.
pub const LEADER_PREFIX: &str = "leader";

/// `/tenax/<job>/`: the prefix of every key of `job`.
pub fn job_prefix(job: &str) -> String {
    format!("/tenax/{job}/")
}

/// `members/<id>`.
pub fn member_key(id: &str) -> String {
    format!("{MEMBERS_PREFIX}{id}")
}

/// `suspects/<suspect>/<reporter>`.
pub fn suspect_key(suspect: &str, reporter: &str) -> String {
    format!("{SUSPECTS_PREFIX}{suspect}/{reporter}")
}

/// `(suspect, reporter)` of a key relative to `suspects/` (`<suspect>/<reporter>`), if
/// it has that shape (both non-empty, no further `/`).
pub fn parse_suspect_key(rest: &str) -> Option<(&str, &str)> {
    rest.split_once('/')
        .filter(|(s, r)| !s.is_empty() && !r.is_empty() && !r.contains('/'))
}

/// Whether a key suffix belongs to the etcd driver (the plan, the member keys, the
/// election, the suspicion reports), so that no caller may put it directly.
pub fn is_driver_key(suffix: &str) -> bool {
    suffix == GEN_KEY
        || suffix.starts_with(MEMBERS_PREFIX)
        || suffix.starts_with(LEADER_PREFIX)
        || suffix.starts_with(SUSPECTS_PREFIX)
}

/// A value under `/tenax/<job>/` that is not the record its key should hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The bytes do not decode (not JSON, a missing field, a wrong type).
    #[error("etcd key {key} of the job: the value ({len} bytes) is not {what}: {detail}; delete the key or rewrite it with tenax")]
    Malformed {
        /// The key, relative to `/tenax/<job>/`.
        key: String,
        /// What the key should hold.
        what: &'static str,
        /// The value's length.
        len: usize,
        /// What the decoder found wrong.
        detail: String,
    },
    /// The value decodes but breaks an invariant of its record.
    #[error("etcd key {key} of the job: {what} is invalid: {detail}")]
    Invalid {
        /// The key, relative to `/tenax/<job>/`.
        key: String,
        /// What the key holds.
        what: &'static str,
        /// The invariant it breaks.
        detail: String,
    },
}

impl RecordError {
    /// The key (relative to `/tenax/<job>/`) the error is about.
    pub fn key(&self) -> &str {
        match self {
            RecordError::Malformed { key, .. } | RecordError::Invalid { key, .. } => key,
        }
    }
}

/// Decodes JSON `value` of `key` as `T` (`what` names it for the error).
fn decode_json<T: for<'de> Deserialize<'de>>(
    key: &str,
    what: &'static str,
    value: &[u8],
) -> Result<T, RecordError> {
    serde_json::from_slice(value).map_err(|e| RecordError::Malformed {
        key: key.to_string(),
        what,
        len: value.len(),
        detail: e.to_string(),
    })
}

/// JSON of a record made of strings, numbers and JSON values only, for which
/// serialisation cannot fail.
fn encode_json<T: Serialize>(record: &T) -> Vec<u8> {
    serde_json::to_vec(record).expect("records hold strings, numbers and JSON values only")
}

// ---- gen: the plan -------------------------------------------------------------------

/// What [`GEN_KEY`] holds, for errors.
const PLAN_ENVELOPE: &str = "a tenax plan envelope {\"generation\":N,\"plan\":...}";

/// The start of every plan envelope.
const ENVELOPE_HEAD: &[u8] = b"{\"generation\":";
/// Between the generation and the plan.
const ENVELOPE_MID: &[u8] = b",\"plan\":";

/// The plan JSON a leader writes (the `plan` part of the envelope).
pub fn encode_plan(plan: &Plan) -> Vec<u8> {
    encode_json(plan)
}

/// The value of [`GEN_KEY`]: `{"generation":N,"plan":<plan>}`. Valid JSON when `plan`
/// is, and [`decode_plan_envelope`] gives back the plan bytes exactly as given (a retried
/// write recognises its own plan by comparing bytes).
pub fn encode_plan_envelope(generation: u64, plan: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(plan.len() + 48);
    v.extend_from_slice(ENVELOPE_HEAD);
    v.extend_from_slice(generation.to_string().as_bytes());
    v.extend_from_slice(ENVELOPE_MID);
    v.extend_from_slice(plan);
    v.push(b'}');
    v
}

/// The inverse of [`encode_plan_envelope`]: the generation and the plan bytes. The plan
/// bytes are only checked to be JSON; [`decode_plan`] makes a [`Plan`] of them.
///
/// # Errors
/// [`RecordError::Malformed`] when the value is not an envelope with JSON inside.
pub fn decode_plan_envelope(value: &[u8]) -> Result<(u64, Vec<u8>), RecordError> {
    let bad = |detail: &str| RecordError::Malformed {
        key: GEN_KEY.to_string(),
        what: PLAN_ENVELOPE,
        len: value.len(),
        detail: detail.to_string(),
    };
    let rest = value
        .strip_prefix(ENVELOPE_HEAD)
        .ok_or_else(|| bad("it does not start with {\"generation\":"))?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let generation: u64 = std::str::from_utf8(&rest[..digits])
        .ok()
        .and_then(|d| d.parse().ok())
        .ok_or_else(|| bad("the generation is not a number"))?;
    let plan = rest[digits..]
        .strip_prefix(ENVELOPE_MID)
        .and_then(|p| p.strip_suffix(b"}"))
        .ok_or_else(|| bad("no ,\"plan\":...} after the generation"))?;
    if let Err(e) = serde_json::from_slice::<serde_json::Value>(plan) {
        return Err(bad(&format!("the plan is not JSON ({e})")));
    }
    Ok((generation, plan.to_vec()))
}

/// The plan stored as `generation` (the envelope's), from its JSON: it must decode as a
/// [`Plan`], carry that generation, and pass [`Plan::validate`].
///
/// # Errors
/// [`RecordError::Malformed`] for JSON that is not a plan; [`RecordError::Invalid`] for
/// a plan of another generation or one that fails validation.
pub fn decode_plan(generation: u64, plan: &[u8]) -> Result<Plan, RecordError> {
    let p: Plan = decode_json(GEN_KEY, "a tenax plan", plan)?;
    let invalid = |detail: String| RecordError::Invalid {
        key: GEN_KEY.to_string(),
        what: "the plan",
        detail,
    };
    if p.generation != generation {
        return Err(invalid(format!(
            "the plan says generation {} but is stored as generation {generation}",
            p.generation
        )));
    }
    p.validate().map_err(|e| invalid(e.to_string()))?;
    Ok(p)
}

/// The plan in a whole [`GEN_KEY`] value: [`decode_plan_envelope`] then [`decode_plan`].
///
/// # Errors
/// Theirs.
pub fn decode_gen_value(value: &[u8]) -> Result<Plan, RecordError> {
    let (generation, plan) = decode_plan_envelope(value)?;
    decode_plan(generation, &plan)
}

// ---- members/<id> ----------------------------------------------------------------------

/// The value of `members/<id>`.
pub fn encode_member_info(info: &MemberInfo) -> Vec<u8> {
    encode_json(info)
}

/// The registration stored at `members/<id>`: a [`MemberInfo`] that names the key's id
/// and at least one device (a member with none would make every plan fail).
///
/// # Errors
/// [`RecordError::Malformed`] for a value that is not a `MemberInfo`;
/// [`RecordError::Invalid`] for one that names another id or no devices.
pub fn decode_member_info(id: &str, value: &[u8]) -> Result<MemberInfo, RecordError> {
    let key = member_key(id);
    let info: MemberInfo = decode_json(&key, "a member registration (MemberInfo)", value)?;
    let invalid = |detail: String| RecordError::Invalid {
        key: key.clone(),
        what: "the registration",
        detail,
    };
    if info.id.as_str() != id {
        return Err(invalid(format!(
            "it names member {:?}, not the key's {id:?}",
            info.id.as_str()
        )));
    }
    if info.devices == 0 {
        return Err(invalid("it registers 0 devices".into()));
    }
    Ok(info)
}

// ---- config ------------------------------------------------------------------------------

/// What [`CONFIG_KEY`] holds: the training config of the job's first node. Every later
/// node compares its own against it and refuses to join with another.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ConfigRecord {
    /// The hash of the config fields that change the math of a step.
    pub config_hash: String,
    /// Those fields by name, to say which differ.
    pub math: serde_json::Map<String, serde_json::Value>,
    /// The SHA-256 of the training corpus.
    pub corpus_sha256: String,
    /// The node that wrote the record.
    pub node: String,
    /// Random, chosen by the node that wrote the record: unique to this incarnation of the
    /// job (a job started afresh under the same name gets a new one). Writers of a shared
    /// checkpoint derive its folder from it. Empty in records of older builds.
    #[serde(default)]
    pub nonce: String,
}

/// The value of [`CONFIG_KEY`].
pub fn encode_config(record: &ConfigRecord) -> Vec<u8> {
    encode_json(record)
}

/// The [`ConfigRecord`] of [`CONFIG_KEY`].
///
/// # Errors
/// [`RecordError::Malformed`] for a value that is not one.
pub fn decode_config(value: &[u8]) -> Result<ConfigRecord, RecordError> {
    decode_json(CONFIG_KEY, "a config record", value)
}

// ---- checkpoint --------------------------------------------------------------------------

/// What [`CHECKPOINT_KEY`] holds: the newest committed checkpoint, written with a fenced
/// put by the member that committed it. A whole-job restart resumes from it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckpointRecord {
    /// Steps the checkpoint holds.
    pub step: u64,
    /// Its folder, relative to the job's store.
    pub folder: String,
    /// Its URL.
    pub url: String,
    /// The generation that committed it.
    pub generation: u64,
    /// The member that committed it.
    pub member: String,
}

/// The value of [`CHECKPOINT_KEY`].
pub fn encode_checkpoint(record: &CheckpointRecord) -> Vec<u8> {
    encode_json(record)
}

/// The [`CheckpointRecord`] of [`CHECKPOINT_KEY`].
///
/// # Errors
/// [`RecordError::Malformed`] for a value that is not one.
pub fn decode_checkpoint(value: &[u8]) -> Result<CheckpointRecord, RecordError> {
    decode_json(CHECKPOINT_KEY, "a checkpoint record", value)
}

// ---- suspects/<suspect>/<reporter> -------------------------------------------------------

/// What `suspects/<suspect>/<reporter>` holds.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SuspectRecord {
    /// The reporter's member id (the key's last part).
    pub reporter: String,
    /// What the reporter saw (empty when absent).
    #[serde(default)]
    pub reason: String,
    /// The reporter's wall clock when it reported, ms since the Unix epoch (0 when absent).
    #[serde(default)]
    pub at_ms: u64,
}

/// The value of `suspects/<suspect>/<reporter>`.
pub fn encode_suspect_report(record: &SuspectRecord) -> Vec<u8> {
    encode_json(record)
}

/// The report stored at `suspects/<suspect>/<reporter>`: it must name the key's reporter.
///
/// # Errors
/// [`RecordError::Malformed`] for a value that is not a report;
/// [`RecordError::Invalid`] for one that names another reporter.
pub fn decode_suspect_report(
    suspect: &str,
    reporter: &str,
    value: &[u8],
) -> Result<SuspectRecord, RecordError> {
    let key = suspect_key(suspect, reporter);
    let record: SuspectRecord = decode_json(&key, "a suspicion report", value)?;
    if record.reporter != reporter {
        return Err(RecordError::Invalid {
            key,
            what: "the suspicion report",
            detail: format!(
                "it names reporter {:?}, not the key's {reporter:?}",
                record.reporter
            ),
        });
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tenax_core::membership::{compute_plan, MemberId, PlannerConfig};

    fn info(id: &str, devices: u32) -> MemberInfo {
        MemberInfo {
            id: MemberId::new(id),
            devices,
            joined_gen: 0,
            addr: "h:1".into(),
            metrics_addr: String::new(),
        }
    }

    fn plan(generation: u64) -> Plan {
        let c = PlannerConfig {
            pp_depth: 2,
            ..PlannerConfig::default()
        };
        compute_plan(None, &[info("a", 2), info("b", 2)], &c, generation).unwrap()
    }

    #[test]
    fn keys_are_where_the_architecture_says() {
        assert_eq!(job_prefix("j"), "/tenax/j/");
        assert_eq!(member_key("a"), "members/a");
        assert_eq!(suspect_key("a", "b"), "suspects/a/b");
        assert_eq!(parse_suspect_key("a/b"), Some(("a", "b")));
        for bad in ["a", "/b", "a/", "a/b/c"] {
            assert_eq!(parse_suspect_key(bad), None, "{bad}");
        }
        for k in ["gen", "members/a", "leader", "leader/1", "suspects/a/b"] {
            assert!(is_driver_key(k), "{k}");
        }
        for k in ["config", "checkpoint", "commits/1", "generation-notes"] {
            assert!(!is_driver_key(k), "{k}");
        }
    }

    #[test]
    fn envelope_round_trips_the_plan_bytes_exactly() {
        let plan = br#"{ "members": ["b", "a"],  "d": 2 }"#;
        let v = encode_plan_envelope(7, plan);
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&v).unwrap()["generation"],
            7
        );
        assert_eq!(decode_plan_envelope(&v).unwrap(), (7, plan.to_vec()));
    }

    #[test]
    fn malformed_envelopes_are_refused() {
        for bad in [
            &b""[..],
            b"{}",
            b"garbage",
            b"{\"generation\":x,\"plan\":{}}",
            b"{\"generation\":99999999999999999999999,\"plan\":{}}",
            b"{\"generation\":1,\"plan\":{}",
            b"{\"generation\":1,\"plan\":nope}",
            b"{\"generation\":1,\"plan\":{}}}",
        ] {
            let e = decode_plan_envelope(bad).unwrap_err();
            assert_eq!(e.key(), "gen");
            assert!(e.to_string().starts_with("etcd key gen of the job"), "{e}");
        }
    }

    #[test]
    fn plans_round_trip_through_the_envelope() {
        let p = plan(3);
        let v = encode_plan_envelope(3, &encode_plan(&p));
        assert_eq!(decode_gen_value(&v).unwrap(), p);
    }

    /// A plan stored with the `transfers` field that earlier versions wrote decodes.
    #[test]
    fn plans_with_the_former_transfers_field_decode() {
        let p = plan(2);
        let mut json = serde_json::to_value(&p).unwrap();
        json["transfers"] = serde_json::json!([
            {"to_rank": 0, "stage": 0, "from_rank": null, "reason": "first generation"}
        ]);
        let bytes = serde_json::to_vec(&json).unwrap();
        assert_eq!(decode_plan(2, &bytes).unwrap(), p);
    }

    /// Each kind of malformed plan value decodes to an error that names the key and the
    /// problem.
    #[test]
    fn malformed_plans_are_errors() {
        let good = serde_json::to_value(plan(2)).unwrap();
        let with = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v = good.clone();
            f(&mut v);
            serde_json::to_vec(&v).unwrap()
        };
        #[allow(clippy::type_complexity)]
        let table: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "not JSON",
                b"{\"generation\":2,".to_vec(),
                "is not a tenax plan",
            ),
            ("a JSON string", b"\"plan\"".to_vec(), "is not a tenax plan"),
            ("an empty object", b"{}".to_vec(), "missing field"),
            (
                "world of the wrong type",
                with(&|v| v["world"] = "four".into()),
                "invalid type",
            ),
            (
                "a negative world",
                with(&|v| v["world"] = (-4).into()),
                "invalid value",
            ),
            (
                "members not a list",
                with(&|v| v["members"] = "a".into()),
                "invalid type",
            ),
            (
                "a rank without its member",
                with(&|v| {
                    v["ranks"][0].as_object_mut().unwrap().remove("member");
                }),
                "missing field",
            ),
            (
                "another generation",
                with(&|v| v["generation"] = 3.into()),
                "stored as generation 2",
            ),
            (
                "world 0",
                with(&|v| {
                    v["world"] = 0.into();
                    v["dp_width"] = 0.into();
                    v["ranks"] = serde_json::json!([]);
                }),
                "dp_width is 0",
            ),
            (
                "world is not dp x pp",
                with(&|v| v["world"] = 6.into()),
                "is not dp_width",
            ),
            (
                "a rank missing",
                with(&|v| {
                    v["ranks"].as_array_mut().unwrap().pop();
                }),
                "rank entries for world",
            ),
            (
                "a rank twice",
                with(&|v| v["ranks"][1]["rank"] = 0.into()),
                "0..world in order",
            ),
            (
                "a rank out of range",
                with(&|v| v["ranks"][3]["rank"] = 9.into()),
                "0..world in order",
            ),
            (
                "wrong coordinates",
                with(&|v| v["ranks"][1]["stage"] = 0.into()),
                "expected",
            ),
            (
                "a rank hosted by a stranger",
                with(&|v| v["ranks"][0]["member"] = "zz".into()),
                "not a member",
            ),
            (
                "no members",
                with(&|v| v["members"] = serde_json::json!([])),
                "no members",
            ),
            (
                "pp_depth 0",
                with(&|v| v["pp_depth"] = 0.into()),
                "pp_depth is 0",
            ),
        ];
        for (name, bytes, want) in table {
            let e = decode_plan(2, &bytes).unwrap_err();
            assert_eq!(e.key(), "gen", "{name}");
            let text = e.to_string();
            assert!(text.contains(want), "{name}: {text}");
            assert!(
                text.starts_with("etcd key gen of the job"),
                "{name}: {text}"
            );
        }
    }

    #[test]
    fn member_infos_round_trip_and_bad_ones_are_errors() {
        let a = info("a", 2);
        assert_eq!(decode_member_info("a", &encode_member_info(&a)).unwrap(), a);
        // addr and metrics_addr may be absent (older registrations).
        let old = br#"{"id":"a","devices":1,"joined_gen":4}"#;
        assert_eq!(decode_member_info("a", old).unwrap().joined_gen, 4);
        let table: Vec<(&[u8], &str)> = vec![
            (b"{", "is not a member registration"),
            (
                br#"{"id":"a","devices":"two","joined_gen":0}"#,
                "invalid type",
            ),
            (br#"{"id":"a","joined_gen":0}"#, "missing field `devices`"),
            (
                br#"{"id":"b","devices":1,"joined_gen":0}"#,
                "not the key's \"a\"",
            ),
            (br#"{"id":"a","devices":0,"joined_gen":0}"#, "0 devices"),
        ];
        for (bytes, want) in table {
            let e = decode_member_info("a", bytes).unwrap_err();
            assert_eq!(e.key(), "members/a");
            assert!(e.to_string().contains(want), "{e}");
        }
    }

    #[test]
    fn config_and_checkpoint_records_round_trip_and_bad_ones_are_errors() {
        let c = ConfigRecord {
            config_hash: "h".into(),
            math: serde_json::from_str(r#"{"lr": 0.001, "layers": 2}"#).unwrap(),
            corpus_sha256: "c".into(),
            node: "n".into(),
            nonce: "0123456789abcdef".into(),
        };
        assert_eq!(decode_config(&encode_config(&c)).unwrap(), c);
        // A record of an older build, without a nonce, still reads.
        let old = br#"{"config_hash": "h", "math": {}, "corpus_sha256": "c", "node": "n"}"#;
        assert_eq!(decode_config(old).unwrap().nonce, "");
        let r = CheckpointRecord {
            step: 12,
            folder: "step-12".into(),
            url: "s3://b/j/step-12".into(),
            generation: 3,
            member: "a".into(),
        };
        // The wire format: field names as written since the first daemon.
        let json = String::from_utf8(encode_checkpoint(&r)).unwrap();
        assert_eq!(
            json,
            r#"{"step":12,"folder":"step-12","url":"s3://b/j/step-12","generation":3,"member":"a"}"#
        );
        assert_eq!(decode_checkpoint(json.as_bytes()).unwrap(), r);
        let e = decode_checkpoint(br#"{"step":-1}"#).unwrap_err();
        assert_eq!(e.key(), "checkpoint");
        assert!(e.to_string().contains("not a checkpoint record"), "{e}");
        let e = decode_config(b"[]").unwrap_err();
        assert_eq!(e.key(), "config");
        assert!(e.to_string().contains("not a config record"), "{e}");
    }

    #[test]
    fn suspicion_reports_round_trip_and_bad_ones_are_errors() {
        let r = SuspectRecord {
            reporter: "b".into(),
            reason: "late".into(),
            at_ms: 5,
        };
        let json = String::from_utf8(encode_suspect_report(&r)).unwrap();
        assert_eq!(json, r#"{"reporter":"b","reason":"late","at_ms":5}"#);
        assert_eq!(decode_suspect_report("a", "b", json.as_bytes()).unwrap(), r);
        // reason and at_ms may be absent.
        let bare = decode_suspect_report("a", "b", br#"{"reporter":"b"}"#).unwrap();
        assert_eq!((bare.reason.as_str(), bare.at_ms), ("", 0));
        let table: Vec<(&[u8], &str)> = vec![
            (b"nope", "is not a suspicion report"),
            (br#"{"reason":"x"}"#, "missing field `reporter`"),
            (br#"{"reporter":"b","at_ms":"soon"}"#, "invalid type"),
            (br#"{"reporter":"c"}"#, "not the key's \"b\""),
        ];
        for (bytes, want) in table {
            let e = decode_suspect_report("a", "b", bytes).unwrap_err();
            assert_eq!(e.key(), "suspects/a/b");
            assert!(e.to_string().contains(want), "{e}");
        }
    }

    proptest! {
        /// Whatever `compute_plan` returns survives the trip through etcd's encoding and
        /// the decoder's validation.
        #[test]
        fn computed_plans_decode(
            devices in proptest::collection::vec(1u32..5, 1..10),
            pp in 1u32..4,
            generation in 1u64..u64::MAX,
        ) {
            let members: Vec<MemberInfo> = devices
                .iter()
                .enumerate()
                .map(|(i, &d)| info(&format!("m{i}"), d))
                .collect();
            let c = PlannerConfig { pp_depth: pp, ..PlannerConfig::default() };
            if let Ok(p) = compute_plan(None, &members, &c, generation) {
                let v = encode_plan_envelope(generation, &encode_plan(&p));
                prop_assert_eq!(decode_gen_value(&v).unwrap(), p);
            }
        }

        /// Arbitrary bytes never make a decoder panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_gen_value(&bytes);
            let _ = decode_plan(1, &bytes);
            let _ = decode_member_info("a", &bytes);
            let _ = decode_config(&bytes);
            let _ = decode_checkpoint(&bytes);
            let _ = decode_suspect_report("a", "b", &bytes);
        }
    }
}
