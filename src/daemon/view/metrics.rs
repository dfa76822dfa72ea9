//! The node's `/metrics` page: the histograms of the durations it measures, the
//! counters of its other parts, and the samples they render as.

use std::sync::atomic::Ordering;

use crate::metrics::{Histogram, MetricKind, Sample};

use super::{NodeView, Shared};

/// Upper bounds (seconds) of `tenax_step_seconds`: a step of a small model on a CPU
/// takes milliseconds, one of a large model across nodes seconds to a minute.
pub(crate) const STEP_SECONDS_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Upper bounds (seconds) of `tenax_checkpoint_save_seconds`: snapshot, upload and
/// manifest, from a fraction of a second (small model, local disk) to many minutes
/// (gigabytes to S3).
pub(crate) const CHECKPOINT_SAVE_SECONDS_BOUNDS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];

/// Upper bounds (seconds) of `tenax_checkpoint_commit_seconds`: one fenced etcd
/// transaction (and a read before it), milliseconds normally, bounded by the record
/// write's timeout.
pub(crate) const CHECKPOINT_COMMIT_SECONDS_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Upper bounds (seconds) of `tenax_state_copy_seconds`: parameters and optimizer state
/// from a peer, megabytes in milliseconds to gigabytes in minutes.
pub(crate) const STATE_COPY_SECONDS_BOUNDS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// The durations the node measures, as histograms for `/metrics`.
#[derive(Debug, Clone)]
pub(crate) struct Timings {
    /// Seconds of each step this node ran (compute, collectives, optimizer).
    pub(crate) step: Histogram,
    /// Seconds of each checkpoint save this node committed to the store.
    pub(crate) checkpoint_save: Histogram,
    /// Seconds of each write of a checkpoint's fenced record in etcd that landed.
    pub(crate) checkpoint_commit: Histogram,
    /// Seconds of each state copy from a peer (including the hash check).
    pub(crate) state_copy: Histogram,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            step: Histogram::new(STEP_SECONDS_BOUNDS),
            checkpoint_save: Histogram::new(CHECKPOINT_SAVE_SECONDS_BOUNDS),
            checkpoint_commit: Histogram::new(CHECKPOINT_COMMIT_SECONDS_BOUNDS),
            state_copy: Histogram::new(STATE_COPY_SECONDS_BOUNDS),
        }
    }
}

impl Shared {
    /// The node's `/metrics` page.
    pub(crate) fn metrics(&self) -> String {
        let v = self.view().clone();
        let tls = self.hub.tls();
        let about = NodeCounters {
            job: self.job.clone(),
            node: self.member_id.clone(),
            pipeline_stages: self.pipeline.map_or(1, |p| p.stages),
            stale_refused: self.hub.stale_refused(),
            frames_accepted: self.hub.frames_accepted(),
            state_requests_refused: self.hub.state_refused(),
            identity_refused: self.hub.identity_refused(),
            control_refused: self.control_refused.load(Ordering::Relaxed),
            tls_enabled: tls.is_some(),
            tls_handshakes_refused: tls.map_or(0, |t| t.handshakes_refused()),
            tls_reloads: tls.map_or(0, |t| t.reloads()),
        };
        crate::metrics::render(&samples(&v, &about))
    }
}

/// What `/metrics` shows besides the node's view: who the node is, and the counters
/// other parts of it keep (the peer hub, the TLS listener, the control service).
#[derive(Debug, Default, Clone)]
pub(crate) struct NodeCounters {
    /// The job's name (label `tenax_job`).
    pub(crate) job: String,
    /// The node's member id (label `node`).
    pub(crate) node: String,
    /// Stages of the pipeline each of the node's ranks runs as (1: none).
    pub(crate) pipeline_stages: u32,
    /// Peer frames refused for coming from an older generation.
    pub(crate) stale_refused: u64,
    /// Peer frames accepted.
    pub(crate) frames_accepted: u64,
    /// State copy requests refused.
    pub(crate) state_requests_refused: u64,
    /// Peer streams and state requests refused for a certificate of another member.
    pub(crate) identity_refused: u64,
    /// Control calls refused for want of an operator certificate.
    pub(crate) control_refused: u64,
    /// The node's services run mutual TLS.
    pub(crate) tls_enabled: bool,
    /// TLS handshakes refused on the node's listener.
    pub(crate) tls_handshakes_refused: u64,
    /// SIGHUP reloads of the node's certificates.
    pub(crate) tls_reloads: u64,
}

/// The samples of a node's `/metrics` page (pure: the view and the counters in, the
/// samples out), every one labelled `tenax_job` and `node`.
///
/// The names follow Prometheus's conventions (`promtool check metrics` is clean, see the
/// e2e test `metrics_pass_promtool_check_metrics`): counters end in `_total`, durations
/// are in seconds and bytes in bytes, and durations are histograms (`_bucket`, `_sum`,
/// `_count`) rather than "last value" gauges. The job's name is the label `tenax_job`,
/// not `job`, which Prometheus sets on every scraped sample itself (the scrape job).
pub(crate) fn samples(v: &NodeView, n: &NodeCounters) -> Vec<Sample> {
    let (g, c) = (MetricKind::Gauge, MetricKind::Counter);
    let table: [(&str, &str, MetricKind, f64); 27] = [
        ("tenax_step", "Optimizer steps completed.", g, v.step as f64),
        ("tenax_target_steps", "The job's target step.", g, v.target_steps as f64),
        ("tenax_loss", "Mean token loss of the last step.", g, v.loss),
        ("tenax_tokens_per_second", "Training throughput of the last step (whole group).", g, v.tokens_per_s),
        ("tenax_generation", "Generation of the group plan this node trains in.", g, v.generation as f64),
        ("tenax_world_ranks", "Ranks in the current generation.", g, f64::from(v.world)),
        ("tenax_pipeline_stages", "Stages of the pipeline each of this node's ranks runs as (1: none).", g, f64::from(n.pipeline_stages)),
        ("tenax_leader", "1 if this node leads the job.", g, if v.leader { 1.0 } else { 0.0 }),
        ("tenax_reformations_total", "Generations this node has trained in after its first.", c, v.reforms as f64),
        ("tenax_checkpoints_committed_total", "Checkpoints this node committed (their fenced record written in etcd).", c, v.checkpoints_committed as f64),
        ("tenax_checkpoint_failures_total", "Checkpoint saves of this node that failed.", c, v.checkpoint_failures as f64),
        ("tenax_last_checkpoint_step", "Step of the newest committed checkpoint this node knows.", g, v.last_checkpoint_step as f64),
        ("tenax_peer_stale_refused_total", "Peer frames refused because they came from an older generation.", c, n.stale_refused as f64),
        ("tenax_peer_frames_accepted_total", "Peer frames accepted.", c, n.frames_accepted as f64),
        ("tenax_peer_state_requests_refused_total", "State copy requests refused (not a receiver of the published state, or too many at once).", c, n.state_requests_refused as f64),
        ("tenax_peer_identity_refused_total", "Peer streams and state requests refused: the client's certificate names another member than the one claimed (mutual TLS).", c, n.identity_refused as f64),
        ("tenax_control_refused_total", "Control calls (drain, pause, resume, checkpoint) refused for want of an operator certificate.", c, n.control_refused as f64),
        ("tenax_tls_enabled", "1 if the node's gRPC services run mutual TLS, 0 with --insecure.", g, if n.tls_enabled { 1.0 } else { 0.0 }),
        ("tenax_tls_handshakes_refused_total", "TLS handshakes refused on the node's listener (no certificate, another CA, expired, timed out).", c, n.tls_handshakes_refused as f64),
        ("tenax_tls_reloads_total", "Times SIGHUP reloaded the node's certificates.", c, n.tls_reloads as f64),
        ("tenax_state_copies_received_total", "Times this node copied the group's state from a peer (join, behind, diverged).", c, v.state_copies_in as f64),
        ("tenax_state_copies_served_total", "Times this node sent its state to peers that lacked it.", c, v.state_copies_out as f64),
        ("tenax_state_bytes_received_total", "Bytes of state copied from peers.", c, v.state_bytes_in as f64),
        ("tenax_param_hash_mismatches_total", "Periodic comparisons that found members with different parameters (each resyncs the odd ones).", c, v.hash_mismatches as f64),
        ("tenax_leader_probes_total", "Suspects this node probed as leader.", c, v.probes_sent as f64),
        ("tenax_leader_revocations_total", "Leases of confirmed suspects this node revoked as leader (evictions).", c, v.revocations as f64),
        ("tenax_suspicions_reported_total", "Peers this node reported as suspects (a broken stream or a late step).", c, v.suspicions as f64),
    ];
    let mut out: Vec<Sample> = table
        .into_iter()
        .map(|(name, help, kind, value)| {
            Sample::new(name, help, kind, value)
                .label("tenax_job", &n.job)
                .label("node", &n.node)
        })
        .collect();
    let labels = [("tenax_job", n.job.as_str()), ("node", n.node.as_str())];
    let t = &v.timings;
    let histograms: [(&str, &'static str, &Histogram); 4] = [
        ("tenax_step_seconds", "Seconds of each step this node ran (compute, collectives and optimizer).", &t.step),
        ("tenax_checkpoint_save_seconds", "Seconds of each checkpoint save this node committed to the store (snapshot, upload of the shards, manifest).", &t.checkpoint_save),
        ("tenax_checkpoint_commit_seconds", "Seconds of each write of a checkpoint's fenced record in etcd that landed (the commit that makes a saved checkpoint the job's).", &t.checkpoint_commit),
        ("tenax_state_copy_seconds", "Seconds of each copy of the group's state from a peer (transfer and hash check).", &t.state_copy),
    ];
    for (name, help, h) in histograms {
        out.extend(h.samples(name, help, &labels));
    }
    out.extend(stage_samples(v, n));
    out
}

/// Per pipeline stage: the last step's op-list and busy seconds, their sums, and the
/// last step's bubble (the share of the op list spent waiting).
fn stage_samples(v: &NodeView, n: &NodeCounters) -> Vec<Sample> {
    let (g, c) = (MetricKind::Gauge, MetricKind::Counter);
    let mut out = Vec::new();
    let label = |s: Sample, stage: usize| {
        s.label("tenax_job", &n.job)
            .label("node", &n.node)
            .label("stage", stage.to_string())
    };
    for t in &v.stage_times {
        let k = t.stage as usize;
        out.push(label(Sample::new("tenax_pipeline_stage_step_seconds", "Seconds the stage's op list of the last step took (compute and waits, before the reduction).", g, t.ops_s), k));
        out.push(label(
            Sample::new(
                "tenax_pipeline_stage_busy_seconds",
                "Seconds the stage computed (forward and backward) in the last step.",
                g,
                t.busy_s,
            ),
            k,
        ));
        out.push(label(
            Sample::new(
                "tenax_pipeline_stage_bubble_ratio",
                "Share of the stage's op list spent waiting in the last step (1 - busy / op list).",
                g,
                t.bubble(),
            ),
            k,
        ));
    }
    for (k, (busy, ops)) in v.stage_sums.iter().enumerate() {
        out.push(label(
            Sample::new(
                "tenax_pipeline_stage_step_seconds_total",
                "Seconds of the stage's op lists over all steps.",
                c,
                *ops,
            ),
            k,
        ));
        out.push(label(
            Sample::new(
                "tenax_pipeline_stage_busy_seconds_total",
                "Seconds the stage computed over all steps.",
                c,
                *busy,
            ),
            k,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use tenax_actors::{MemberStats, StepReport};

    use super::*;

    /// Every sample a daemon can render: a default view with one pipeline stage's times
    /// (those samples exist only with `--pipeline-stages`).
    fn all_samples() -> Vec<Sample> {
        let v = NodeView {
            stage_times: vec![tenax_actors::StageTime {
                stage: 0,
                busy_s: 0.5,
                ops_s: 1.0,
            }],
            stage_sums: vec![(0.5, 1.0)],
            ..NodeView::default()
        };
        let about = NodeCounters {
            job: "j".into(),
            node: "n".into(),
            ..NodeCounters::default()
        };
        samples(&v, &about)
    }

    /// Prometheus's naming rules, the ones `promtool check metrics` lints (the e2e test
    /// runs promtool itself on a live daemon): every name's kind, suffix and unit.
    #[test]
    fn every_name_follows_the_prometheus_conventions() {
        let samples = all_samples();
        assert!(samples.len() > 40, "{}", samples.len());
        for s in &samples {
            let (name, kind) = (s.name.as_str(), s.kind);
            assert!(name.starts_with("tenax_"), "{name}");
            match kind {
                MetricKind::Counter => assert!(name.ends_with("_total"), "counter {name}"),
                MetricKind::Gauge => {
                    for bad in ["_total", "_sum", "_count", "_bucket", "_last"] {
                        assert!(!name.ends_with(bad), "gauge {name} ends in {bad}");
                    }
                }
                MetricKind::Histogram => {
                    assert!(s.metric_name().ends_with("_seconds"), "histogram {name}");
                    assert_ne!(s.metric_name(), name, "histogram series {name}");
                }
            }
            for unit in [
                "gigabytes",
                "megabytes",
                "milliseconds",
                "_ms",
                "_gb",
                "_mb",
            ] {
                assert!(!name.contains(unit), "{name}: not a base unit ({unit})");
            }
            let labels: Vec<&str> = s.labels.iter().map(|(k, _)| k.as_str()).collect();
            assert_eq!(labels[..2], ["tenax_job", "node"], "{name}");
        }
        // One sample per series name and label set.
        let series: BTreeSet<String> = samples
            .iter()
            .map(|s| format!("{}{:?}", s.name, s.labels))
            .collect();
        assert_eq!(series.len(), samples.len());
        let histograms: BTreeSet<&str> = samples
            .iter()
            .filter(|s| s.kind == MetricKind::Histogram)
            .map(|s| s.metric_name())
            .collect();
        assert_eq!(
            histograms,
            BTreeSet::from([
                "tenax_checkpoint_commit_seconds",
                "tenax_checkpoint_save_seconds",
                "tenax_state_copy_seconds",
                "tenax_step_seconds",
            ])
        );
    }

    #[test]
    fn observations_reach_the_histograms() {
        let mut v = NodeView::default();
        let report = StepReport {
            loss: 2.5,
            grad_norm: 1.0,
            skipped: false,
            guarded: false,
            snapshot_copy_s: 0.0,
            stages: Vec::new(),
        };
        v.note_step(1, &report, 0.02, 100.0, MemberStats::default());
        v.note_save(3.0);
        v.note_record(4, "s3://b/j/step-4".into(), 0.004);
        v.note_state_copy(1000, 0.2);
        let samples = samples(&v, &NodeCounters::default());
        let value = |name: &str, le: Option<&str>| {
            samples
                .iter()
                .find(|s| {
                    s.name == name
                        && le.is_none_or(|le| s.labels.iter().any(|(k, v)| k == "le" && v == le))
                })
                .unwrap_or_else(|| panic!("no {name} {le:?}"))
                .value
        };
        let cases = [
            ("tenax_step_seconds_bucket", Some("0.01"), 0.0),
            ("tenax_step_seconds_bucket", Some("0.025"), 1.0),
            ("tenax_step_seconds_sum", None, 0.02),
            ("tenax_checkpoint_save_seconds_bucket", Some("2.5"), 0.0),
            ("tenax_checkpoint_save_seconds_bucket", Some("5"), 1.0),
            ("tenax_checkpoint_commit_seconds_bucket", Some("0.005"), 1.0),
            ("tenax_checkpoint_commit_seconds_count", None, 1.0),
            ("tenax_checkpoints_committed_total", None, 1.0),
            ("tenax_last_checkpoint_step", None, 4.0),
            ("tenax_state_copy_seconds_bucket", Some("0.25"), 1.0),
            ("tenax_state_copy_seconds_bucket", Some("+Inf"), 1.0),
            ("tenax_state_copies_received_total", None, 1.0),
            ("tenax_state_bytes_received_total", None, 1000.0),
        ];
        for (name, le, want) in cases {
            assert_eq!(value(name, le), want, "{name} {le:?}");
        }
    }

    /// The `tenax_...` names in `text`.
    fn names_in(text: &str) -> Vec<&str> {
        let mut out = Vec::new();
        let mut rest = text;
        while let Some(i) = rest.find("tenax_") {
            let preceded = text.len() - rest.len() + i;
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(tail.len());
            // Part of a longer word (`my_tenax_x`): not a name of ours.
            let inside = text[..preceded]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
            if !inside {
                out.push(&tail[..end]);
            }
            rest = &tail[end..];
        }
        out
    }

    /// Every string in `json` with the key it is under.
    fn strings<'a>(json: &'a serde_json::Value, key: &'a str, out: &mut Vec<(&'a str, &'a str)>) {
        match json {
            serde_json::Value::String(s) => out.push((key, s)),
            serde_json::Value::Array(a) => a.iter().for_each(|v| strings(v, key, out)),
            serde_json::Value::Object(o) => o.iter().for_each(|(k, v)| strings(v, k, out)),
            _ => {}
        }
    }

    /// The names in `dashboard` that the daemon does not render: in queries (`expr`,
    /// `query`, `definition`) a name must be a series the daemon renders or one of its
    /// labels; elsewhere (titles, descriptions) a histogram's metric name is fine too.
    fn unknown_names(dashboard: &serde_json::Value) -> (Vec<String>, usize) {
        let samples = all_samples();
        let series: BTreeSet<&str> = samples.iter().map(|s| s.name.as_str()).collect();
        let metrics: BTreeSet<&str> = samples.iter().map(|s| s.metric_name()).collect();
        let labels: BTreeSet<&str> = samples
            .iter()
            .flat_map(|s| s.labels.iter().map(|(k, _)| k.as_str()))
            .collect();
        let mut found = Vec::new();
        strings(dashboard, "", &mut found);
        let mut unknown = Vec::new();
        let mut queried = 0;
        for (key, text) in found {
            let query = matches!(key, "expr" | "query" | "definition");
            for name in names_in(text) {
                let known = series.contains(name)
                    || labels.contains(name)
                    || (!query && metrics.contains(name));
                queried += usize::from(query && series.contains(name));
                if !known {
                    unknown.push(format!("{key}: {name} in {text}"));
                }
            }
        }
        (unknown, queried)
    }

    /// The Grafana dashboard in deploy/ cannot drift from what the daemon renders.
    #[test]
    fn the_grafana_dashboard_names_only_metrics_the_daemon_renders() {
        let text = include_str!("../../../deploy/grafana/tenax-dashboard.json");
        let dashboard: serde_json::Value =
            serde_json::from_str(text).expect("the dashboard is JSON");
        let (unknown, queried) = unknown_names(&dashboard);
        assert!(
            unknown.is_empty(),
            "deploy/grafana/tenax-dashboard.json names metrics the daemon does not render:\n{}",
            unknown.join("\n")
        );
        assert!(queried >= 40, "the dashboard queries {queried} names");
        // Every metric the daemon renders is on it.
        let on_it: BTreeSet<&str> = names_in(text).into_iter().collect();
        let all = all_samples();
        let shown: BTreeSet<&str> = all
            .iter()
            .filter(|s| on_it.contains(s.name.as_str()))
            .map(|s| s.metric_name())
            .collect();
        let missing: BTreeSet<&str> = all
            .iter()
            .map(|s| s.metric_name())
            .filter(|m| !shown.contains(m))
            .collect();
        assert!(missing.is_empty(), "not on the dashboard: {missing:?}");
        // The check itself catches an old name, a histogram queried by its metric name,
        // and a typo.
        let bad = serde_json::json!({"panels": [{"targets": [
            {"expr": "tenax_checkpoint_save_seconds_last"},
            {"expr": "rate(tenax_step_seconds[5m])"},
            {"expr": "sum(tenax_stepp{tenax_job=\"x\"})"},
        ], "title": "tenax_step_seconds"}]});
        let (unknown, _) = unknown_names(&bad);
        assert_eq!(unknown.len(), 3, "{unknown:?}");
    }
}
