//! The connections of `tenax status` and `tenax control`: a read-only etcd client for a
//! job's registrations (and the control addresses of the members a command targets), and
//! clients of the members' Control service, each call under a deadline and each failure
//! as one line an operator can act on.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use tenax_cluster::etcd::{EtcdConfig, EtcdError, EtcdMembership, Member};
use tenax_core::membership::{MemberId, MemberInfo};
use tenax_proto::v1::control_client::ControlClient;
use tenax_proto::v1::{StatusReply, StatusRequest};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::{Target, DEFAULT_ETCD};

/// The members registered for `job` and the generation of the stored plan (if any).
pub(super) async fn read_job(
    endpoints: &[String],
    job: &str,
    etcd_client: &crate::etcd_args::EtcdClientArgs,
    timeout: Duration,
) -> Result<(Vec<Member>, Option<u64>)> {
    let url = endpoints.join(",");
    let etcd = connect_etcd(endpoints, job, etcd_client, timeout).await?;
    let members = etcd.members().await.map_err(|e| etcd_failure(&url, e))?;
    let plan_gen = match etcd.read_plan().await {
        Ok(plan) => plan.map(|p| p.generation),
        // A plan value another tool wrote badly: fall back to the members' generation.
        Err(EtcdError::Protocol { .. }) => None,
        Err(e) => return Err(etcd_failure(&url, e)),
    };
    Ok((members, plan_gen))
}

/// A read-only etcd client for `job` with `timeout` per call and one retry.
async fn connect_etcd(
    endpoints: &[String],
    job: &str,
    etcd_client: &crate::etcd_args::EtcdClientArgs,
    timeout: Duration,
) -> Result<EtcdMembership> {
    let url = endpoints.join(",");
    let mut config = EtcdConfig::new(endpoints.to_vec(), job);
    config.op_timeout = timeout;
    config.connect_timeout = timeout;
    config.max_retries = 1;
    config.backoff_initial = Duration::from_millis(100);
    config.backoff_max = Duration::from_millis(500);
    etcd_client.apply(&mut config)?;
    EtcdMembership::connect(config)
        .await
        .map_err(|e| etcd_failure(&url, e))
}

/// The operator-facing error for an etcd failure.
fn etcd_failure(url: &str, e: EtcdError) -> anyhow::Error {
    match e {
        EtcdError::Unreachable { last_error, .. } => anyhow!(
            "etcd at {url} is unreachable ({}): start etcd or fix --etcd",
            short_reason(&last_error)
        ),
        EtcdError::Timeout { timeout, .. } => anyhow!(
            "etcd at {url} is unreachable (no answer within {timeout:?}): start etcd or fix --etcd"
        ),
        other => anyhow!(other),
    }
}

/// A connection error in a few words where it is a common one (the etcd client's
/// errors carry a debug dump of the whole chain); otherwise the text, at most 300 chars.
pub(super) fn short_reason(error: &str) -> String {
    let lower = error.to_lowercase();
    if lower.contains("connection refused") || lower.contains("connectionrefused") {
        "connection refused".to_string()
    } else if lower.contains("dns error") || lower.contains("failed to lookup") {
        "unknown host".to_string()
    } else if lower.contains("timed out") || lower.contains("deadline") {
        "timed out".to_string()
    } else if lower.contains("no route to host") || lower.contains("unreachable") {
        "no route to host".to_string()
    } else if error.chars().count() > 300 {
        format!("{}...", error.chars().take(300).collect::<String>())
    } else {
        error.to_string()
    }
}

/// The error when a job has no registered member.
pub(super) fn no_members(job: &str, url: &str) -> String {
    format!(
        "job {job} has no registered members in etcd at {url}: is the daemon running, and is \
         --job right?"
    )
}

/// Splits a comma-separated endpoint list, adding `http://` where no scheme is given.
pub(super) fn parse_endpoints(list: &str) -> Result<Vec<String>> {
    let endpoints: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| {
            if e.contains("://") {
                e.to_string()
            } else {
                format!("http://{e}")
            }
        })
        .collect();
    if endpoints.is_empty() {
        bail!("--etcd is empty: pass at least one URL, e.g. {DEFAULT_ETCD}");
    }
    Ok(endpoints)
}

/// A member's registration, or (a placeholder with its id, why it is unreadable).
pub(super) fn parse_member(m: &Member) -> Result<MemberInfo, (MemberInfo, String)> {
    match tenax_cluster::records::decode_member_info(&m.id, &m.info) {
        Ok(info) => Ok(info),
        Err(e) => Err((
            MemberInfo {
                id: MemberId::new(m.id.clone()),
                devices: 0,
                joined_gen: 0,
                addr: String::new(),
                metrics_addr: String::new(),
            },
            format!("its registration in etcd is not readable: {e}"),
        )),
    }
}

/// The URI of a control address: `host:port` gets `http://`.
pub(super) fn control_uri(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// An error and its sources, `a: b: c` (tonic's transport errors hide the cause).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// A gRPC error in a line.
pub(super) fn describe_status(s: &tonic::Status) -> String {
    if s.message().is_empty() {
        format!("{:?}", s.code())
    } else {
        format!("{:?}: {}", s.code(), s.message())
    }
}

/// A client of the Control service at `addr`, connected within `timeout`.
pub(super) async fn connect_control(
    addr: &str,
    timeout: Duration,
    tls: Option<&ClientTlsConfig>,
) -> Result<ControlClient<Channel>, String> {
    let uri = match tls {
        Some(_) => control_uri(addr).replacen("http://", "https://", 1),
        None => control_uri(addr),
    };
    let mut endpoint = Endpoint::from_shared(uri)
        .map_err(|e| format!("bad address {addr:?}: {e}"))?
        .connect_timeout(timeout)
        .timeout(timeout);
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls.clone())
            .map_err(|e| format!("TLS settings: {e}"))?;
    }
    let channel = endpoint.connect().await.map_err(|e| {
        let chain = error_chain(&e);
        // "transport error: tcp connect error: ..." says nothing the rest does not.
        chain
            .strip_prefix("transport error: ")
            .map_or(chain.clone(), str::to_string)
    })?;
    Ok(ControlClient::new(channel))
}

/// Runs `f` (connect and call) under `timeout`, as one line of error on failure.
pub(super) async fn with_deadline<T>(
    timeout: Duration,
    f: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    match tokio::time::timeout(timeout, f).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// A member's `Control.Status`, or why there is none.
pub(crate) async fn query_status(
    addr: &str,
    timeout: Duration,
    tls: Option<&ClientTlsConfig>,
) -> Result<StatusReply, String> {
    if addr.is_empty() {
        return Err("it registered no control address".to_string());
    }
    with_deadline(timeout, async {
        let mut client = connect_control(addr, timeout, tls).await?;
        let mut request = tonic::Request::new(StatusRequest {});
        request.set_timeout(timeout);
        client
            .status(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| describe_status(&s))
    })
    .await
}

/// A request with a gRPC deadline.
pub(super) fn timed<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

/// Every registered member's name and control address (`--all`).
pub(super) async fn all_members(
    target: &Target,
    timeout: Duration,
) -> Result<Vec<(String, String)>> {
    let endpoints = parse_endpoints(&target.etcd)?;
    let url = endpoints.join(",");
    let etcd = connect_etcd(&endpoints, &target.job, &target.etcd_client, timeout).await?;
    let members = etcd.members().await.map_err(|e| etcd_failure(&url, e))?;
    if members.is_empty() {
        bail!(no_members(&target.job, &url));
    }
    members
        .iter()
        .map(|m| {
            let addr = member_addr(&m.id, &target.job, &url, &members)?;
            Ok((format!("member {}", m.id), addr))
        })
        .collect()
}

/// (how to name the target in messages, its control address).
pub(super) async fn resolve(target: &Target, timeout: Duration) -> Result<(String, String)> {
    if let Some(addr) = &target.addr {
        return Ok((format!("the member at {addr}"), addr.clone()));
    }
    let Some(node) = &target.node else {
        bail!("pass --node ID (looked up in etcd) or --addr HOST:PORT");
    };
    let endpoints = parse_endpoints(&target.etcd)?;
    let url = endpoints.join(",");
    let etcd = connect_etcd(&endpoints, &target.job, &target.etcd_client, timeout).await?;
    let members = etcd.members().await.map_err(|e| etcd_failure(&url, e))?;
    let addr = member_addr(node, &target.job, &url, &members)?;
    Ok((format!("member {node}"), addr))
}

/// The control address member `node` registered, or an error naming who is registered.
pub(super) fn member_addr(node: &str, job: &str, url: &str, members: &[Member]) -> Result<String> {
    if members.is_empty() {
        bail!(no_members(job, url));
    }
    let Some(m) = members.iter().find(|m| m.id == node) else {
        let ids: Vec<&str> = members.iter().map(|m| m.id.as_str()).collect();
        bail!(
            "member {node} is not registered in job {job} at {url}; registered: {}",
            ids.join(", ")
        );
    };
    let info = parse_member(m).map_err(|(_, e)| anyhow!("member {node}: {e}"))?;
    if info.addr.is_empty() {
        bail!("member {node} registered no control address: pass --addr HOST:PORT");
    }
    Ok(info.addr)
}

/// Whether the Control service at `addr` answers a Status call within `timeout`: the
/// membership leader's probe of a suspected member.
pub(crate) async fn probe_control(
    addr: &str,
    timeout: Duration,
    tls: Option<ClientTlsConfig>,
) -> bool {
    with_deadline(timeout, async {
        let mut client = connect_control(addr, timeout, tls.as_ref()).await?;
        client
            .status(tenax_proto::v1::StatusRequest {})
            .await
            .map_err(|s| s.to_string())
    })
    .await
    .is_ok()
}
