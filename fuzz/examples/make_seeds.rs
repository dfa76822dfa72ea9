//! Writes the seed corpus of every fuzz target under `fuzz/seeds/<target>/` (run from the
//! repository root: `cargo run --manifest-path fuzz/Cargo.toml --example make_seeds`).
//! Each seed is a valid input made with tenax's own writers (the checkpoint writer, the
//! shard and record encoders, the prost messages, the state stream's requester and donor
//! recorded on 127.0.0.1) or copied from the repository (the chaos scenarios, the example
//! training configs), so the fuzzers start past the parse.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use prost::Message;
use serde_json::json;
use tenax_cluster::peer::{fetch_state, STATE_STREAM_MAGIC};
use tenax_cluster::records::{
    encode_checkpoint, encode_config, encode_member_info, encode_plan, encode_plan_envelope,
    encode_suspect_report, CheckpointRecord, ConfigRecord, SuspectRecord,
};
use tenax_cluster::{PeerAddr, PeerHub};
use tenax_core::membership::{compute_plan, MemberId, MemberInfo, PlannerConfig};
use tenax_fuzz::exchange::{self, flags};
use tenax_fuzz::transfer::{self, answer_flags, chunk_flags, request_flags};
use tenax_fuzz::{f32_bytes, Output};
use tenax_proto::v1::{FrameKind, PeerFrame, StateChunk, StateHeader, StateRequest};
use tenax_storage::manifest::{FileEntry, HashAlg, Manifest, TensorEntry, DTYPE_F32};
use tenax_storage::shard::{encode_refs, encode_shard};
use tenax_storage::{
    save_checkpoint, CheckpointContent, CheckpointMeta, ManifestKeys, SignKey, Store, TensorData,
};

/// The signing key of the signed seed manifests (the manifest target trusts it).
const SEED_KEY: [u8; 32] = [7; 32];

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = PathBuf::from("fuzz/seeds").join(target);
    std::fs::create_dir_all(&dir).expect("create the seed folder");
    std::fs::write(dir.join(name), bytes).expect("write a seed");
}

fn tensor(name: &str, shape: &[usize]) -> TensorData {
    let n: usize = shape.iter().product();
    TensorData {
        name: name.into(),
        shape: shape.to_vec(),
        data: (0..n).map(|i| i as f32 * 0.5 - 1.0).collect(),
    }
}

fn content(step: u64) -> CheckpointContent {
    CheckpointContent {
        meta: CheckpointMeta {
            step,
            generation: 2,
            config: json!({"preset": "tiny", "lr": 0.001, "batch_size": 4}),
            config_hash: "c0ffee".into(),
            data_cursor: 40,
            rng: json!({"seed": 1337, "draws": 3}),
            extra: json!({"adamw_step": step}),
        },
        tensors: vec![
            tensor("wte", &[6, 4]),
            tensor("ln.bias", &[4]),
            tensor("scale", &[]),
            tensor("empty", &[0, 3]),
        ],
    }
}

/// A checkpoint saved by the storage crate's writer (`writers` shard files), read back:
/// the manifest bytes and every file.
async fn saved(writers: u32, signed: bool) -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
    let mut store = Store::open("memory://").expect("an in-memory store");
    if signed {
        store = store.with_keys(ManifestKeys {
            sign: Some(Arc::new(SignKey::from_seed(SEED_KEY))),
            trust: None,
        });
    }
    let saved = save_checkpoint(&store, &content(10 + u64::from(writers)), writers)
        .await
        .expect("the seed checkpoint saves");
    let get = |key: String| {
        let store = &store;
        async move {
            store
                .get(&key)
                .await
                .expect("read back")
                .expect("present")
                .to_vec()
        }
    };
    let manifest = get(format!("{}/MANIFEST.json", saved.folder)).await;
    let mut files = Vec::new();
    for f in &saved.manifest.files {
        files.push((
            f.name.clone(),
            get(format!("{}/{}", saved.folder, f.name)).await,
        ));
    }
    (manifest, files)
}

/// A manifest of an older format, written by hand as that version's writer did.
fn old_manifest(version: u32) -> Vec<u8> {
    let shard = encode_shard(&[tensor("wte", &[2, 3]), tensor("b", &[3])]).expect("encode");
    let alg = HashAlg::of_version(version);
    Manifest {
        format_version: version,
        step: 4,
        generation: 1,
        attempt: "0123456789ab".into(),
        created_unix_ms: 1_700_000_000_000,
        config: json!({"preset": "tiny"}),
        config_hash: "abc".into(),
        data_cursor: 8,
        rng: json!(null),
        extra: json!({}),
        files: vec![FileEntry::new(
            "params.safetensors".into(),
            shard.len() as u64,
            alg,
            alg.hex(&shard),
        )],
        tensors: vec![
            TensorEntry {
                name: "wte".into(),
                file: "params.safetensors".into(),
                dtype: DTYPE_F32.into(),
                shape: vec![2, 3],
                rows: (version >= 2).then_some([0, 2]),
            },
            TensorEntry {
                name: "b".into(),
                file: "params.safetensors".into(),
                dtype: DTYPE_F32.into(),
                shape: vec![3],
                rows: None,
            },
        ],
        signer: String::new(),
        manifest_sha256: String::new(),
        manifest_blake3: String::new(),
        signature: String::new(),
    }
    .to_json()
}

/// The `ckpt_load` layout: u16 manifest length, the manifest, then u32 length + bytes
/// per file.
fn ckpt_input(manifest: &[u8], files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Output::default();
    out.u16(manifest.len() as u16).bytes(manifest);
    for (_, bytes) in files {
        out.u32(bytes.len() as u32).bytes(bytes);
    }
    out.0
}

async fn storage_seeds() {
    let mut names = Vec::new();
    for (writers, signed) in [(1, false), (2, false), (3, true)] {
        let (manifest, files) = saved(writers, signed).await;
        let name = format!(
            "v3-{writers}-writers{}",
            if signed { "-signed" } else { "" }
        );
        write("manifest", &format!("{name}.json"), &manifest);
        write("ckpt_load", &name, &ckpt_input(&manifest, &files));
        for (i, (_, bytes)) in files.iter().enumerate() {
            for ctl in [0u8, 1] {
                let mut input = vec![ctl];
                input.extend_from_slice(bytes);
                write("shard_decode", &format!("{name}-file{i}-ctl{ctl}"), &input);
            }
        }
        let m = Manifest::parse(&manifest).expect("the saved manifest parses");
        names.push(m.folder());
    }
    for version in [1, 2] {
        let manifest = old_manifest(version);
        write("manifest", &format!("v{version}.json"), &manifest);
    }
    for (i, n) in names.iter().enumerate() {
        write("manifest", &format!("folder-{i}"), n.as_bytes());
    }
    let refs: Vec<(&str, Vec<usize>, &[f32])> = vec![("rows", vec![2, 2], &[1.0, 2.0, 3.0, 4.0])];
    let mut with_meta = vec![2u8];
    with_meta.extend(
        encode_refs(
            &refs,
            Some([("format".to_string(), "pt".to_string())].into()),
        )
        .expect("encode"),
    );
    write("shard_decode", "metadata-ctl2", &with_meta);
}

fn chaos_seeds() {
    let mut entries: Vec<PathBuf> = std::fs::read_dir("chaos/scenarios")
        .expect("chaos/scenarios")
        .map(|e| e.expect("an entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    entries.sort();
    for p in entries {
        let text = std::fs::read(&p).expect("read a scenario");
        write(
            "chaos_scenario",
            &p.file_name().unwrap().to_string_lossy(),
            &text,
        );
    }
}

fn config_seeds() {
    let example = std::fs::read("deploy/systemd/train.toml.example").expect("the example");
    write("train_config", "train.toml.example", &example);
    // The train.toml of the Kubernetes ConfigMap (indented under `train.toml: |`).
    let yaml = std::fs::read_to_string("deploy/kubernetes/30-tenax-config.yaml").expect("yaml");
    let mut lines = yaml.lines().skip_while(|l| !l.contains("train.toml: |"));
    lines.next();
    let toml: String = lines
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| format!("{}\n", l.trim_start()))
        .collect();
    write("train_config", "kubernetes.toml", toml.as_bytes());
    write(
        "train_config",
        "every-key.toml",
        br#"preset = "tiny"
data = ["corpus", "more.txt"]
tokenizer = "char"
steps = 200
batch_size = 8
micro_batch_size = 2
lr = 3e-4
min_lr = 3e-5
warmup_steps = 20
lr_decay_steps = 400
weight_decay = 0.05
beta1 = 0.9
beta2 = 0.95
grad_clip = 0.5
seed = 42
ranks = 4
run_dir = "runs/x"
store = "memory://"
ckpt_every = 50
keep_last = 3
keep_every = 100
eval_every = 25
eval_batches = 4
max_bad_steps = 3
pipeline_stages = 2
schedule = "gpipe"
"#,
    );
    write("train_config", "empty.toml", b"");
}

fn info(id: &str, devices: u32) -> MemberInfo {
    MemberInfo {
        id: MemberId::new(id),
        devices,
        joined_gen: 1,
        addr: format!("{id}:7000"),
        metrics_addr: String::new(),
    }
}

fn record_seeds() {
    let members = [info("a", 2), info("b", 1), info("c", 3)];
    for (i, pp) in [1u32, 2].into_iter().enumerate() {
        let cfg = PlannerConfig {
            pp_depth: pp,
            ..PlannerConfig::default()
        };
        let plan = compute_plan(None, &members, &cfg, 3 + i as u64).expect("a plan");
        write(
            "records",
            &format!("gen-pp{pp}"),
            &encode_plan_envelope(plan.generation, &encode_plan(&plan)),
        );
    }
    write("records", "member-a", &encode_member_info(&members[0]));
    write(
        "records",
        "config",
        &encode_config(&ConfigRecord {
            config_hash: "abc".into(),
            math: serde_json::from_value(json!({"lr": 0.001, "seed": 1337})).unwrap(),
            corpus_sha256: "00".repeat(32),
            node: "a".into(),
            nonce: "n0nce".into(),
        }),
    );
    write(
        "records",
        "checkpoint",
        &encode_checkpoint(&CheckpointRecord {
            step: 100,
            folder: "step-0000000100-g3-0123456789ab".into(),
            url: "s3://bucket/job/step-0000000100-g3-0123456789ab".into(),
            generation: 3,
            member: "a".into(),
        }),
    );
    write(
        "records",
        "suspect",
        &encode_suspect_report(&SuspectRecord {
            reporter: "r".into(),
            reason: "no frames for 5 s".into(),
            at_ms: 1_700_000_000_000,
        }),
    );
    write("records", "suspect-key", b"s/r");
}

fn token_seeds(dir: &Path) {
    for (name, tokens, vocab) in [
        ("bytes", vec![1u32, 2, 255, 0, 7], 256usize),
        ("gpt2-wide", vec![70_000, 3, 65_536], 70_001),
        ("empty", vec![], 2),
    ] {
        let p = dir.join(name);
        tenax_data::write_shard(&p, &tokens, vocab).expect("write a token shard");
        write(
            "token_shard",
            name,
            &std::fs::read(&p).expect("read it back"),
        );
    }
}

fn proto_seeds() {
    let frame = PeerFrame {
        job: "j".into(),
        generation: 5,
        from_member: "m1".into(),
        step: 3,
        kind: FrameKind::Slot as i32,
        index: 1,
        chunk: 0,
        offset: 0,
        loss_sum: 2.5,
        data: f32_bytes(&[1.0, -2.0]),
        total: 0,
    };
    write("proto_decode", "peer-frame", &frame.encode_to_vec());
    let chunk = StateChunk {
        header: Some(StateHeader {
            step: 7,
            cursor: 3,
            opt_step: 2,
            param_hash: "h".into(),
            num_params: 2,
            guard_state: Vec::new(),
        }),
        tensor: 0,
        offset: 0,
        data: f32_bytes(&[0.5, 1.5]),
        payload_checksum: String::new(),
    };
    write("proto_decode", "state-chunk", &chunk.encode_to_vec());
    let req = StateRequest {
        job: "j".into(),
        generation: 5,
        from_member: "m0".into(),
        step: 7,
        param_hash: "h".into(),
        wait_ms: 1000,
    };
    write("proto_decode", "state-request", &req.encode_to_vec());
}

fn frame(
    from: u8,
    step: u8,
    kind: FrameKind,
    index: u64,
    chunk: u8,
    values: &[f32],
) -> exchange::Frame {
    exchange::Frame {
        flags: 0,
        from,
        step,
        kind: kind as i32 as u8,
        index,
        chunk,
        offset: 0,
        loss_bits: u64::from(1.5f32.to_bits()),
        total: 0,
        data: f32_bytes(values),
    }
}

fn exchange_seeds() {
    // Two members, 4 values, 2 slots, exact, 2 values per frame, world 2; member 0 (this
    // one) hands in its slot 0 of step 0 first. Member 1 sends its loss of slot 1, its
    // gradient of chunk 0 (this member's) for slot 1, and its reduced chunk 1.
    let exact = exchange::Spec {
        members: 0,
        me: 0,
        num_params: 4,
        num_slots: 1,
        reduction: 2,
        max_frame_floats: 1,
        world: 0,
    };
    let frames = vec![
        frame(1, 0, FrameKind::Loss, 1, 0, &[]),
        frame(1, 0, FrameKind::Slot, 1, 0, &[0.25, 0.5]),
        frame(1, 0, FrameKind::Reduced, 0, 1, &[1.0, 2.0]),
    ];
    write(
        "peer_exchange",
        "exact-step0",
        &exchange::encode(&exact, &frames),
    );
    // The same with the ring: member 1 is the previous one; round 0 reduces chunk 1 and
    // gathers chunk 0.
    let ring = exchange::Spec {
        reduction: 3,
        ..exact
    };
    let frames = vec![
        frame(1, 0, FrameKind::Loss, 1, 0, &[]),
        frame(1, 0, FrameKind::RingReduce, 0, 1, &[0.25, 0.5]),
        frame(1, 0, FrameKind::RingGather, 0, 0, &[1.0, 2.0]),
    ];
    write(
        "peer_exchange",
        "ring-step0",
        &exchange::encode(&ring, &frames),
    );
    // Three members, pieces of one value, a state hash, a boundary, a frame of the next
    // generation and one of another job.
    let three = exchange::Spec {
        members: 1,
        me: 1,
        num_params: 6,
        num_slots: 2,
        reduction: 0,
        max_frame_floats: 0,
        world: 2,
    };
    let mut state = frame(0, 0, FrameKind::State, 0, 0, &[]);
    state.flags = flags::RAW_DATA;
    state.data = b"0123abcd".to_vec();
    let mut newer = frame(2, 0, FrameKind::Loss, 2, 0, &[]);
    newer.flags = flags::NEWER;
    let mut other = frame(2, 0, FrameKind::Loss, 2, 0, &[]);
    other.flags = flags::OTHER_JOB;
    let mut second_piece = frame(0, 1, FrameKind::Slot, 0, 1, &[4.0]);
    second_piece.offset = 1;
    let frames = vec![
        state,
        frame(0, 1, FrameKind::Slot, 0, 1, &[3.0]),
        second_piece,
        newer,
        other,
        frame(2, 1, FrameKind::Boundary, 0, 0, &[]),
    ];
    write(
        "peer_exchange",
        "three-members",
        &exchange::encode(&three, &frames),
    );
}

fn transfer_seeds() {
    use transfer::{Answer, Case, Chunk, Request};
    let values = |n: usize, k: f32| f32_bytes(&(0..n).map(|i| k + i as f32).collect::<Vec<_>>());
    let whole = Answer {
        flags: answer_flags::WANT_HASH,
        step: 0,
        params: 3,
        huge_params: 0,
        chunks: vec![
            Chunk {
                flags: chunk_flags::HEADER,
                tensor: 0,
                offset: 0,
                data: values(3, 0.0),
            },
            Chunk {
                flags: 0,
                tensor: 1,
                offset: 0,
                data: values(3, 1.0),
            },
            Chunk {
                flags: chunk_flags::CHECKSUM,
                tensor: 2,
                offset: 0,
                data: values(3, 2.0),
            },
        ],
    };
    write(
        "state_transfer",
        "answer-whole",
        &transfer::encode(&Case::Answer(whole)),
    );
    let mut chunks = vec![Chunk {
        flags: chunk_flags::HEADER,
        tensor: 0,
        offset: 0,
        data: values(2, 0.0),
    }];
    for (t, n) in [(0u8, 3usize), (1, 5), (2, 4), (2, 1)] {
        chunks.push(Chunk {
            flags: 0,
            tensor: t,
            offset: 0,
            data: values(n, f32::from(t)),
        });
    }
    chunks.last_mut().unwrap().flags = chunk_flags::CHECKSUM;
    let pieces = Answer {
        flags: 0,
        step: 0,
        params: 5,
        huge_params: 0,
        chunks,
    };
    write(
        "state_transfer",
        "answer-pieces",
        &transfer::encode(&Case::Answer(pieces)),
    );
    for (name, flags) in [
        ("request-any", 0u8),
        ("request-hash", request_flags::RIGHT_HASH),
        (
            "request-receiver",
            request_flags::RECEIVERS | request_flags::AS_RECEIVER,
        ),
    ] {
        let r = Request {
            flags,
            params: 5,
            generation: 1,
            step: transfer::STEP as u8,
            frame: 1,
        };
        write("state_transfer", name, &transfer::encode(&Case::Request(r)));
    }
}

/// The first bytes tenax's requester (`fetch_state` over the state stream) sends to ask
/// for the state at `step` as `member`, recorded by a listener that then refuses. The
/// request's `wait_ms`, which depends on the time left, is set to 0 (and the request
/// encoded again) so that the seed is the same on every run.
async fn stream_request(member: &str, step: u64, hash: &str) -> Vec<u8> {
    use tenax_fuzz::stream as st;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a port on 127.0.0.1");
    let donor = PeerAddr {
        id: "donor".into(),
        addr: listener.local_addr().expect("its address").to_string(),
    };
    let recorder = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.expect("the requester dials");
        let mut first = [0u8; 12];
        conn.read_exact(&mut first)
            .await
            .expect("the magic and length");
        let len = u32::from_le_bytes(first[8..].try_into().expect("4 bytes")) as usize;
        let mut body = vec![0u8; len];
        conn.read_exact(&mut body).await.expect("the request");
        let mut no = vec![tonic::Code::NotFound as i32 as u8];
        no.extend_from_slice(&4u32.to_le_bytes());
        no.extend_from_slice(b"seed");
        conn.write_all(&no).await.expect("the refusal");
        conn.shutdown().await.expect("the end");
        (first, body)
    });
    let hub = PeerHub::new(st::JOB, st::requester_config());
    let refused = fetch_state(
        &hub,
        st::GENERATION,
        member,
        &donor,
        step,
        hash,
        std::time::Duration::from_secs(10),
    )
    .await;
    assert!(refused.is_err(), "the recorder refuses");
    let (first, body) = recorder.await.expect("the recorder");
    assert_eq!(first[..8], STATE_STREAM_MAGIC);
    let mut req = StateRequest::decode(&body[..]).expect("tenax's request decodes");
    req.wait_ms = 0;
    let body = req.encode_to_vec();
    let mut out = STATE_STREAM_MAGIC.to_vec();
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// What a donor hub (publishing the state_stream target's state, passing its
/// connections through `PeerHub::incoming`) answers to the first bytes `request`.
async fn stream_answer(request: &[u8]) -> Vec<u8> {
    use tenax_fuzz::stream as st;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let hub = PeerHub::new(st::JOB, st::donor_config());
    let _publication = hub.publish_state(st::GENERATION, Arc::new(st::state()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a port on 127.0.0.1");
    let addr = listener.local_addr().expect("its address");
    // Held: the hub stops accepting when the gRPC side's stream is dropped.
    let _grpc_side = hub.incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    let mut conn = tokio::net::TcpStream::connect(addr)
        .await
        .expect("the donor listens");
    conn.write_all(request).await.expect("the request");
    conn.shutdown().await.expect("the end of the request");
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).await.expect("the answer");
    assert!(!answer.is_empty(), "the donor answers");
    answer
}

/// The state stream's seeds, recorded from tenax's own two ends: requests as
/// `fetch_state` sends them, and a donor hub's answers to them (the whole state, and a
/// refusal), the state's answer with a header claiming 2^40 values; plus an HTTP/2 client
/// preface (a connection for the gRPC side).
async fn stream_seeds() {
    use tenax_fuzz::stream::{self as st, Case};
    let any = stream_request(st::RECEIVER, st::STEP, "").await;
    let hash = stream_request(st::RECEIVER, st::STEP, st::HASH).await;
    let other = stream_request("other", st::STEP, "").await;
    let wrong_step = stream_request(st::RECEIVER, st::STEP + 1, "").await;
    let state = stream_answer(&hash).await;
    let refused = stream_answer(&wrong_step).await;
    assert_eq!(state[0], 0, "the donor accepts");
    assert_ne!(refused[0], 0, "the donor refuses the wrong step");
    // The same answer with a header that claims 2^40 values (12 TiB): the requester must
    // reserve as data comes, not what the header says (fixed in 959240e).
    let len = u32::from_le_bytes(state[1..5].try_into().expect("4 bytes")) as usize;
    let mut header = StateHeader::decode(&state[5..5 + len]).expect("the donor's header");
    header.num_params = 1 << 40;
    let header = header.encode_to_vec();
    let mut huge = vec![0u8];
    huge.extend_from_slice(&(header.len() as u32).to_le_bytes());
    huge.extend_from_slice(&header);
    huge.extend_from_slice(&state[5 + len..]);
    let seeds: [(&str, Case); 8] = [
        (
            "answer-state",
            Case::Answer {
                want_hash: true,
                bytes: &state,
            },
        ),
        (
            "answer-huge-claim",
            Case::Answer {
                want_hash: true,
                bytes: &huge,
            },
        ),
        (
            "answer-refused",
            Case::Answer {
                want_hash: false,
                bytes: &refused,
            },
        ),
        (
            "request-any",
            Case::Request {
                receivers: false,
                bytes: &any,
            },
        ),
        (
            "request-hash",
            Case::Request {
                receivers: false,
                bytes: &hash,
            },
        ),
        (
            "request-receiver",
            Case::Request {
                receivers: true,
                bytes: &any,
            },
        ),
        (
            "request-not-receiver",
            Case::Request {
                receivers: true,
                bytes: &other,
            },
        ),
        (
            "request-grpc",
            Case::Request {
                receivers: false,
                bytes: b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            },
        ),
    ];
    for (name, case) in seeds {
        write("state_stream", name, &st::encode(&case));
    }
}

/// Inputs that crashed a target once (see the regression tests next to the fixes), kept
/// as seeds so that every run starts from them.
fn regression_seeds() {
    // manifest: file sizes adding up past u64::MAX (Manifest::total_bytes overflowed).
    write(
        "manifest",
        "regression-sizes.json",
        br#"{"format_version":1,"step":4,"generation":1,"attempt":"0123456789ab","created_unix_ms":1,"config":null,"config_hash":"","data_cursor":0,"rng":null,"extra":null,"files":[{"name":"a","size":18446744073709551615,"sha256":"0000000000000000000000000000000000000000000000000000000000000000"},{"name":"b","size":1,"sha256":"0000000000000000000000000000000000000000000000000000000000000000"}],"tensors":[]}"#,
    );
    // ckpt_load: a 2^24 x 2^40 x 0 tensor in two row slices of valid safetensors shapes,
    // whose element count overflowed in load_checkpoint's assembly.
    let shard = |rows: u64| {
        let mut header = format!(
            r#"{{"t":{{"dtype":"F32","shape":[{rows},1099511627776,0],"data_offsets":[0,0]}}}}"#
        )
        .into_bytes();
        header.resize(header.len().div_ceil(8) * 8, b' ');
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(&header);
        file
    };
    let template = br#"{"format_version":3,"step":1,"generation":1,"attempt":"abc","created_unix_ms":1,"config":null,"config_hash":"","data_cursor":0,"rng":null,"extra":null,"files":[{"name":"a","size":0,"blake3":""},{"name":"b","size":0,"blake3":""}],"tensors":[{"name":"t","file":"a","dtype":"F32","shape":[16777216,1099511627776,0],"rows":[0,8388608]},{"name":"t","file":"b","dtype":"F32","shape":[16777216,1099511627776,0],"rows":[8388608,16777216]}]}"#;
    let files = [
        ("a".to_string(), shard(1 << 23)),
        ("b".to_string(), shard(1 << 23)),
    ];
    write(
        "ckpt_load",
        "regression-shape",
        &ckpt_input(template, &files),
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    assert!(
        Path::new("fuzz/Cargo.toml").exists(),
        "run from the repository root"
    );
    let _ = std::fs::remove_dir_all("fuzz/seeds");
    storage_seeds().await;
    chaos_seeds();
    config_seeds();
    record_seeds();
    let tmp = tempfile::tempdir().expect("a temporary directory");
    token_seeds(tmp.path());
    proto_seeds();
    exchange_seeds();
    transfer_seeds();
    stream_seeds().await;
    regression_seeds();
    println!("seeds written under fuzz/seeds/");
}
