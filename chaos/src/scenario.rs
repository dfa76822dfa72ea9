//! Chaos scenario files (TOML): the cluster, the training run, a fault schedule (by time
//! or by step), a random mode with a rate, and the invariants to check.
//!
//! ```toml
//! name = "smoke"
//! description = "one kill and one hang on 3 daemons"
//!
//! [cluster]
//! nodes = 3
//!
//! [train]               # what every `tenax daemon` trains
//! preset = "tiny"
//! steps = 60
//! batch_size = 12
//! micro_batch_size = 2
//! ckpt_every = 20
//! args = ["--lr", "3e-3"]   # further training flags, given to the daemons and the reference run
//!
//! [daemon]              # failure detection of the daemons
//! lease_ttl_s = 2
//! settle_ms = 200
//! suspect_after_ms = 1000
//! env = { TENAX_LOG = "info" }   # environment of every daemon
//!
//! [run]
//! timeout_s = 600       # the whole run is bounded; past it the run fails
//! # stop_after_s = 3700 # a run sized by time: stop the job this long after the first step
//! #                     # (its target step is then the newest committed checkpoint)
//!
//! [[faults]]            # a fixed fault: at a time (at_s, seconds since the first step) or a step
//! kind = "kill"
//! at_step = 15
//! node = "any"          # "any" (the seed picks), "leader", "non-leader", or an index
//! restart_after_s = 1.0
//!
//! [random]              # faults drawn from the seed: a Poisson process
//! rate_per_min = 1.0
//! start_s = 30.0
//! duration_s = 600.0
//! [[random.faults]]     # templates; each event picks one at random
//! kind = "kill"
//!
//! [invariants]
//! check = ["slots_exactly_once", "final_params_match_fault_free"]   # default: all
//! ```
//!
//! [`Scenario::parse`] checks everything a run needs before anything starts and names the
//! offending key in one line. [`crate::schedule::schedule`] turns a scenario and a seed
//! into the exact fault schedule.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Every invariant the checker knows, in report order.
pub const ALL_INVARIANTS: &[&str] = &[
    "target_step_reached",
    "slots_exactly_once",
    "no_stale_generation",
    "checkpoints_verify",
    "steps_never_go_backwards",
    "no_healthy_member_evicted",
    "final_params_match_fault_free",
];

/// The most daemons a scenario may start on one machine.
pub const MAX_NODES: usize = 16;

/// The most faults a schedule may hold (fixed plus random).
pub const MAX_FAULTS: usize = 1000;

/// A parsed, checked scenario.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name (the report's title).
    #[serde(default)]
    pub name: String,
    /// What the scenario shows.
    #[serde(default)]
    pub description: String,
    /// The cluster.
    pub cluster: ClusterSection,
    /// The training run.
    pub train: TrainSection,
    /// Failure detection of the daemons.
    #[serde(default)]
    pub daemon: DaemonSection,
    /// Bounds of the run.
    #[serde(default)]
    pub run: RunSection,
    /// Fixed faults.
    #[serde(default)]
    pub faults: Vec<FaultSpec>,
    /// Random faults.
    #[serde(default)]
    pub random: Option<RandomSection>,
    /// Which invariants to check.
    #[serde(default)]
    pub invariants: InvariantsSection,
}

/// `[cluster]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// Daemons (each its own process on 127.0.0.1).
    pub nodes: usize,
}

/// `[train]`: the training flags every daemon and the fault-free reference run get.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Model preset (`--preset`).
    #[serde(default = "default_preset")]
    pub preset: String,
    /// Target step (`--steps`).
    pub steps: u64,
    /// Global batch in sequences (`--batch-size`).
    #[serde(default = "default_batch")]
    pub batch_size: u64,
    /// Sequences per slot (`--micro-batch-size`).
    #[serde(default = "default_micro_batch")]
    pub micro_batch_size: u64,
    /// Checkpoint interval in steps (`--ckpt-every`).
    #[serde(default = "default_ckpt_every")]
    pub ckpt_every: u64,
    /// Text to train on; absent: a small synthetic corpus the harness writes.
    #[serde(default)]
    pub data: Option<String>,
    /// Further training flags.
    #[serde(default)]
    pub args: Vec<String>,
}

fn default_preset() -> String {
    "tiny".into()
}
fn default_batch() -> u64 {
    12
}
fn default_micro_batch() -> u64 {
    2
}
fn default_ckpt_every() -> u64 {
    25
}

/// `[daemon]`: failure detection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonSection {
    /// `--lease-ttl-s`.
    #[serde(default = "default_ttl")]
    pub lease_ttl_s: i64,
    /// `--settle-ms`.
    #[serde(default = "default_settle")]
    pub settle_ms: u64,
    /// `--suspect-after-ms`.
    #[serde(default = "default_suspect")]
    pub suspect_after_ms: u64,
    /// Further daemon flags.
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment of every daemon, e.g. `{ TENAX_LOG = "info" }` or a chaos hook (only a
    /// `tenax` built with `--features chaos-hooks` runs a scenario that sets one).
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
}

fn default_ttl() -> i64 {
    2
}
fn default_settle() -> u64 {
    200
}
fn default_suspect() -> u64 {
    1000
}

impl Default for DaemonSection {
    fn default() -> Self {
        DaemonSection {
            lease_ttl_s: default_ttl(),
            settle_ms: default_settle(),
            suspect_after_ms: default_suspect(),
            args: Vec::new(),
            env: Default::default(),
        }
    }
}

/// `[run]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    /// The whole run (faults, training to the target step) must end within this.
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
    /// How long the harness waits for the cluster to be steady (every node training in
    /// one generation) before a fault; a fault that finds no steady cluster is injected
    /// anyway and the wait is reported.
    #[serde(default = "default_steady")]
    pub steady_timeout_s: u64,
    /// A run sized by time, not steps: seconds since the first step after which the
    /// harness ends the job (once the faults in flight have ended) by stopping every
    /// daemon; the run's target step is then the newest checkpoint etcd committed, and
    /// `train.steps` only an upper bound. Absent: the job ends at `train.steps`.
    #[serde(default)]
    pub stop_after_s: Option<f64>,
}

fn default_timeout() -> u64 {
    900
}
fn default_steady() -> u64 {
    60
}

impl Default for RunSection {
    fn default() -> Self {
        RunSection {
            timeout_s: default_timeout(),
            steady_timeout_s: default_steady(),
            stop_after_s: None,
        }
    }
}

/// `[random]`: a Poisson process of faults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RandomSection {
    /// Mean faults per minute.
    pub rate_per_min: f64,
    /// First possible fault, in seconds since the first step.
    #[serde(default)]
    pub start_s: f64,
    /// Length of the window in which faults are drawn.
    pub duration_s: f64,
    /// `"poisson"` (exponential gaps, the default) or `"even"` (one fault every
    /// `60 / rate_per_min` seconds, each moved by up to a quarter of the gap).
    #[serde(default)]
    pub spacing: Spacing,
    /// Fault templates (no `at_s`/`at_step`); each event picks one uniformly.
    pub faults: Vec<FaultSpec>,
}

/// How random faults are spaced in time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Spacing {
    /// A Poisson process: exponential gaps of mean `60 / rate_per_min` seconds.
    #[default]
    Poisson,
    /// Evenly spaced with a seeded jitter of up to a quarter of the gap.
    Even,
}

/// `[invariants]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvariantsSection {
    /// Names from [`ALL_INVARIANTS`]; empty: all of them.
    #[serde(default)]
    pub check: Vec<String>,
}

/// The kinds of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// SIGKILL a daemon, start it again after `restart_after_s`.
    Kill,
    /// SIGSTOP a daemon for `duration_s`, then SIGCONT.
    Hang,
    /// A straggler: SIGSTOP `stop_ms` of every `stop_ms + run_ms` for `duration_s`.
    Slow,
    /// Cut a daemon off from its peers and/or etcd through its TCP proxies.
    Partition,
    /// S3 errors and latency through the HTTP proxy in front of the S3 server.
    S3,
    /// Stop etcd (kill -9) and start it again after `duration_s` (short).
    EtcdRestart,
    /// etcd down for `duration_s` (long enough for leases to expire).
    EtcdDown,
    /// SIGKILL the checkpoint writer while it uploads a checkpoint.
    KillInUpload,
    /// Several targets at once (a rack losing power): the daemons of `nodes` are
    /// SIGKILLed and, with `etcd = true`, etcd is stopped, all at the same instant; all
    /// come back after `restart_after_s`.
    Group,
}

impl FaultKind {
    /// The name used in scenario files and reports.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Hang => "hang",
            FaultKind::Slow => "slow",
            FaultKind::Partition => "partition",
            FaultKind::S3 => "s3",
            FaultKind::EtcdRestart => "etcd_restart",
            FaultKind::EtcdDown => "etcd_down",
            FaultKind::KillInUpload => "kill_in_upload",
            FaultKind::Group => "group",
        }
    }

    /// Whether the fault targets one daemon.
    pub fn has_node(self) -> bool {
        matches!(
            self,
            FaultKind::Kill | FaultKind::Hang | FaultKind::Slow | FaultKind::Partition
        )
    }

    /// Whether the fault takes a member out of the group (the harness measures a recovery).
    pub fn removes_member(self) -> bool {
        matches!(
            self,
            FaultKind::Kill
                | FaultKind::Hang
                | FaultKind::Partition
                | FaultKind::KillInUpload
                | FaultKind::Group
        )
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which daemon a fault hits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum NodeTarget {
    /// This node index.
    Index(usize),
    /// `"any"` (the seed picks an index), `"leader"` or `"non-leader"` (resolved when the
    /// fault is injected, from `tenax status`).
    Named(String),
}

impl fmt::Display for NodeTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeTarget::Index(i) => write!(f, "{i}"),
            NodeTarget::Named(n) => write!(f, "{n:?}"),
        }
    }
}

/// What a partition cuts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PartitionFrom {
    /// The daemon's peers cannot reach it (its gRPC port's proxy).
    Peers,
    /// The daemon cannot reach etcd (its etcd proxy).
    Etcd,
    /// Both.
    Both,
}

/// How a partition behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PartitionMode {
    /// Connections stay open, nothing passes (TCP does not notice).
    Blackhole,
    /// Connections are closed and new ones refused.
    Drop,
    /// Every chunk is held `delay_ms`.
    Delay,
}

/// One fault as written in a scenario (a fixed fault or a random template).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    /// What to do.
    pub kind: FaultKind,
    /// When: seconds since the first step (fixed faults: this or `at_step`).
    #[serde(default)]
    pub at_s: Option<f64>,
    /// When: once a daemon logged this step.
    #[serde(default)]
    pub at_step: Option<u64>,
    /// Which daemon (kinds with a node; default `"any"`).
    #[serde(default)]
    pub node: Option<NodeTarget>,
    /// Group: the daemons it hits at once, each an index, `"any"` (the seed draws one not
    /// otherwise named), `"leader"` or `"non-leader"`; all distinct, at least one survivor.
    #[serde(default)]
    pub nodes: Option<Vec<NodeTarget>>,
    /// Group: whether etcd goes down with the nodes (a rack holding an etcd member).
    #[serde(default)]
    pub etcd: Option<bool>,
    /// How long the fault lasts (hang, slow, partition, s3, etcd_restart, etcd_down).
    #[serde(default)]
    pub duration_s: Option<f64>,
    /// Kill, kill_in_upload: how long the daemon stays dead.
    #[serde(default)]
    pub restart_after_s: Option<f64>,
    /// Slow: stopped part of each cycle.
    #[serde(default)]
    pub stop_ms: Option<u64>,
    /// Slow: running part of each cycle.
    #[serde(default)]
    pub run_ms: Option<u64>,
    /// Partition: what is cut (default both).
    #[serde(default)]
    pub from: Option<PartitionFrom>,
    /// Partition: how (default blackhole).
    #[serde(default)]
    pub mode: Option<PartitionMode>,
    /// Partition with mode delay: the delay.
    #[serde(default)]
    pub delay_ms: Option<u64>,
    /// S3: the fraction of requests that fail (503 SlowDown, 500, dropped connections).
    #[serde(default)]
    pub error_rate: Option<f64>,
    /// S3, kill_in_upload: latency added to every S3 request.
    #[serde(default)]
    pub latency_ms: Option<u64>,
}

/// An error in a scenario file: one line naming the key and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScenarioError(pub String);

impl fmt::Display for ScenarioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ScenarioError {}

fn bad(msg: impl Into<String>) -> ScenarioError {
    ScenarioError(msg.into())
}

impl FaultSpec {
    /// Seconds the fault lasts (with its kind's default).
    pub fn duration_s(&self) -> f64 {
        self.duration_s.unwrap_or(match self.kind {
            FaultKind::Hang => 8.0,
            FaultKind::Slow => 8.0,
            FaultKind::Partition => 8.0,
            FaultKind::S3 => 15.0,
            FaultKind::EtcdRestart => 1.0,
            FaultKind::EtcdDown => 10.0,
            FaultKind::Kill | FaultKind::KillInUpload | FaultKind::Group => 0.0,
        })
    }

    /// Seconds a killed daemon (a group: its daemons and etcd) stays dead.
    pub fn restart_after_s(&self) -> f64 {
        self.restart_after_s.unwrap_or(match self.kind {
            FaultKind::Group => 5.0,
            _ => 2.0,
        })
    }

    /// Seconds from the injection to the end of the fault, as planned (a kill: until the
    /// restart; kill_in_upload: from the kill, which waits for an upload).
    pub fn planned_length_s(&self) -> f64 {
        match self.kind {
            FaultKind::Kill | FaultKind::KillInUpload | FaultKind::Group => self.restart_after_s(),
            _ => self.duration_s(),
        }
    }

    /// Group: whether etcd goes down too.
    pub fn group_etcd(&self) -> bool {
        self.etcd.unwrap_or(false)
    }

    /// Slow: (stopped, running) milliseconds of each cycle.
    pub fn duty_cycle_ms(&self) -> (u64, u64) {
        (self.stop_ms.unwrap_or(400), self.run_ms.unwrap_or(200))
    }

    /// S3: the error rate.
    pub fn error_rate(&self) -> f64 {
        self.error_rate.unwrap_or(0.2)
    }

    /// S3 latency (kill_in_upload: enough to catch an upload in flight).
    pub fn latency_ms(&self) -> u64 {
        self.latency_ms.unwrap_or(match self.kind {
            FaultKind::KillInUpload => 1500,
            _ => 100,
        })
    }

    fn check(&self, at: &str, nodes: usize, fixed: bool) -> Result<(), ScenarioError> {
        let k = self.kind.name();
        match (fixed, self.at_s, self.at_step) {
            (true, None, None) => {
                return Err(bad(format!(
                    "{at} (kind {k}): give it a time, at_s = SECONDS, or a step, at_step = N"
                )))
            }
            (true, Some(_), Some(_)) => {
                return Err(bad(format!(
                    "{at} (kind {k}): give at_s or at_step, not both"
                )))
            }
            (false, Some(_), _) | (false, _, Some(_)) => {
                return Err(bad(format!(
                "{at} (kind {k}): a random template takes no at_s/at_step; the seed draws the time"
            )))
            }
            _ => {}
        }
        if let Some(t) = self.at_s {
            if !(t.is_finite() && t >= 0.0) {
                return Err(bad(format!("{at}.at_s = {t}: use seconds >= 0")));
            }
        }
        if self.at_step == Some(0) {
            return Err(bad(format!("{at}.at_step = 0: steps start at 1")));
        }
        for (key, v) in [
            ("duration_s", self.duration_s),
            ("restart_after_s", self.restart_after_s),
        ] {
            if let Some(v) = v {
                if !(v.is_finite() && (0.0..=3600.0).contains(&v)) {
                    return Err(bad(format!(
                        "{at}.{key} = {v}: use seconds between 0 and 3600"
                    )));
                }
            }
        }
        match (&self.node, self.kind.has_node()) {
            (Some(_), false) => {
                return Err(bad(format!(
                    "{at}.node: a {k} fault hits no single daemon; remove node"
                )))
            }
            (Some(NodeTarget::Index(i)), true) if *i >= nodes => {
                return Err(bad(format!(
                    "{at}.node = {i}: the cluster has nodes 0..{}",
                    nodes.saturating_sub(1)
                )))
            }
            (Some(NodeTarget::Named(n)), true)
                if !matches!(n.as_str(), "any" | "leader" | "non-leader") =>
            {
                return Err(bad(format!(
                    "{at}.node = {n:?}: use an index, \"any\", \"leader\" or \"non-leader\""
                )))
            }
            _ => {}
        }
        let named_ok = |t: &NodeTarget| match t {
            NodeTarget::Index(i) => *i < nodes,
            NodeTarget::Named(n) => matches!(n.as_str(), "any" | "leader" | "non-leader"),
        };
        match (&self.nodes, self.kind) {
            (Some(_), kind) if kind != FaultKind::Group => {
                return Err(bad(format!(
                    "{at}.nodes: only a group fault hits several daemons; use node = ... or kind = \"group\""
                )))
            }
            (targets, FaultKind::Group) => {
                let targets = targets.as_deref().unwrap_or_default();
                if targets.is_empty() && !self.group_etcd() {
                    return Err(bad(format!(
                        "{at}: a group fault needs nodes = [...] and/or etcd = true"
                    )));
                }
                if let Some(t) = targets.iter().find(|t| !named_ok(t)) {
                    return Err(bad(format!(
                        "{at}.nodes: {t} is not a node; use indices 0..{}, \"any\", \"leader\" or \"non-leader\"",
                        nodes.saturating_sub(1)
                    )));
                }
                if targets.len() >= nodes {
                    return Err(bad(format!(
                        "{at}.nodes: {} of {nodes} daemons leaves no survivor; hit at most {}",
                        targets.len(),
                        nodes.saturating_sub(1)
                    )));
                }
                for (i, t) in targets.iter().enumerate() {
                    let repeatable = matches!(t, NodeTarget::Named(n) if n == "any");
                    if !repeatable && targets[..i].contains(t) {
                        return Err(bad(format!("{at}.nodes: {t} given twice")));
                    }
                }
                let roles = targets
                    .iter()
                    .filter(|t| matches!(t, NodeTarget::Named(n) if n == "leader" || n == "non-leader"))
                    .count();
                let indices = targets
                    .iter()
                    .filter(|t| matches!(t, NodeTarget::Index(_)))
                    .count();
                if roles > 0 && indices > 0 {
                    return Err(bad(format!(
                        "{at}.nodes: mix \"leader\"/\"non-leader\" with \"any\", not with indices (an index may be the leader)"
                    )));
                }
            }
            _ => {}
        }
        if let Some(r) = self.error_rate {
            if !(0.0..=1.0).contains(&r) {
                return Err(bad(format!(
                    "{at}.error_rate = {r}: use a fraction in [0, 1]"
                )));
            }
        }
        let only = |key: &str, set: bool, kinds: &[FaultKind]| -> Result<(), ScenarioError> {
            if set && !kinds.contains(&self.kind) {
                return Err(bad(format!(
                    "{at}.{key}: not a setting of a {k} fault; remove it"
                )));
            }
            Ok(())
        };
        only(
            "stop_ms/run_ms",
            self.stop_ms.is_some() || self.run_ms.is_some(),
            &[FaultKind::Slow],
        )?;
        only(
            "from/mode/delay_ms",
            self.from.is_some() || self.mode.is_some() || self.delay_ms.is_some(),
            &[FaultKind::Partition],
        )?;
        only("error_rate", self.error_rate.is_some(), &[FaultKind::S3])?;
        only(
            "latency_ms",
            self.latency_ms.is_some(),
            &[FaultKind::S3, FaultKind::KillInUpload],
        )?;
        only(
            "restart_after_s",
            self.restart_after_s.is_some(),
            &[FaultKind::Kill, FaultKind::KillInUpload, FaultKind::Group],
        )?;
        only("etcd", self.etcd.is_some(), &[FaultKind::Group])?;
        if self.kind == FaultKind::Slow {
            let (stop, run) = self.duty_cycle_ms();
            if stop == 0 || run == 0 {
                return Err(bad(format!(
                    "{at}: stop_ms and run_ms must both be > 0 (a duty cycle)"
                )));
            }
        }
        if self.mode == Some(PartitionMode::Delay) && self.delay_ms.is_none() {
            return Err(bad(format!(
                "{at}: mode = \"delay\" needs delay_ms = MILLISECONDS"
            )));
        }
        Ok(())
    }
}

impl Scenario {
    /// Parses and checks a scenario file's text; `origin` names it in errors.
    ///
    /// # Errors
    /// A one-line [`ScenarioError`] naming the file and the key.
    pub fn parse(text: &str, origin: &str) -> Result<Scenario, ScenarioError> {
        let s: Scenario = toml::from_str(text).map_err(|e| {
            let msg = e.message().to_string();
            let line = e
                .span()
                .map(|sp| text[..sp.start.min(text.len())].lines().count().max(1));
            match line {
                Some(l) => bad(format!("{origin}:{l}: {msg}")),
                None => bad(format!("{origin}: {msg}")),
            }
        })?;
        s.check().map_err(|e| bad(format!("{origin}: {}", e.0)))?;
        Ok(s)
    }

    fn check(&self) -> Result<(), ScenarioError> {
        let n = self.cluster.nodes;
        if !(2..=MAX_NODES).contains(&n) {
            return Err(bad(format!(
                "cluster.nodes = {n}: use 2 to {MAX_NODES} (faults need survivors)"
            )));
        }
        let t = &self.train;
        if t.steps == 0 {
            return Err(bad("train.steps = 0: train at least one step"));
        }
        if t.micro_batch_size == 0
            || t.batch_size == 0
            || !t.batch_size.is_multiple_of(t.micro_batch_size)
        {
            return Err(bad(format!(
                "train.batch_size = {} must be a positive multiple of train.micro_batch_size = {}",
                t.batch_size, t.micro_batch_size
            )));
        }
        if self.daemon.lease_ttl_s < 2 {
            return Err(bad(format!(
                "daemon.lease_ttl_s = {}: etcd's minimum lease is 2 s",
                self.daemon.lease_ttl_s
            )));
        }
        if self.run.timeout_s == 0 {
            return Err(bad("run.timeout_s = 0: give the run time to finish"));
        }
        if let Some(stop) = self.run.stop_after_s {
            if !(stop.is_finite() && stop > 0.0 && stop < self.run.timeout_s as f64) {
                return Err(bad(format!(
                    "run.stop_after_s = {stop}: use a time in (0, run.timeout_s = {})",
                    self.run.timeout_s
                )));
            }
        }
        for (i, f) in self.faults.iter().enumerate() {
            f.check(&format!("faults[{i}]"), n, true)?;
            if let Some(s) = f.at_step {
                if s > t.steps {
                    return Err(bad(format!(
                        "faults[{i}].at_step = {s}: past train.steps = {}",
                        t.steps
                    )));
                }
            }
        }
        if let Some(r) = &self.random {
            if !(r.rate_per_min.is_finite() && r.rate_per_min > 0.0 && r.rate_per_min <= 60.0) {
                return Err(bad(format!(
                    "random.rate_per_min = {}: use a rate in (0, 60]",
                    r.rate_per_min
                )));
            }
            if !(r.duration_s.is_finite() && r.duration_s > 0.0 && r.start_s >= 0.0) {
                return Err(bad(
                    "random: give duration_s > 0 and start_s >= 0 (seconds since the first step)",
                ));
            }
            if r.faults.is_empty() {
                return Err(bad(
                    "random.faults is empty: add [[random.faults]] templates, e.g. kind = \"kill\"",
                ));
            }
            for (i, f) in r.faults.iter().enumerate() {
                f.check(&format!("random.faults[{i}]"), n, false)?;
            }
            let expected = r.rate_per_min * r.duration_s / 60.0;
            if expected > MAX_FAULTS as f64 / 2.0 {
                return Err(bad(format!(
                    "random: {expected:.0} faults expected; at most {} per run",
                    MAX_FAULTS / 2
                )));
            }
        }
        for name in &self.invariants.check {
            if !ALL_INVARIANTS.contains(&name.as_str()) {
                return Err(bad(format!(
                    "invariants.check: unknown invariant {name:?}; known: {}",
                    ALL_INVARIANTS.join(", ")
                )));
            }
        }
        Ok(())
    }

    /// The invariants this scenario checks.
    pub fn invariants(&self) -> Vec<&'static str> {
        ALL_INVARIANTS
            .iter()
            .copied()
            .filter(|n| {
                self.invariants.check.is_empty() || self.invariants.check.iter().any(|c| c == n)
            })
            .collect()
    }

    /// Batch slots per step.
    pub fn slots(&self) -> u64 {
        self.train.batch_size / self.train.micro_batch_size.max(1)
    }
}

/// Training flags for the fault-free reference run: `args` without the pipeline flags
/// (`--pipeline-stages`, `--schedule`, with their values, in either `--flag value` or
/// `--flag=value` form, and the daemon's `--stages-across-nodes`), so a pipelined job is
/// compared with the unsplit model.
pub fn without_pipeline_flags(args: &[String]) -> Vec<String> {
    const FLAGS: [&str; 2] = ["--pipeline-stages", "--schedule"];
    const SWITCHES: [&str; 1] = ["--stages-across-nodes"];
    let mut out = Vec::with_capacity(args.len());
    let mut skip_value = false;
    for a in args {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        let name = a.split('=').next().unwrap_or_default();
        if SWITCHES.contains(&name) {
            continue;
        }
        if FLAGS.contains(&name) {
            skip_value = !a.contains('=');
            continue;
        }
        out.push(a.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "[cluster]\nnodes = 3\n[train]\nsteps = 40\n";

    #[test]
    fn the_reference_run_drops_the_pipeline_flags() {
        let cases: &[(&[&str], &[&str])] = &[
            (&["--lr", "3e-3"], &["--lr", "3e-3"]),
            (&["--pipeline-stages", "2", "--lr", "1"], &["--lr", "1"]),
            (
                &["--schedule=gpipe", "--pipeline-stages=3", "--x"],
                &["--x"],
            ),
            (&["--lr", "1", "--schedule", "1f1b"], &["--lr", "1"]),
            (
                &[
                    "--pipeline-stages",
                    "2",
                    "--stages-across-nodes",
                    "--lr",
                    "1",
                ],
                &["--lr", "1"],
            ),
        ];
        for (args, want) in cases {
            let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            assert_eq!(without_pipeline_flags(&args), *want, "{args:?}");
        }
    }

    #[test]
    fn a_group_fault_takes_nodes_and_etcd() {
        let s = Scenario::parse(
            &format!("{BASE}[[faults]]\nkind = \"group\"\nat_s = 5\nnodes = [\"leader\", \"any\"]\netcd = true\n"),
            "t.toml",
        )
        .unwrap();
        let f = &s.faults[0];
        assert_eq!(f.kind, FaultKind::Group);
        assert!(f.group_etcd());
        assert_eq!(f.nodes.as_ref().map(Vec::len), Some(2));
        assert_eq!((f.restart_after_s(), f.planned_length_s()), (5.0, 5.0));
        let only_etcd = Scenario::parse(
            &format!(
                "{BASE}[[faults]]\nkind = \"group\"\nat_s = 5\netcd = true\nrestart_after_s = 3\n"
            ),
            "t.toml",
        )
        .unwrap();
        assert_eq!(only_etcd.faults[0].planned_length_s(), 3.0);
    }

    #[test]
    fn a_minimal_scenario_gets_defaults() {
        let s = Scenario::parse(BASE, "t.toml").unwrap();
        assert_eq!(s.train.preset, "tiny");
        assert_eq!(s.daemon.lease_ttl_s, 2);
        assert_eq!(s.slots(), 6);
        assert_eq!(s.invariants().len(), ALL_INVARIANTS.len());
    }

    #[test]
    fn bad_scenarios_name_the_key() {
        let table: &[(&str, &str)] = &[
            ("[cluster]\nnodes = 1\n[train]\nsteps = 4\n", "cluster.nodes = 1"),
            ("[cluster]\nnodes = 3\n[train]\nsteps = 0\n", "train.steps = 0"),
            ("[cluster]\nnodes = 3\n[train]\nsteps = 4\nbatch_size = 5\n", "multiple"),
            (
                "[cluster]\nnodes = 3\n[train]\nsteps = 4\n[run]\ntimeout_s = 60\nstop_after_s = 60\n",
                "run.stop_after_s = 60",
            ),
            (
                "[cluster]\nnodes = 3\n[train]\nsteps = 4\n[run]\nstop_after_s = -1\n",
                "run.stop_after_s = -1",
            ),
            (
                "[cluster]\nnodes = 3\n[train]\nsteps = 40\n[[faults]]\nkind = \"kill\"\n",
                "faults[0] (kind kill): give it a time",
            ),
            (
                "[cluster]\nnodes = 3\n[train]\nsteps = 40\n[[faults]]\nkind = \"kill\"\nat_s = 1\nnode = 3\n",
                "faults[0].node = 3",
            ),
            (
                "[cluster]\nnodes = 3\n[train]\nsteps = 40\n[[faults]]\nkind = \"s3\"\nat_s = 1\nnode = 1\n",
                "faults[0].node",
            ),
            (
                "[cluster]\nnodes = 3\n[train]\nsteps = 40\n[[faults]]\nkind = \"hang\"\nat_step = 41\n",
                "past train.steps",
            ),
            (
                "[cluster]\nnodes = 3\n[train]\nsteps = 40\n[[faults]]\nkind = \"kill\"\nat_s = 1\nerror_rate = 0.5\n",
                "faults[0].error_rate: not a setting of a kill fault",
            ),
            (
                "[cluster]\nnodes = 3\n[train]\nsteps = 40\n[[faults]]\nkind = \"meteor\"\nat_s = 1\n",
                "t.toml:",
            ),
            (
                "[cluster]\nnodes = 3\n[train]\nsteps = 40\n[random]\nrate_per_min = 1\nduration_s = 60\nfaults = []\n",
                "random.faults is empty",
            ),
            (
                "[cluster]\nnodes = 3\n[train]\nsteps = 40\n[invariants]\ncheck = [\"happy\"]\n",
                "unknown invariant",
            ),
            ("[cluster]\nnodes = 3\n[train]\nsteps = 40\ncolour = 1\n", "colour"),
            ("[cluster]\nnodes = 3\n[train]\nsteps = 40\n[[faults]]\nkind = \"group\"\nat_s = 1\n", "a group fault needs nodes"),
            ("[cluster]\nnodes = 3\n[train]\nsteps = 40\n[[faults]]\nkind = \"group\"\nat_s = 1\nnodes = [0, 1, 2]\n", "3 of 3 daemons leaves no survivor"),
            ("[cluster]\nnodes = 3\n[train]\nsteps = 40\n[[faults]]\nkind = \"group\"\nat_s = 1\nnodes = [1, 1]\n", "given twice"),
            ("[cluster]\nnodes = 3\n[train]\nsteps = 40\n[[faults]]\nkind = \"group\"\nat_s = 1\nnodes = [\"leader\", 1]\n", "mix"),
            ("[cluster]\nnodes = 3\n[train]\nsteps = 40\n[[faults]]\nkind = \"group\"\nat_s = 1\nnodes = [5]\n", "faults[0].nodes: 5 is not a node"),
            ("[cluster]\nnodes = 3\n[train]\nsteps = 40\n[[faults]]\nkind = \"group\"\nat_s = 1\nnode = 1\netcd = true\n", "faults[0].node: a group fault hits no single daemon"),
            ("[cluster]\nnodes = 3\n[train]\nsteps = 40\n[[faults]]\nkind = \"kill\"\nat_s = 1\nnodes = [1]\n", "faults[0].nodes: only a group fault"),
            ("[cluster]\nnodes = 3\n[train]\nsteps = 40\n[[faults]]\nkind = \"kill\"\nat_s = 1\netcd = true\n", "faults[0].etcd: not a setting of a kill fault"),
        ];
        for (text, want) in table {
            let e = Scenario::parse(text, "t.toml").unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e:?} lacks {want:?}");
            assert!(!e.contains('\n'), "one line: {e:?}");
        }
    }
}
