//! The etcd driver for membership and fencing of one job (async, tokio).
//!
//! Everything a job keeps in etcd lives under `/tenax/<job>/`; the key names and the
//! records' encodings are in [`crate::records`]. The driver writes:
//!
//! | key | value | written by |
//! |---|---|---|
//! | `members/<id>` | the member's info bytes, under the member's lease | [`EtcdMembership::register`] |
//! | `leader/<lease hex>` | the member id of a campaigner (etcd's election keys) | [`EtcdMembership::campaign`] |
//! | `gen` | the plan envelope `{"generation":N,"plan":<plan JSON>}` (one value) | [`EtcdMembership::write_plan`] |
//! | `suspects/<suspect>/<reporter>` | a suspicion report `{"reporter":..,"reason":..,"at_ms":..}`, under the reporter's lease | [`EtcdMembership::report_suspect`] |
//! | anything else, e.g. `checkpoint` | caller bytes | [`EtcdMembership::fenced_put`], [`EtcdMembership::put_if_absent`] |
//!
//! The driver decodes the plan envelope (the generation, and plan bytes that are JSON)
//! but not the plan inside: [`crate::records::decode_plan`] does, with validation. A
//! `gen` value that is not an envelope is an [`EtcdError::Protocol`] for a read, and is
//! skipped with a warning by a plan watch.
//!
//! Fencing: a plan write and every commit is ONE etcd txn whose compares are the
//! generation (the `gen` key's `mod_revision` that carried it, or its absence for the
//! first plan) and the writer's lease (`lease(members/<id>) == writer lease`, false when the
//! key is gone). A member whose lease expired, or that still believes in an older
//! generation, cannot commit anything, whatever its clock says: safety rests on etcd
//! revisions, never on lease timing.
//!
//! Every etcd call has a timeout ([`EtcdConfig::op_timeout`]); transient failures
//! (unavailable, timeout, connection reset) are retried inside each call with bounded
//! exponential backoff ([`EtcdConfig::max_retries`]), then surface as a typed
//! [`EtcdError`] that names the endpoints and the key. Background tasks (lease
//! keep-alive, plan watch) never panic: they report through tokio watch channels and end
//! when their handle is dropped, when the lease is gone, or after
//! [`EtcdConfig::give_up_after`] without an answer from etcd.
//!
//! Every request sent to etcd is counted ([`EtcdMembership::requests`], keep-alives also
//! apart: [`EtcdMembership::keepalive_requests`]), so that a benchmark can report etcd
//! requests per re-formation and per training step.
//!
//! TLS and authentication ([`EtcdConfig::tls`], [`EtcdConfig::auth`]): `https://`
//! endpoints are reached over TLS (rustls with the aws-lc-rs provider) trusting only the
//! given CA, with a client certificate for etcd's `--client-cert-auth`; with a user, the
//! client authenticates at connect and sends etcd's auth token with every request. etcd's
//! simple tokens live in its memory: they expire after `--auth-token-ttl` unused, and a
//! restart loses those issued before its last snapshot (it replays the `Authenticate`
//! entries of its log after it). A request refused for an invalid token renews the token
//! (one `Authenticate`, shared by every task of the driver) and is sent again, within the
//! same retry bound, on every path: calls, campaigns, lease keep-alives and watches. A
//! wrong user name or password, or a user without permission, is
//! [`EtcdError::Auth`] at once (never retried); a TLS failure at connect is
//! [`EtcdError::Tls`]. Neither the password nor the client key is ever printed (their
//! `Debug` shows neither).
//!
//! Member keys are watched with [`EtcdMembership::watch_members`] (the leader's view of
//! who is registered) and [`EtcdMembership::watch_member`] (a member watching its own
//! key): a snapshot, then every put and delete, as [`MemberEvent`]s. Suspicion reports
//! are watched with [`EtcdMembership::watch_suspects`] (the leader hearing the followers'
//! reports): only reports put after the watch started, as [`SuspectEvent`]s.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::future::Future;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, GetResponse, KeyValue,
    LeaderKey, LeaseKeepAliveStream, LeaseKeeper, PutOptions, ResignOptions, SortOrder, SortTarget,
    Txn, TxnOp, TxnOpResponse, TxnResponse, WatchOptions,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::records::{self, SuspectRecord, GEN_KEY, LEADER_PREFIX, SUSPECTS_PREFIX};

/// HTTP/2 ping interval on open streams (watch, keep-alive): finds a dead or hung etcd
/// on a long-lived stream. etcd refuses pings more often than every 5 s.
const HTTP2_PING_INTERVAL: Duration = Duration::from_secs(10);

/// How long an HTTP/2 ping may stay unanswered before the connection is dropped.
const HTTP2_PING_TIMEOUT: Duration = Duration::from_secs(5);

/// The shortest keep-alive period, whatever the TTL.
const MIN_KEEPALIVE_PERIOD: Duration = Duration::from_millis(200);

/// How many times a plan write or a fenced put re-reads the `gen` key after finding its
/// cached revision stale, before giving up with a [`EtcdError::Protocol`].
const FENCE_ROUNDS: u32 = 3;

/// The smallest lease TTL etcd grants with its default timing (3.4: 2 s).
pub const MIN_LEASE_TTL_S: i64 = 2;

/// The longest reason a suspicion report carries, in bytes; a longer one is cut (at a
/// character boundary) by [`EtcdMembership::report_suspect`].
pub const MAX_REPORT_REASON_BYTES: usize = 1024;

/// Settings of one [`EtcdMembership`]. [`EtcdConfig::new`] fills in the defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdConfig {
    /// etcd client URLs, `http://host:port` (several for a cluster; the client balances).
    pub endpoints: Vec<String>,
    /// The job name: every key lives under `/tenax/<job>/`. Letters, digits, `.`, `_`, `-`.
    pub job: String,
    /// Member lease TTL in seconds (at least [`MIN_LEASE_TTL_S`]); keep-alives are sent
    /// every third of it.
    pub lease_ttl_s: i64,
    /// Timeout of one etcd request (one attempt).
    pub op_timeout: Duration,
    /// Timeout of the first contact in [`EtcdMembership::connect`] and of each TCP connect.
    pub connect_timeout: Duration,
    /// Retries of a request after a transient failure (so `max_retries + 1` attempts).
    pub max_retries: u32,
    /// Backoff before the first retry; doubled per retry (with jitter) up to `backoff_max`.
    pub backoff_initial: Duration,
    /// The longest backoff between two retries.
    pub backoff_max: Duration,
    /// How long a background task (keep-alive, plan watch) keeps retrying without any
    /// answer from etcd before it gives up and reports it.
    pub give_up_after: Duration,
    /// Capacity of the channel of a [`PlanWatch`] (the watch waits when it is full).
    pub watch_buffer: usize,
    /// TLS to etcd; required by `https://` endpoints, refused with `http://` ones.
    pub tls: Option<EtcdTls>,
    /// etcd username/password authentication; `None`: no user (etcd without auth).
    pub auth: Option<EtcdAuth>,
}

/// TLS to etcd, as PEM bytes (the driver reads no file: the `tenax` binary reads them
/// from `--etcd-ca`, `--etcd-cert` and `--etcd-key`). Only the given CA is trusted (no
/// system roots), and etcd's certificate must name the endpoint's host (IP or DNS SAN).
/// `Debug` prints sizes, never the key.
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdTls {
    /// The CA certificate(s) that signed etcd's server certificate (one or more PEM
    /// `CERTIFICATE` blocks).
    pub ca_pem: Vec<u8>,
    /// The client certificate (chain) shown to etcd, PEM; with `client_key_pem`. etcd
    /// started with `--client-cert-auth` refuses a client without one signed by its
    /// `--trusted-ca-file`.
    pub client_cert_pem: Option<Vec<u8>>,
    /// The client certificate's private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub client_key_pem: Option<Vec<u8>>,
}

impl EtcdTls {
    /// TLS trusting `ca_pem`, without a client certificate.
    pub fn new(ca_pem: Vec<u8>) -> Self {
        EtcdTls {
            ca_pem,
            client_cert_pem: None,
            client_key_pem: None,
        }
    }

    /// The same, showing etcd the client certificate `cert_pem` with its key `key_pem`.
    pub fn with_client_cert(mut self, cert_pem: Vec<u8>, key_pem: Vec<u8>) -> Self {
        self.client_cert_pem = Some(cert_pem);
        self.client_key_pem = Some(key_pem);
        self
    }

    /// Checks that `pem` holds at least one certificate and returns how many; the error
    /// says what is wrong, for a message that names the file.
    ///
    /// # Errors
    /// When `pem` has no `CERTIFICATE` block or a block does not decode.
    pub fn check_certificates(pem: &[u8]) -> Result<usize, String> {
        use rustls_pki_types::pem::PemObject;
        let mut n = 0;
        for cert in rustls_pki_types::CertificateDer::pem_slice_iter(pem) {
            cert.map_err(|e| format!("a PEM certificate does not decode ({e})"))?;
            n += 1;
        }
        if n == 0 {
            return Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into());
        }
        Ok(n)
    }

    /// Checks that `pem` holds a private key (PKCS#8, PKCS#1 or SEC1); the error says
    /// what is wrong, never the key.
    ///
    /// # Errors
    /// When `pem` has no private key block, or it does not decode.
    pub fn check_private_key(pem: &[u8]) -> Result<(), String> {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::PrivateKeyDer::from_pem_slice(pem)
            .map(|_| ())
            .map_err(|e| format!("holds no usable PEM private key ({e})"))
    }

    /// Checks the PEM parts; the error names the part.
    fn validate(&self) -> Result<(), String> {
        Self::check_certificates(&self.ca_pem).map_err(|e| format!("the etcd CA {e}"))?;
        match (&self.client_cert_pem, &self.client_key_pem) {
            (None, None) => Ok(()),
            (Some(cert), Some(key)) => {
                Self::check_certificates(cert)
                    .map_err(|e| format!("the etcd client certificate {e}"))?;
                Self::check_private_key(key).map_err(|e| format!("the etcd client key {e}"))
            }
            _ => Err(
                "a client certificate needs its key and a key its certificate: give both \
                      or neither"
                    .into(),
            ),
        }
    }

    /// A rustls client configuration with the same CA and client certificate as
    /// [`EtcdTls::options`] (ALPN `h2`, like the gRPC client), for [`tls_failure`].
    fn rustls_config(&self) -> Result<rustls::ClientConfig, String> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&self.ca_pem) {
            let cert = cert.map_err(|e| format!("the etcd CA: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("the etcd CA is no usable CA certificate ({e})"))?;
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS versions: {e}"))?
            .with_root_certificates(roots);
        let mut config = match (&self.client_cert_pem, &self.client_key_pem) {
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_slice_iter(cert)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("the etcd client certificate: {e}"))?;
                let key = PrivateKeyDer::from_pem_slice(key)
                    .map_err(|e| format!("the etcd client key: {e}"))?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    format!("the etcd client key does not fit its certificate ({e})")
                })?
            }
            _ => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }

    /// The rustls settings for the etcd client.
    fn options(&self) -> etcd_client::TlsOptions {
        let mut tls = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(&self.ca_pem));
        if let (Some(cert), Some(key)) = (&self.client_cert_pem, &self.client_key_pem) {
            tls = tls.identity(etcd_client::Identity::from_pem(cert, key));
        }
        tls
    }
}

impl fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdTls")
            .field("ca_pem_bytes", &self.ca_pem.len())
            .field(
                "client_cert_pem_bytes",
                &self.client_cert_pem.as_ref().map(Vec::len),
            )
            .field(
                "client_key_pem",
                &self.client_key_pem.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// etcd username/password authentication. The password is never printed: `Debug` shows
/// `<redacted>`, and no error carries it.
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdAuth {
    /// The etcd user (it needs read-write permission on `/tenax/<job>/`).
    pub user: String,
    /// Its password.
    pub password: String,
}

impl EtcdAuth {
    /// Authentication as `user` with `password`.
    pub fn new(user: impl Into<String>, password: impl Into<String>) -> Self {
        EtcdAuth {
            user: user.into(),
            password: password.into(),
        }
    }
}

impl fmt::Debug for EtcdAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdAuth")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl EtcdConfig {
    /// A config for `job` on `endpoints` with the defaults: lease TTL 5 s, request
    /// timeout 5 s, connect timeout 3 s, 5 retries with backoff from 100 ms to 2 s,
    /// background tasks give up after 10 min without etcd, watch buffer 64.
    pub fn new(endpoints: Vec<String>, job: impl Into<String>) -> Self {
        EtcdConfig {
            endpoints,
            job: job.into(),
            lease_ttl_s: 5,
            op_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            max_retries: 5,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            give_up_after: Duration::from_secs(600),
            watch_buffer: 64,
            tls: None,
            auth: None,
        }
    }

    /// Checks every field; the error says which one and what is allowed.
    fn validate(&self) -> Result<(), EtcdError> {
        let bad = |detail: String| Err(EtcdError::InvalidConfig { detail });
        if self.endpoints.is_empty() {
            return bad("no etcd endpoint given: pass at least one http://host:port".into());
        }
        for e in &self.endpoints {
            match (
                e.starts_with("http://"),
                e.starts_with("https://"),
                &self.tls,
            ) {
                (true, _, None) | (_, true, Some(_)) => {}
                (true, _, Some(_)) => {
                    return bad(format!(
                        "etcd endpoint {e:?} is http:// but TLS settings are given: write it \
                         as https://host:port, or drop the TLS settings"
                    ))
                }
                (_, true, None) => {
                    return bad(format!(
                        "etcd endpoint {e:?} is https:// but no CA is given to check etcd's \
                         certificate: give the CA (--etcd-ca)"
                    ))
                }
                _ => {
                    return bad(format!(
                        "etcd endpoint {e:?} is not an http:// or https:// URL: write it as \
                         http://host:port (https:// with TLS)"
                    ))
                }
            }
        }
        if let Some(tls) = &self.tls {
            tls.validate()
                .map_err(|detail| EtcdError::InvalidConfig { detail })?;
        }
        if let Some(auth) = &self.auth {
            if auth.user.is_empty() || auth.user.chars().any(char::is_control) {
                return bad(format!(
                    "etcd user {:?} is empty or has control characters",
                    auth.user
                ));
            }
            if auth.password.is_empty() {
                return bad(format!("etcd user {:?} has an empty password", auth.user));
            }
        }
        if self.job.is_empty()
            || !self
                .job
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return bad(format!(
                "job name {:?} is empty or has characters other than letters, digits, '.', '_', '-'",
                self.job
            ));
        }
        if self.lease_ttl_s < MIN_LEASE_TTL_S {
            return bad(format!(
                "lease_ttl_s {} is below etcd's minimum of {MIN_LEASE_TTL_S} s",
                self.lease_ttl_s
            ));
        }
        if self.op_timeout.is_zero() || self.connect_timeout.is_zero() {
            return bad("op_timeout and connect_timeout must be above zero".into());
        }
        if self.backoff_initial.is_zero() || self.backoff_initial > self.backoff_max {
            return bad(format!(
                "backoff_initial {:?} must be above zero and at most backoff_max {:?}",
                self.backoff_initial, self.backoff_max
            ));
        }
        if self.watch_buffer == 0 {
            return bad("watch_buffer must be at least 1".into());
        }
        Ok(())
    }
}

impl Default for EtcdConfig {
    /// Job `default` on a local etcd, `http://127.0.0.1:2379`.
    fn default() -> Self {
        EtcdConfig::new(vec!["http://127.0.0.1:2379".to_string()], "default")
    }
}

/// What went wrong talking to etcd. Every variant names the endpoints and the key (or
/// the setting) concerned, and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// A setting of [`EtcdConfig`] is out of range.
    #[error("invalid etcd configuration: {detail}")]
    InvalidConfig {
        /// Which setting, and what is allowed.
        detail: String,
    },
    /// An argument of a call is not allowed (a reserved key, a generation that does not
    /// grow, a plan that is not JSON).
    #[error("invalid argument to {what}: {detail}")]
    InvalidArgument {
        /// The operation.
        what: &'static str,
        /// What is wrong and what is allowed.
        detail: String,
    },
    /// etcd could not be reached (connection refused or reset, unavailable) after every
    /// retry.
    #[error(
        "etcd at {endpoints} is unreachable: {what} {key} failed {attempts} time(s), last \
         error: {last_error}; check that etcd runs there and that the endpoint list is right"
    )]
    Unreachable {
        /// The endpoints tried, comma-separated.
        endpoints: String,
        /// The operation.
        what: &'static str,
        /// The key (or key prefix) concerned.
        key: String,
        /// Attempts made.
        attempts: u32,
        /// The last error seen.
        last_error: String,
    },
    /// etcd did not answer within [`EtcdConfig::op_timeout`], on every attempt.
    #[error(
        "etcd at {endpoints} did not answer {what} {key} within {timeout:?} ({attempts} \
         attempt(s)); etcd may be overloaded, partitioned or without a leader: retry later"
    )]
    Timeout {
        /// The endpoints tried, comma-separated.
        endpoints: String,
        /// The operation.
        what: &'static str,
        /// The key concerned.
        key: String,
        /// The timeout of one attempt.
        timeout: Duration,
        /// Attempts made.
        attempts: u32,
    },
    /// The member's lease expired or was revoked: its keys are gone and nothing it
    /// writes is accepted any more.
    #[error(
        "lease {lease:#x} of member {member_id} is gone (expired or revoked) at {endpoints}; \
         register again to rejoin the job"
    )]
    LeaseLost {
        /// The endpoints, comma-separated.
        endpoints: String,
        /// The member whose lease it was.
        member_id: String,
        /// The lease.
        lease: i64,
    },
    /// etcd refused the credentials: a wrong user name or password, authentication off
    /// while a user is given or on while none is, or a user without permission on the
    /// job's keys. Never retried: a retry does not fix it.
    #[error("etcd at {endpoints} refused {who} ({what} {key}): {detail}")]
    Auth {
        /// The endpoints, comma-separated.
        endpoints: String,
        /// `user "NAME"`, or `a client without a user`.
        who: String,
        /// The operation.
        what: &'static str,
        /// The key concerned.
        key: String,
        /// etcd's answer, and what to do.
        detail: String,
    },
    /// The TLS handshake with etcd failed (an unknown CA, a certificate for another
    /// host, no or an untrusted client certificate).
    #[error(
        "TLS with etcd at {endpoints} failed: {detail}; check that the CA signed etcd's \
         certificate for this host, and that a client certificate and key signed by etcd's \
         CA are given (etcd with --client-cert-auth refuses a client without one)"
    )]
    Tls {
        /// The endpoints, comma-separated.
        endpoints: String,
        /// The TLS error.
        detail: String,
    },
    /// etcd refused the request for a reason that a retry does not fix.
    #[error("etcd at {endpoints} refused {what} {key}: {source}")]
    Rejected {
        /// The endpoints, comma-separated.
        endpoints: String,
        /// The operation.
        what: &'static str,
        /// The key concerned.
        key: String,
        /// etcd's answer.
        #[source]
        source: etcd_client::Error,
    },
    /// etcd answered with something the driver does not understand (a missing header, a
    /// malformed plan value written by another tool).
    #[error("etcd at {endpoints} answered {what} {key} with something unexpected: {detail}")]
    Protocol {
        /// The endpoints, comma-separated.
        endpoints: String,
        /// The operation.
        what: &'static str,
        /// The key concerned.
        key: String,
        /// What was unexpected, and what to do.
        detail: String,
    },
}

impl EtcdError {
    /// Whether etcd said the lease does not exist (expired or revoked).
    fn is_lease_not_found(&self) -> bool {
        matches!(self, EtcdError::Rejected { source, .. } if lease_not_found(source))
    }
}

/// The identity a fenced write is checked against: the member key
/// `/tenax/<job>/members/<member_id>` must exist under `lease`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Writer {
    /// The member id the writer registered with.
    pub member_id: String,
    /// The writer's lease.
    pub lease: i64,
}

/// One member as registered in etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// The member id (the last part of its key).
    pub id: String,
    /// The info bytes it registered with.
    pub info: Vec<u8>,
    /// Its lease.
    pub lease: i64,
}

/// The state of a registration's lease, as its keep-alive task last saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseState {
    /// The last keep-alive was answered with a positive TTL.
    Alive,
    /// The last refresh got no answer after every retry (etcd down or unreachable); the
    /// lease may or may not still exist. The task keeps trying.
    Unconfirmed {
        /// Refreshes in a row that got no answer.
        failed_refreshes: u32,
    },
    /// The lease is gone (etcd said so, or etcd gave no answer for
    /// [`EtcdConfig::give_up_after`]). The keep-alive task has ended.
    Lost {
        /// Why, for logs.
        reason: String,
    },
    /// [`Registration::stop_keepalive`] was called: the lease expires after its TTL.
    Stopped,
}

/// A registered member: its lease, kept alive by a background task until the lease is
/// lost, [`Registration::stop_keepalive`] or [`Registration::revoke`] is called, or the
/// handle is dropped (then the lease expires after its TTL).
#[derive(Debug)]
pub struct Registration {
    /// The membership that registered it (for revoke).
    membership: EtcdMembership,
    /// Member id and lease.
    writer: Writer,
    /// The TTL etcd granted, in seconds.
    ttl_s: i64,
    /// Test and chaos hook: while set, the keep-alive task sends nothing.
    paused: Arc<AtomicBool>,
    /// The keep-alive task's reports.
    state_tx: Arc<watch::Sender<LeaseState>>,
    /// A receiver kept so that the state can always be read.
    state_rx: watch::Receiver<LeaseState>,
    /// The keep-alive task; aborted on stop and on drop.
    task: Option<JoinHandle<()>>,
}

impl Registration {
    /// The member id.
    pub fn member_id(&self) -> &str {
        &self.writer.member_id
    }

    /// The lease the member key lives under.
    pub fn lease_id(&self) -> i64 {
        self.writer.lease
    }

    /// The TTL etcd granted (at least the requested one).
    pub fn ttl_s(&self) -> i64 {
        self.ttl_s
    }

    /// The identity to pass to fenced writes and to [`EtcdMembership::campaign`].
    pub fn writer(&self) -> Writer {
        self.writer.clone()
    }

    /// A receiver of the lease state: `changed().await` wakes on every change, e.g. to
    /// [`LeaseState::Lost`].
    pub fn lease_state(&self) -> watch::Receiver<LeaseState> {
        self.state_rx.clone()
    }

    /// Whether the keep-alive task found the lease gone.
    pub fn is_lost(&self) -> bool {
        matches!(*self.state_rx.borrow(), LeaseState::Lost { .. })
    }

    /// Test and chaos hook: stop sending keep-alives (nothing else changes), so that the
    /// lease expires after its TTL as if the member hung or was partitioned.
    pub fn pause_keepalive(&self) {
        self.paused.store(true, Ordering::SeqCst);
    }

    /// Undoes [`Registration::pause_keepalive`]; the next refresh finds out whether the
    /// lease survived (if not, the state becomes [`LeaseState::Lost`]).
    pub fn resume_keepalive(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }

    /// Stops the keep-alive task; the lease then expires after its TTL. The state becomes
    /// [`LeaseState::Stopped`] unless it was already [`LeaseState::Lost`].
    pub fn stop_keepalive(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        self.state_tx.send_if_modified(|s| {
            if matches!(s, LeaseState::Lost { .. } | LeaseState::Stopped) {
                false
            } else {
                *s = LeaseState::Stopped;
                true
            }
        });
    }

    /// Leaves the job now: stops the keep-alive and revokes the lease, which deletes the
    /// member key (and any election key under it) at once.
    ///
    /// # Errors
    /// As [`EtcdMembership::revoke_lease`]; a lease already gone is not an error.
    pub async fn revoke(mut self) -> Result<(), EtcdError> {
        self.stop_keepalive();
        self.membership.revoke_lease(self.writer.lease).await?;
        Ok(())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The stored plan: its generation, the caller's plan bytes, and the revision that wrote
/// it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanRecord {
    /// The generation.
    pub generation: u64,
    /// The plan exactly as the caller passed it to [`EtcdMembership::write_plan`].
    pub plan: Vec<u8>,
    /// The `mod_revision` of the `gen` key: the etcd revision of the write.
    pub mod_revision: i64,
}

/// What [`EtcdMembership::write_plan`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The plan is stored, at this revision.
    Written {
        /// The etcd revision of the write.
        revision: i64,
    },
    /// The stored generation is not the expected previous one: someone else re-formed
    /// the group first. Nothing was written.
    Conflict {
        /// The generation stored now (`None`: no plan yet).
        current_generation: Option<u64>,
    },
}

/// Why a fenced write was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FenceRefusal {
    /// No plan is stored, so no generation can be current.
    NoPlan,
    /// The writer's generation is not the current one.
    StaleGeneration {
        /// The writer's generation.
        writer: u64,
        /// The current generation.
        current: u64,
    },
    /// The writer's member key is gone or under another lease: its lease expired or was
    /// revoked, or it registered again.
    WriterLeaseGone {
        /// The member id.
        member_id: String,
        /// The lease the writer holds.
        lease: i64,
        /// The lease of its member key now (`None`: no key).
        current_lease: Option<i64>,
    },
}

impl fmt::Display for FenceRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FenceRefusal::NoPlan => write!(f, "no plan is stored, so no generation is current"),
            FenceRefusal::StaleGeneration { writer, current } => write!(
                f,
                "the writer is in generation {writer} but the current one is {current}"
            ),
            FenceRefusal::WriterLeaseGone {
                member_id,
                lease,
                current_lease,
            } => match current_lease {
                None => write!(
                    f,
                    "member {member_id} is no longer registered (its lease {lease:#x} expired \
                     or was revoked)"
                ),
                Some(l) => write!(
                    f,
                    "member {member_id} registered again under lease {l:#x}; the writer holds \
                     the old lease {lease:#x}"
                ),
            },
        }
    }
}

/// What [`EtcdMembership::fenced_put`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FenceOutcome {
    /// The value is stored, at this revision.
    Committed {
        /// The etcd revision of the write.
        revision: i64,
    },
    /// The fence refused the write; nothing was written.
    Refused {
        /// Why.
        reason: FenceRefusal,
    },
}

/// One version of a key, as [`EtcdMembership::key_history`] reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyVersion {
    /// The etcd revision that wrote this value (the key's `mod_revision` then).
    pub revision: i64,
    /// The value.
    pub value: Vec<u8>,
}

/// The current leader of the job's election.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderInfo {
    /// The leader's member id (the value it campaigned with).
    pub member_id: String,
    /// The lease its election key lives under.
    pub lease: i64,
    /// The create revision of its election key: grows with every new leadership.
    pub create_revision: i64,
}

/// Leadership won by [`EtcdMembership::campaign`]; pass it to
/// [`EtcdMembership::resign`]. It lasts while the lease lives and the election key is
/// not deleted.
#[derive(Clone, Debug)]
pub struct Leadership {
    /// The leader (this member).
    pub info: LeaderInfo,
    /// etcd's handle on the election key.
    key: LeaderKey,
}

/// A position in the plan history: the generation delivered last and the revision that
/// carried it. A [`PlanWatch`] started from it delivers only later plans.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanCursor {
    /// The generation delivered last.
    pub generation: u64,
    /// The etcd revision that wrote it.
    pub revision: i64,
}

/// A new plan, as delivered by a [`PlanWatch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanUpdate {
    /// The generation.
    pub generation: u64,
    /// The plan bytes, as written.
    pub plan: Vec<u8>,
    /// The etcd revision that wrote it.
    pub revision: i64,
}

impl PlanUpdate {
    /// The cursor to resume a watch after this update.
    pub fn cursor(&self) -> PlanCursor {
        PlanCursor {
            generation: self.generation,
            revision: self.revision,
        }
    }
}

/// The state of a [`PlanWatch`]'s background task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchStatus {
    /// Reading the current plan or opening the watch.
    Connecting,
    /// The watch is open; new plans are delivered as they are written.
    Watching,
    /// The connection broke (etcd restarted, network); reconnecting with backoff.
    Reconnecting {
        /// Failed attempts in a row.
        attempts: u32,
        /// The last error.
        last_error: String,
    },
    /// The watch gave up (etcd unreachable for [`EtcdConfig::give_up_after`], or a
    /// member key that is not UTF-8); the channel is closed. Start a new watch from the last
    /// cursor once the cause is fixed.
    Failed {
        /// Why, naming the key and the endpoints.
        error: String,
    },
}

/// A resumable etcd watch running in a background task: [`KeyWatch::recv`] yields what it
/// delivers, in etcd revision order. The task survives disconnects and etcd restarts (it
/// resumes from the last revision seen) and compactions (it re-reads the key or range and
/// continues from there), gives up after [`EtcdConfig::give_up_after`] without a working
/// connection, and ends when the handle is dropped.
#[derive(Debug)]
pub struct KeyWatch<T> {
    /// Bounded channel of deliveries ([`EtcdConfig::watch_buffer`]).
    rx: mpsc::Receiver<T>,
    /// The task's state.
    status: watch::Receiver<WatchStatus>,
    /// Times the task reopened the watch after a broken connection.
    reconnects: Arc<AtomicU64>,
    /// Times the task re-read after finding its revision compacted.
    resyncs: Arc<AtomicU64>,
    /// The task; aborted on drop.
    task: JoinHandle<()>,
}

impl<T> KeyWatch<T> {
    /// The next delivery, or `None` once the task has ended (see [`KeyWatch::status`]).
    pub async fn recv(&mut self) -> Option<T> {
        self.rx.recv().await
    }

    /// The task's state now.
    pub fn status(&self) -> WatchStatus {
        self.status.borrow().clone()
    }

    /// A receiver of the task's state, to wait for changes.
    pub fn status_receiver(&self) -> watch::Receiver<WatchStatus> {
        self.status.clone()
    }

    /// Times the watch was reopened after a broken connection.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// Times the key or range was re-read because the watch's revision had been compacted.
    pub fn resyncs(&self) -> u64 {
        self.resyncs.load(Ordering::Relaxed)
    }
}

impl<T> Drop for KeyWatch<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A watch of the job's plan: [`KeyWatch::recv`] yields every new plan in generation
/// order, never an older generation than one already delivered. After a compaction it
/// re-reads the current plan: plans compacted away before it could see them are skipped,
/// the newest is delivered.
pub type PlanWatch = KeyWatch<PlanUpdate>;

/// What a [`MemberWatch`] delivers, in etcd revision order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberEvent {
    /// Every member of the watched range at `revision`, sorted by id. Delivered first,
    /// and again after the watch found its revision compacted: it then replaces the
    /// receiver's view (members missing from it are gone).
    Snapshot {
        /// The members.
        members: Vec<Member>,
        /// The etcd revision of the read.
        revision: i64,
    },
    /// A member key was put: a registration, or a re-registration under a new lease.
    Put {
        /// The member as registered now.
        member: Member,
        /// The etcd revision of the put.
        revision: i64,
    },
    /// A member key was deleted: its lease was revoked or expired (member keys live
    /// under their lease), or someone deleted it by hand.
    Deleted {
        /// The member id.
        id: String,
        /// The etcd revision of the deletion.
        revision: i64,
    },
}

/// A watch of member keys ([`EtcdMembership::watch_members`],
/// [`EtcdMembership::watch_member`]): a [`MemberEvent::Snapshot`], then every change in
/// order; a new snapshot after a compaction.
pub type MemberWatch = KeyWatch<MemberEvent>;

/// One suspicion report, as put by [`EtcdMembership::report_suspect`] and delivered by a
/// [`SuspectWatch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SuspectReport {
    /// The suspected member id (from the key).
    pub suspect: String,
    /// The reporting member id (from the key; the value names the same one).
    pub reporter: String,
    /// What the reporter saw.
    pub reason: String,
    /// When the reporter reported it: its wall clock, milliseconds since the Unix epoch
    /// (informational: nothing is decided on another node's clock).
    pub at_ms: u64,
    /// The etcd revision of the put.
    pub revision: i64,
}

/// What a [`SuspectWatch`] delivers, in etcd revision order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SuspectEvent {
    /// The watch read the reports prefix at `revision` and watches from the next
    /// revision on. Reports stored before are NOT delivered (they were made to an earlier
    /// leader, or are old). Delivered first, and again after the watch found its
    /// revision compacted (reports in the compacted gap are not delivered).
    Synced {
        /// The etcd revision of the read.
        revision: i64,
    },
    /// A report was put (a new one, or a reporter repeating itself). Deletions (a
    /// reporter's lease ending) are not delivered; nor are malformed keys or values
    /// (logged and skipped).
    Report(SuspectReport),
}

/// A watch of the suspicion reports of a job ([`EtcdMembership::watch_suspects`]): a
/// [`SuspectEvent::Synced`], then every report put after it.
pub type SuspectWatch = KeyWatch<SuspectEvent>;

/// The etcd driver of one job. Cheap to clone (clones share the connection and the
/// request counter); every method takes `&self`, so a campaign can wait in its own task
/// while others read and write.
#[derive(Clone, Debug)]
pub struct EtcdMembership {
    inner: Arc<Inner>,
}

/// What clones of an [`EtcdMembership`] share.
struct Inner {
    /// The etcd client (clones share its channel).
    client: Client,
    /// The settings.
    config: EtcdConfig,
    /// The endpoints, comma-separated, for messages.
    endpoints: String,
    /// `/tenax/<job>/`.
    prefix: String,
    /// Requests sent to etcd.
    requests: AtomicU64,
    /// The part of `requests` that were lease keep-alives.
    keepalive_requests: AtomicU64,
    /// The newest (generation, mod_revision) of the `gen` key this driver has seen: lets
    /// a fenced write skip the read of the `gen` key.
    plan_rev: Mutex<Option<PlanCursor>>,
    /// Auth tokens obtained after the first one (see [`Inner::renew_token`]).
    token_renewals: AtomicU64,
    /// Held while a token is renewed, so that tasks refused at once renew it once.
    renew_lock: tokio::sync::Mutex<()>,
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inner")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("requests", &self.requests)
            .finish_non_exhaustive()
    }
}

impl EtcdMembership {
    /// Connects to etcd and checks, within [`EtcdConfig::connect_timeout`], that it
    /// answers (one read of the job's `gen` key).
    ///
    /// # Errors
    /// [`EtcdError::InvalidConfig`] for a bad setting; [`EtcdError::Unreachable`] naming
    /// the endpoints when etcd does not answer in time.
    pub async fn connect(config: EtcdConfig) -> Result<Self, EtcdError> {
        config.validate()?;
        let endpoints = config.endpoints.join(",");
        let prefix = records::job_prefix(&config.job);
        let mut options = ConnectOptions::new()
            .with_connect_timeout(config.connect_timeout)
            .with_keep_alive(HTTP2_PING_INTERVAL, HTTP2_PING_TIMEOUT);
        if let Some(tls) = &config.tls {
            options = options.with_tls(tls.options());
        }
        if let Some(auth) = &config.auth {
            options = options.with_user(auth.user.clone(), auth.password.clone());
        }
        let unreachable = |last_error: String| EtcdError::Unreachable {
            endpoints: endpoints.clone(),
            what: "connect",
            key: prefix.clone(),
            attempts: 1,
            last_error,
        };
        // With a user, connecting authenticates (the first request on the connection).
        let client = match tokio::time::timeout(
            config.connect_timeout,
            Client::connect(&config.endpoints, Some(options)),
        )
        .await
        {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => {
                return Err(first_contact_error(
                    &config,
                    &endpoints,
                    "authenticate for",
                    &prefix,
                    &e,
                )
                .await)
            }
            Err(_) => {
                return Err(unreachable(format!(
                    "no connection within {:?}",
                    config.connect_timeout
                )))
            }
        };
        let inner = Arc::new(Inner {
            client,
            endpoints: endpoints.clone(),
            prefix: prefix.clone(),
            requests: AtomicU64::new(0),
            keepalive_requests: AtomicU64::new(0),
            plan_rev: Mutex::new(None),
            token_renewals: AtomicU64::new(0),
            renew_lock: tokio::sync::Mutex::new(()),
            config,
        });
        // The client connects lazily: one read proves that etcd answers.
        let gen_key = inner.key(GEN_KEY);
        inner.requests.fetch_add(1, Ordering::Relaxed);
        let mut kv = inner.client.kv_client();
        let probe = tokio::time::timeout(
            inner.config.connect_timeout,
            kv.get(gen_key.clone(), Some(GetOptions::new().with_count_only())),
        )
        .await;
        match probe {
            Ok(Ok(_)) => Ok(EtcdMembership { inner }),
            Ok(Err(e)) => {
                Err(first_contact_error(&inner.config, &endpoints, "get", &gen_key, &e).await)
            }
            Err(_) => Err(unreachable(format!(
                "no answer within {:?}",
                inner.config.connect_timeout
            ))),
        }
    }

    /// The settings.
    pub fn config(&self) -> &EtcdConfig {
        &self.inner.config
    }

    /// The key prefix of the job, `/tenax/<job>/`.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// Requests sent to etcd so far by this driver and its clones (every attempt of every
    /// call, keep-alives, watch and campaign requests).
    pub fn requests(&self) -> u64 {
        self.inner.requests.load(Ordering::Relaxed)
    }

    /// The part of [`EtcdMembership::requests`] that were lease keep-alives (refreshes of
    /// a lease: they write nothing and change no revision).
    pub fn keepalive_requests(&self) -> u64 {
        self.inner.keepalive_requests.load(Ordering::Relaxed)
    }

    /// How many times the auth token was renewed after etcd refused it (an etcd restart,
    /// or a token unused for etcd's `--auth-token-ttl`); 0 without a user.
    pub fn token_renewals(&self) -> u64 {
        self.inner.token_renewals.load(Ordering::SeqCst)
    }

    /// Registers `member_id`: grants a lease of [`EtcdConfig::lease_ttl_s`], puts
    /// `/tenax/<job>/members/<member_id>` = `info` under it, and starts a task that
    /// refreshes the lease every third of its TTL. Registering an id again replaces the
    /// previous registration's key (which fences the previous holder out).
    ///
    /// # Errors
    /// [`EtcdError::InvalidArgument`] for an id with `/` or control characters; the
    /// errors of a call otherwise (the lease is revoked if the put fails).
    pub async fn register(&self, member_id: &str, info: &[u8]) -> Result<Registration, EtcdError> {
        check_id("register", member_id)?;
        let inner = &self.inner;
        let key = inner.member_key(member_id);
        let ttl = inner.config.lease_ttl_s;
        let grant = inner
            .call("lease grant for", &key, |mut c| async move {
                c.lease_grant(ttl, None).await
            })
            .await?;
        let lease = grant.id();
        let ttl_s = grant.ttl().max(ttl);
        let put = inner
            .call("put", &key, |mut c| {
                let key = key.clone();
                let info = info.to_vec();
                async move {
                    c.put(key, info, Some(PutOptions::new().with_lease(lease)))
                        .await
                }
            })
            .await;
        if let Err(e) = put {
            // Best effort: the lease would expire anyway after its TTL.
            let _ = self.revoke_lease(lease).await;
            return Err(e);
        }
        let writer = Writer {
            member_id: member_id.to_string(),
            lease,
        };
        let paused = Arc::new(AtomicBool::new(false));
        let (state_tx, state_rx) = watch::channel(LeaseState::Alive);
        let state_tx = Arc::new(state_tx);
        let period = Duration::from_millis((ttl_s as u64) * 1000 / 3).max(MIN_KEEPALIVE_PERIOD);
        let task = tokio::spawn(keepalive_task(
            self.inner.clone(),
            writer.clone(),
            period,
            paused.clone(),
            state_tx.clone(),
        ));
        Ok(Registration {
            membership: self.clone(),
            writer,
            ttl_s,
            paused,
            state_tx,
            state_rx,
            task: Some(task),
        })
    }

    /// Every registered member, sorted by id.
    ///
    /// # Errors
    /// The errors of a call.
    pub async fn members(&self) -> Result<Vec<Member>, EtcdError> {
        let inner = &self.inner;
        let prefix = inner.member_key("");
        let resp = inner
            .call("get", &prefix, |mut c| {
                let prefix = prefix.clone();
                async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        inner.parse_members("get", resp.kvs())
    }

    /// Revokes `lease` at once (the leader evicting a confirmed-dead member, or a member
    /// leaving): every key under it is deleted, its election key included. Returns
    /// whether the lease still existed.
    ///
    /// # Errors
    /// The errors of a call; a lease already gone is `Ok(false)`.
    pub async fn revoke_lease(&self, lease: i64) -> Result<bool, EtcdError> {
        let label = format!("{lease:#x}");
        let result = self
            .inner
            .call("revoke lease", &label, |mut c| async move {
                c.lease_revoke(lease).await
            })
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(e) if e.is_lease_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Campaigns for leadership of the job (etcd election `/tenax/<job>/leader`, value
    /// the member id, the election key under the writer's lease). Resolves when this
    /// member leads, or with `Ok(None)` when it does not lead within `max_wait` (the
    /// candidacy is then withdrawn: call again to keep waiting). Run it in its own task
    /// so that a non-leader waits without blocking anything else.
    ///
    /// # Errors
    /// [`EtcdError::LeaseLost`] when the writer's lease is gone; the errors of a call
    /// when etcd stays unreachable.
    pub async fn campaign(
        &self,
        writer: &Writer,
        max_wait: Duration,
    ) -> Result<Option<Leadership>, EtcdError> {
        let inner = &self.inner;
        let name = inner.election_name();
        let deadline = tokio::time::Instant::now() + max_wait;
        let mut last_error = String::new();
        let mut attempts = 0;
        while attempts <= inner.config.max_retries {
            if attempts > 0 {
                let pause = inner.backoff(attempts);
                if tokio::time::Instant::now() + pause >= deadline {
                    return Ok(None);
                }
                tokio::time::sleep(pause).await;
            }
            attempts += 1;
            inner.requests.fetch_add(1, Ordering::Relaxed);
            let seen = inner.token_renewals.load(Ordering::SeqCst);
            let mut election = inner.client.election_client();
            let campaign = election.campaign(name.clone(), writer.member_id.clone(), writer.lease);
            let mut resp = match tokio::time::timeout_at(deadline, campaign).await {
                // Dropping the request cancels it: etcd withdraws the candidacy.
                Err(_) => return Ok(None),
                Ok(Ok(resp)) => resp,
                Ok(Err(e)) if lease_not_found(&e) => return Err(inner.lease_lost(writer)),
                Ok(Err(e)) if inner.token_expired(&e) => {
                    last_error = e.to_string();
                    inner.renew_token(seen, "campaign on", &name).await?;
                    continue;
                }
                Ok(Err(e)) if is_transient(&e) => {
                    last_error = e.to_string();
                    continue;
                }
                Ok(Err(e)) => return Err(inner.refused("campaign on", &name, e)),
            };
            let key = resp.take_leader().ok_or_else(|| {
                inner.protocol("campaign on", &name, "no leader key in the answer")
            })?;
            // etcd resolves a campaign whose own key vanished meanwhile (lease expired):
            // check that the key still exists under our lease.
            let key_str = String::from_utf8_lossy(key.key()).into_owned();
            let check = inner
                .call("get", &key_str, |mut c| {
                    let k = key.key().to_vec();
                    async move { c.get(k, None).await }
                })
                .await?;
            let ours = check
                .kvs()
                .first()
                .is_some_and(|kv| kv.lease() == writer.lease && kv.create_revision() == key.rev());
            if !ours {
                return Err(inner.lease_lost(writer));
            }
            return Ok(Some(Leadership {
                info: LeaderInfo {
                    member_id: writer.member_id.clone(),
                    lease: key.lease(),
                    create_revision: key.rev(),
                },
                key,
            }));
        }
        Err(EtcdError::Unreachable {
            endpoints: inner.endpoints.clone(),
            what: "campaign on",
            key: name,
            attempts,
            last_error,
        })
    }

    /// The current leader, if any: the election key with the lowest create revision
    /// (what etcd's own `Leader` call returns), read in one request.
    ///
    /// # Errors
    /// The errors of a call.
    pub async fn leader(&self) -> Result<Option<LeaderInfo>, EtcdError> {
        let inner = &self.inner;
        let prefix = format!("{}/", inner.election_name());
        let resp = inner
            .call("get", &prefix, |mut c| {
                let prefix = prefix.clone();
                async move {
                    let opts = GetOptions::new()
                        .with_prefix()
                        .with_sort(SortTarget::Create, SortOrder::Ascend)
                        .with_limit(1);
                    c.get(prefix, Some(opts)).await
                }
            })
            .await?;
        Ok(resp.kvs().first().map(|kv| LeaderInfo {
            member_id: String::from_utf8_lossy(kv.value()).into_owned(),
            lease: kv.lease(),
            create_revision: kv.create_revision(),
        }))
    }

    /// Gives up `leadership` (deletes its election key, so the next candidate leads).
    /// Leadership already lost is not an error.
    ///
    /// # Errors
    /// The errors of a call.
    pub async fn resign(&self, leadership: Leadership) -> Result<(), EtcdError> {
        let inner = &self.inner;
        let name = inner.election_name();
        let result = inner
            .call("resign from", &name, |mut c| {
                let key = leadership.key.clone();
                async move { c.resign(Some(ResignOptions::new().with_leader(key))).await }
            })
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(EtcdError::Rejected { source, .. })
                if source.to_string().contains("not leader") =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Reads the plan at `/tenax/<job>/gen`.
    ///
    /// # Errors
    /// [`EtcdError::Protocol`] when the value is not a plan envelope; the errors of a
    /// call otherwise.
    pub async fn read_plan(&self) -> Result<Option<PlanRecord>, EtcdError> {
        let inner = &self.inner;
        let key = inner.key(GEN_KEY);
        let resp = inner
            .call("get", &key, |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        let record = match resp.kvs().first() {
            Some(kv) => Some(inner.decode_plan("get", kv)?),
            None => None,
        };
        if let Some(r) = &record {
            inner.note_plan(r.generation, r.mod_revision);
        }
        Ok(record)
    }

    /// The value at `/tenax/<job>/<key_suffix>`, if any (one read, no write).
    ///
    /// # Errors
    /// The errors of a call.
    pub async fn get(&self, key_suffix: &str) -> Result<Option<Vec<u8>>, EtcdError> {
        let inner = &self.inner;
        let key = inner.key(key_suffix);
        let resp = inner
            .call("get", &key, |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    /// Every value `/tenax/<job>/<key_suffix>` has held, oldest first, each with the etcd
    /// revision that wrote it: read back one version at a time (`get` at the revision
    /// before each write), at most `max_versions`. The chain stops at a delete or at a
    /// compacted revision. The chaos harness reads the plan and checkpoint-record history
    /// this way to check what etcd accepted, in etcd's own order.
    ///
    /// # Errors
    /// The errors of a call (a compacted revision ends the history instead).
    pub async fn key_history(
        &self,
        key_suffix: &str,
        max_versions: usize,
    ) -> Result<Vec<KeyVersion>, EtcdError> {
        let inner = &self.inner;
        let key = inner.key(key_suffix);
        let mut versions = Vec::new();
        let mut at: Option<i64> = None;
        while versions.len() < max_versions {
            let resp = inner
                .call("get", &key, |mut c| {
                    let key = key.clone();
                    async move {
                        let opts = at.map(|r| GetOptions::new().with_revision(r));
                        c.get(key, opts).await
                    }
                })
                .await;
            let resp = match resp {
                Ok(r) => r,
                // A compacted revision: the older history is gone.
                Err(e) if at.is_some() && e.to_string().contains("compacted") => break,
                Err(e) => return Err(e),
            };
            let Some(kv) = resp.kvs().first() else { break };
            versions.push(KeyVersion {
                revision: kv.mod_revision(),
                value: kv.value().to_vec(),
            });
            if kv.version() <= 1 {
                break;
            }
            at = Some(kv.mod_revision() - 1);
        }
        versions.reverse();
        Ok(versions)
    }

    /// Every plan the job's `gen` key has held, oldest first (see [`Self::key_history`]).
    ///
    /// # Errors
    /// The errors of a call, or a value that is not a plan envelope.
    pub async fn plan_history(&self, max_versions: usize) -> Result<Vec<PlanRecord>, EtcdError> {
        let versions = self.key_history(GEN_KEY, max_versions).await?;
        let key = self.inner.key(GEN_KEY);
        versions
            .into_iter()
            .map(|v| {
                let (generation, plan) = records::decode_plan_envelope(&v.value)
                    .map_err(|e| self.inner.protocol("plan_history", &key, &e.to_string()))?;
                Ok(PlanRecord {
                    generation,
                    plan,
                    mod_revision: v.revision,
                })
            })
            .collect()
    }

    /// Puts `value` at `/tenax/<job>/<key_suffix>` unless the key exists (one txn on its
    /// create revision); returns the value stored afterwards: `value` itself when this
    /// call (or an earlier attempt of it) wrote it, the existing value otherwise. Used for
    /// facts the first node of a job fixes for all, such as the training-config hash.
    ///
    /// # Errors
    /// The errors of a call.
    pub async fn put_if_absent(
        &self,
        key_suffix: &str,
        value: &[u8],
    ) -> Result<Vec<u8>, EtcdError> {
        let inner = &self.inner;
        let key = inner.key(key_suffix);
        let resp = inner
            .call("txn", &key, |mut c| {
                let key = key.clone();
                let value = value.to_vec();
                async move {
                    let txn = Txn::new()
                        .when(vec![Compare::create_revision(
                            key.clone(),
                            CompareOp::Equal,
                            0,
                        )])
                        .and_then(vec![TxnOp::put(key.clone(), value, None)])
                        .or_else(vec![TxnOp::get(key, None)]);
                    c.txn(txn).await
                }
            })
            .await?;
        if resp.succeeded() {
            return Ok(value.to_vec());
        }
        for op in resp.op_responses() {
            if let TxnOpResponse::Get(g) = op {
                if let Some(kv) = g.kvs().first() {
                    return Ok(kv.value().to_vec());
                }
            }
        }
        Ok(value.to_vec())
    }

    /// Writes the plan of `generation` in ONE txn: it succeeds only if the stored
    /// generation is `expected_prev_generation` (`None`: no plan stored yet) and the
    /// writer's member key exists under the writer's lease. `plan` must be JSON (the
    /// caller serialises it); it is stored with the generation in one value,
    /// `{"generation":N,"plan":<plan>}`.
    ///
    /// A retry after an ambiguous failure (a timeout after the txn was applied) that
    /// finds exactly this plan stored at this generation reports `Written`.
    ///
    /// # Errors
    /// [`EtcdError::InvalidArgument`] when `generation` does not grow or `plan` is not
    /// JSON; [`EtcdError::LeaseLost`] when the writer's lease is gone; the errors of a
    /// call otherwise.
    pub async fn write_plan(
        &self,
        expected_prev_generation: Option<u64>,
        generation: u64,
        plan: &[u8],
        writer: &Writer,
    ) -> Result<WriteOutcome, EtcdError> {
        let inner = &self.inner;
        if let Some(prev) = expected_prev_generation {
            if generation <= prev {
                return Err(EtcdError::InvalidArgument {
                    what: "write_plan",
                    detail: format!(
                        "generation {generation} does not grow past the previous one, {prev}"
                    ),
                });
            }
        }
        if let Err(e) = serde_json::from_slice::<serde_json::Value>(plan) {
            return Err(EtcdError::InvalidArgument {
                what: "write_plan",
                detail: format!(
                    "the plan of generation {generation} is not JSON ({e}); serialise it with \
                     serde_json"
                ),
            });
        }
        check_id("write_plan", &writer.member_id)?;
        let gen_key = inner.key(GEN_KEY);
        let member_key = inner.member_key(&writer.member_id);
        let envelope = records::encode_plan_envelope(generation, plan);
        for _ in 0..FENCE_ROUNDS {
            let gen_cmp = match expected_prev_generation {
                None => Compare::version(gen_key.clone(), CompareOp::Equal, 0),
                Some(prev) => match inner.cached_plan_rev(prev) {
                    Some(rev) => Compare::mod_revision(gen_key.clone(), CompareOp::Equal, rev),
                    None => match self.read_plan().await? {
                        Some(r) if r.generation == prev => {
                            Compare::mod_revision(gen_key.clone(), CompareOp::Equal, r.mod_revision)
                        }
                        // The same plan, stored by an earlier attempt of ours.
                        Some(r) if r.generation == generation && r.plan == plan => {
                            return Ok(WriteOutcome::Written {
                                revision: r.mod_revision,
                            })
                        }
                        other => {
                            return Ok(WriteOutcome::Conflict {
                                current_generation: other.map(|r| r.generation),
                            })
                        }
                    },
                },
            };
            let txn = Txn::new()
                .when(vec![
                    gen_cmp,
                    Compare::lease(member_key.clone(), CompareOp::Equal, writer.lease),
                ])
                .and_then(vec![TxnOp::put(gen_key.clone(), envelope.clone(), None)])
                .or_else(vec![
                    TxnOp::get(gen_key.clone(), None),
                    TxnOp::get(member_key.clone(), None),
                ]);
            let resp = inner.txn("write plan txn on", &gen_key, txn).await?;
            if resp.succeeded() {
                let revision = inner.header_revision("write plan txn on", &gen_key, &resp)?;
                inner.note_plan(generation, revision);
                return Ok(WriteOutcome::Written { revision });
            }
            let (current, member) = inner.else_gets("write plan txn on", &gen_key, &resp)?;
            let current = match current {
                Some(kv) => Some(inner.decode_plan("write plan txn on", &kv)?),
                None => None,
            };
            if let Some(r) = &current {
                inner.note_plan(r.generation, r.mod_revision);
                if r.generation == generation && r.plan == plan {
                    return Ok(WriteOutcome::Written {
                        revision: r.mod_revision,
                    });
                }
            }
            if member.as_ref().map(KeyValue::lease) != Some(writer.lease) {
                return Err(inner.lease_lost(writer));
            }
            let current_generation = current.as_ref().map(|r| r.generation);
            if current_generation != expected_prev_generation {
                return Ok(WriteOutcome::Conflict { current_generation });
            }
            // The generation is the expected one but under another revision than we
            // compared (a stale cache): compare again with the revision just read.
        }
        Err(inner.protocol(
            "write plan txn on",
            &gen_key,
            &format!("the txn failed {FENCE_ROUNDS} times although the generation matched"),
        ))
    }

    /// Puts `value` at `/tenax/<job>/<key_suffix>` in ONE txn that succeeds only if the
    /// current plan's generation is `generation` (the `gen` key's `mod_revision` equals
    /// the revision that wrote that generation) and the writer's member key exists under
    /// the writer's lease. For checkpoint commit records (`commits/<...>`) and every other
    /// commit of a generation.
    ///
    /// # Errors
    /// [`EtcdError::InvalidArgument`] for a reserved suffix (`gen`, `members/...`,
    /// `leader...`) or an empty one; the errors of a call otherwise.
    pub async fn fenced_put(
        &self,
        key_suffix: &str,
        value: &[u8],
        generation: u64,
        writer: &Writer,
    ) -> Result<FenceOutcome, EtcdError> {
        let inner = &self.inner;
        check_suffix(key_suffix)?;
        check_id("fenced_put", &writer.member_id)?;
        let gen_key = inner.key(GEN_KEY);
        let member_key = inner.member_key(&writer.member_id);
        let key = inner.key(key_suffix);
        for _ in 0..FENCE_ROUNDS {
            let gen_rev = match inner.cached_plan_rev(generation) {
                Some(rev) => rev,
                None => match self.read_plan().await? {
                    None => {
                        return Ok(FenceOutcome::Refused {
                            reason: FenceRefusal::NoPlan,
                        })
                    }
                    Some(r) if r.generation != generation => {
                        return Ok(FenceOutcome::Refused {
                            reason: FenceRefusal::StaleGeneration {
                                writer: generation,
                                current: r.generation,
                            },
                        })
                    }
                    Some(r) => r.mod_revision,
                },
            };
            let txn = Txn::new()
                .when(vec![
                    Compare::mod_revision(gen_key.clone(), CompareOp::Equal, gen_rev),
                    Compare::lease(member_key.clone(), CompareOp::Equal, writer.lease),
                ])
                .and_then(vec![TxnOp::put(key.clone(), value.to_vec(), None)])
                .or_else(vec![
                    TxnOp::get(gen_key.clone(), None),
                    TxnOp::get(member_key.clone(), None),
                ]);
            let resp = inner.txn("fenced put txn on", &key, txn).await?;
            if resp.succeeded() {
                let revision = inner.header_revision("fenced put txn on", &key, &resp)?;
                return Ok(FenceOutcome::Committed { revision });
            }
            let (current, member) = inner.else_gets("fenced put txn on", &key, &resp)?;
            let current_lease = member.as_ref().map(KeyValue::lease);
            if current_lease != Some(writer.lease) {
                return Ok(FenceOutcome::Refused {
                    reason: FenceRefusal::WriterLeaseGone {
                        member_id: writer.member_id.clone(),
                        lease: writer.lease,
                        current_lease,
                    },
                });
            }
            let Some(kv) = current else {
                return Ok(FenceOutcome::Refused {
                    reason: FenceRefusal::NoPlan,
                });
            };
            let r = inner.decode_plan("fenced put txn on", &kv)?;
            inner.note_plan(r.generation, r.mod_revision);
            if r.generation != generation {
                return Ok(FenceOutcome::Refused {
                    reason: FenceRefusal::StaleGeneration {
                        writer: generation,
                        current: r.generation,
                    },
                });
            }
            // Same generation under another revision than we compared (a stale cache):
            // compare again with the revision just read.
        }
        Err(inner.protocol(
            "fenced put txn on",
            &key,
            &format!("the txn failed {FENCE_ROUNDS} times although the generation matched"),
        ))
    }

    /// Watches the plan from now on: the current plan (if any) is delivered first, then
    /// every new one. A value that is not a plan envelope is skipped with a warning. See
    /// [`PlanWatch`].
    pub async fn watch_plan(&self) -> PlanWatch {
        self.watch_plan_from(None).await
    }

    /// Watches the plan after `cursor` (`None`: from the current plan, delivered first):
    /// delivers every plan written after the cursor's revision whose generation is above
    /// the cursor's. A cursor whose revision was compacted resumes from the current plan.
    pub async fn watch_plan_from(&self, cursor: Option<PlanCursor>) -> PlanWatch {
        let source = PlanSource {
            key: self.inner.key(GEN_KEY),
            delivered: cursor.map(|c| c.generation),
        };
        self.start_watch(source, cursor.map(|c| c.revision + 1))
    }

    /// Watches every member key of the job: a [`MemberEvent::Snapshot`] of the registered
    /// members first, then every registration and deletion. See [`MemberWatch`].
    pub fn watch_members(&self) -> MemberWatch {
        self.start_member_watch(self.inner.member_key(""), true)
    }

    /// Watches the member key of `member_id` alone (a member watching its own
    /// registration): a snapshot (zero or one member) first, then its puts and deletes.
    ///
    /// # Errors
    /// [`EtcdError::InvalidArgument`] for an id with `/` or control characters.
    pub fn watch_member(&self, member_id: &str) -> Result<MemberWatch, EtcdError> {
        check_id("watch_member", member_id)?;
        Ok(self.start_member_watch(self.inner.member_key(member_id), false))
    }

    /// Watches the suspicion reports of the job (the leader hearing its followers): a
    /// [`SuspectEvent::Synced`] once the prefix `/tenax/<job>/suspects/` is read, then a
    /// [`SuspectEvent::Report`] for every report put after that read. Like every watch
    /// it resumes from its revision after a break and gives up after
    /// [`EtcdConfig::give_up_after`] without a working connection. See [`SuspectWatch`].
    pub fn watch_suspects(&self) -> SuspectWatch {
        let source = SuspectSource {
            key: self.inner.suspects_prefix(),
        };
        self.start_watch(source, None)
    }

    /// Reports that the writer suspects `suspect`: puts
    /// `/tenax/<job>/suspects/<suspect>/<writer id>` =
    /// `{"reporter":<writer id>,"reason":<reason>,"at_ms":<at_ms>}` under the WRITER's
    /// lease, so that the report vanishes with its reporter. A report replaces the same
    /// reporter's earlier report of the same suspect. The leader hears it through
    /// [`EtcdMembership::watch_suspects`]. `reason` is cut to
    /// [`MAX_REPORT_REASON_BYTES`]; `at_ms` is the reporter's wall clock (ms since the
    /// Unix epoch). Returns the revision of the put.
    ///
    /// # Errors
    /// [`EtcdError::InvalidArgument`] for an id with `/` or control characters;
    /// [`EtcdError::LeaseLost`] when the writer's lease is gone; the errors of a call.
    pub async fn report_suspect(
        &self,
        writer: &Writer,
        suspect: &str,
        reason: &str,
        at_ms: u64,
    ) -> Result<i64, EtcdError> {
        check_id("report_suspect", suspect)?;
        check_id("report_suspect", &writer.member_id)?;
        let inner = &self.inner;
        let key = inner.key(&records::suspect_key(suspect, &writer.member_id));
        let mut cut = reason.len().min(MAX_REPORT_REASON_BYTES);
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        let value = records::encode_suspect_report(&SuspectRecord {
            reporter: writer.member_id.clone(),
            reason: reason[..cut].to_string(),
            at_ms,
        });
        let lease = writer.lease;
        let result = inner
            .call("put", &key, |mut c| {
                let key = key.clone();
                let value = value.clone();
                async move {
                    c.put(key, value, Some(PutOptions::new().with_lease(lease)))
                        .await
                }
            })
            .await;
        match result {
            Ok(resp) => Ok(resp.header().map_or(0, |h| h.revision())),
            Err(e) if e.is_lease_not_found() => Err(inner.lease_lost(writer)),
            Err(e) => Err(e),
        }
    }

    fn start_member_watch(&self, key: String, prefix: bool) -> MemberWatch {
        self.start_watch(MemberSource { key, prefix }, None)
    }

    /// Starts the background task of a resumable watch of `source`, from `next_rev`
    /// (`None`: read the key or range first).
    fn start_watch<S: WatchSource>(&self, source: S, next_rev: Option<i64>) -> KeyWatch<S::Item> {
        let (tx, rx) = mpsc::channel(self.inner.config.watch_buffer);
        let (status_tx, status) = watch::channel(WatchStatus::Connecting);
        let reconnects = Arc::new(AtomicU64::new(0));
        let resyncs = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(watch_task(
            self.inner.clone(),
            source,
            next_rev,
            tx,
            status_tx,
            reconnects.clone(),
            resyncs.clone(),
        ));
        KeyWatch {
            rx,
            status,
            reconnects,
            resyncs,
            task,
        }
    }
}

impl Inner {
    /// The member (id, info, lease) of one key under `members/`.
    fn parse_member(&self, what: &'static str, kv: &KeyValue) -> Result<Member, EtcdError> {
        let prefix = self.member_key("");
        let id = kv
            .key()
            .strip_prefix(prefix.as_bytes())
            .and_then(|id| std::str::from_utf8(id).ok())
            .ok_or_else(|| self.protocol(what, &prefix, "a member key is not UTF-8"))?;
        Ok(Member {
            id: id.to_string(),
            info: kv.value().to_vec(),
            lease: kv.lease(),
        })
    }

    /// The members of a range read, sorted by id.
    fn parse_members(
        &self,
        what: &'static str,
        kvs: &[KeyValue],
    ) -> Result<Vec<Member>, EtcdError> {
        let mut members = kvs
            .iter()
            .map(|kv| self.parse_member(what, kv))
            .collect::<Result<Vec<_>, _>>()?;
        members.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(members)
    }

    /// `/tenax/<job>/<suffix>`.
    fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    /// `/tenax/<job>/members/<id>`.
    fn member_key(&self, id: &str) -> String {
        self.key(&records::member_key(id))
    }

    /// `/tenax/<job>/suspects/`: the prefix of the suspicion reports.
    fn suspects_prefix(&self) -> String {
        self.key(SUSPECTS_PREFIX)
    }

    /// `/tenax/<job>/leader`: the election name (its keys are `<name>/<lease hex>`).
    fn election_name(&self) -> String {
        self.key(LEADER_PREFIX)
    }

    /// The backoff before retry number `attempt` (1-based): `backoff_initial * 2^(n-1)`,
    /// capped at `backoff_max`, then scaled by a random factor in [0.5, 1].
    fn backoff(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(20);
        let base = self
            .config
            .backoff_initial
            .saturating_mul(1u32 << exp)
            .min(self.config.backoff_max);
        let jitter = RandomState::new().hash_one(attempt) % 1000;
        base.mul_f64(0.5 + jitter as f64 / 2000.0)
    }

    /// Runs one etcd request with a timeout per attempt and bounded retries of transient
    /// failures. `op` gets a clone of the client for each attempt.
    async fn call<T, F, Fut>(
        &self,
        what: &'static str,
        key: &str,
        mut op: F,
    ) -> Result<T, EtcdError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut last_error = String::new();
        let mut timeouts = 0;
        let attempts = self.config.max_retries + 1;
        for attempt in 0..attempts {
            if attempt > 0 {
                tokio::time::sleep(self.backoff(attempt)).await;
            }
            self.requests.fetch_add(1, Ordering::Relaxed);
            let seen = self.token_renewals.load(Ordering::SeqCst);
            match tokio::time::timeout(self.config.op_timeout, op(self.client.clone())).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) if self.token_expired(&e) => {
                    last_error = e.to_string();
                    self.renew_token(seen, what, key).await?;
                }
                Ok(Err(e)) if is_transient(&e) => last_error = e.to_string(),
                Ok(Err(e)) => return Err(self.refused(what, key, e)),
                Err(_) => {
                    timeouts += 1;
                    last_error = format!("no answer within {:?}", self.config.op_timeout);
                }
            }
            tracing::debug!(what, key, attempt, error = %last_error, "etcd request failed; retrying");
        }
        if timeouts == attempts {
            Err(EtcdError::Timeout {
                endpoints: self.endpoints.clone(),
                what,
                key: key.to_string(),
                timeout: self.config.op_timeout,
                attempts,
            })
        } else {
            Err(EtcdError::Unreachable {
                endpoints: self.endpoints.clone(),
                what,
                key: key.to_string(),
                attempts,
                last_error,
            })
        }
    }

    /// Runs `txn` through [`Inner::call`].
    async fn txn(&self, what: &'static str, key: &str, txn: Txn) -> Result<TxnResponse, EtcdError> {
        self.call(what, key, |mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await
    }

    /// The revision in a txn answer's header.
    fn header_revision(
        &self,
        what: &'static str,
        key: &str,
        resp: &TxnResponse,
    ) -> Result<i64, EtcdError> {
        resp.header()
            .map(|h| h.revision())
            .ok_or_else(|| self.protocol(what, key, "no header in the txn answer"))
    }

    /// The two gets of a failed fence txn's `or_else`: the `gen` key and the member key.
    fn else_gets(
        &self,
        what: &'static str,
        key: &str,
        resp: &TxnResponse,
    ) -> Result<(Option<KeyValue>, Option<KeyValue>), EtcdError> {
        let responses = resp.op_responses();
        let first = |r: Option<&TxnOpResponse>| match r {
            Some(TxnOpResponse::Get(g)) => Ok(first_kv(g)),
            _ => Err(self.protocol(what, key, "the failed txn did not return its two reads")),
        };
        Ok((first(responses.first())?, first(responses.get(1))?))
    }

    /// Decodes the plan envelope of the `gen` key.
    fn decode_plan(&self, what: &'static str, kv: &KeyValue) -> Result<PlanRecord, EtcdError> {
        let key = String::from_utf8_lossy(kv.key());
        let (generation, plan) = records::decode_plan_envelope(kv.value())
            .map_err(|e| self.protocol(what, &key, &e.to_string()))?;
        Ok(PlanRecord {
            generation,
            plan,
            mod_revision: kv.mod_revision(),
        })
    }

    /// Remembers that `generation` was written at `mod_revision`, if it is the newest seen.
    fn note_plan(&self, generation: u64, mod_revision: i64) {
        let mut cache = self.plan_rev.lock().unwrap_or_else(|p| p.into_inner());
        if cache.is_none_or(|c| mod_revision >= c.revision) {
            *cache = Some(PlanCursor {
                generation,
                revision: mod_revision,
            });
        }
    }

    /// The cached revision of `generation`, if it is the newest seen.
    fn cached_plan_rev(&self, generation: u64) -> Option<i64> {
        let cache = self.plan_rev.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .filter(|c| c.generation == generation)
            .map(|c| c.revision)
    }

    /// Whether etcd refused the auth token this driver sent (expired, or lost by an etcd
    /// restart): then [`Inner::renew_token`] and send again. Only with a user: without
    /// one no token is sent, and the refusal is [`Inner::refused`]'s.
    fn token_expired(&self, e: &etcd_client::Error) -> bool {
        self.config.auth.is_some() && is_token_refusal(e)
    }

    /// Authenticates again and installs the new token for every task of the driver,
    /// unless another task renewed it since `seen` (the value of
    /// [`Inner::token_renewals`] read before the refused request was sent). One
    /// `Authenticate` request with [`EtcdConfig::op_timeout`].
    ///
    /// # Errors
    /// [`EtcdError::Auth`] when etcd refuses the user or password now (never retried);
    /// a transient failure (etcd still restarting) is logged and left to the caller's
    /// next attempt, which is refused again and renews again, within its retry bound.
    async fn renew_token(&self, seen: u64, what: &'static str, key: &str) -> Result<(), EtcdError> {
        let _guard = self.renew_lock.lock().await;
        if self.token_renewals.load(Ordering::SeqCst) != seen {
            return Ok(());
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        let user = self.config.auth.as_ref().map_or("", |a| a.user.as_str());
        match tokio::time::timeout(self.config.op_timeout, self.client.refresh_token()).await {
            Ok(Ok(())) => {
                self.token_renewals.fetch_add(1, Ordering::SeqCst);
                tracing::info!(endpoints = %self.endpoints, user, what, key, "etcd refused the auth token (expired, or etcd restarted); authenticated again");
                Ok(())
            }
            Ok(Err(e)) => match credentials_refused(&self.config, &self.endpoints, what, key, &e) {
                Some(refused) => Err(refused),
                None => {
                    tracing::debug!(endpoints = %self.endpoints, user, error = %e, "renewing the etcd auth token failed; the next attempt tries again");
                    Ok(())
                }
            },
            Err(_) => {
                tracing::debug!(endpoints = %self.endpoints, user, "renewing the etcd auth token got no answer; the next attempt tries again");
                Ok(())
            }
        }
    }

    /// A refusal that a retry does not fix: [`EtcdError::Auth`] for refused credentials
    /// or permissions, [`EtcdError::Rejected`] otherwise.
    fn refused(&self, what: &'static str, key: &str, source: etcd_client::Error) -> EtcdError {
        credentials_refused(&self.config, &self.endpoints, what, key, &source)
            .unwrap_or_else(|| self.rejected(what, key, source))
    }

    fn rejected(&self, what: &'static str, key: &str, source: etcd_client::Error) -> EtcdError {
        EtcdError::Rejected {
            endpoints: self.endpoints.clone(),
            what,
            key: key.to_string(),
            source,
        }
    }

    fn protocol(&self, what: &'static str, key: &str, detail: &str) -> EtcdError {
        EtcdError::Protocol {
            endpoints: self.endpoints.clone(),
            what,
            key: key.to_string(),
            detail: detail.to_string(),
        }
    }

    fn lease_lost(&self, writer: &Writer) -> EtcdError {
        EtcdError::LeaseLost {
            endpoints: self.endpoints.clone(),
            member_id: writer.member_id.clone(),
            lease: writer.lease,
        }
    }
}

/// The first key-value of a get answer.
fn first_kv(resp: &GetResponse) -> Option<KeyValue> {
    resp.kvs().first().cloned()
}

/// Whether a failure may pass on a retry: etcd down or restarting, no leader, a timeout,
/// a broken connection.
fn is_transient(e: &etcd_client::Error) -> bool {
    use etcd_client::Error as E;
    use tonic::Code;
    match e {
        E::TransportError(_) | E::IoError(_) | E::WatchError(_) => true,
        E::LeaseKeepAliveError(msg) => !msg.contains("not found"),
        E::GRpcStatus(s) => match s.code() {
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::ResourceExhausted => true,
            // The auth store changed between the token check and the apply.
            Code::InvalidArgument => s.message().contains("revision of auth store is old"),
            Code::Unknown | Code::Internal | Code::Cancelled => {
                let m = s.message().to_ascii_lowercase();
                [
                    "transport",
                    "connection",
                    "broken pipe",
                    "reset",
                    "h2 protocol",
                    "connect",
                ]
                .iter()
                .any(|w| m.contains(w))
            }
            _ => false,
        },
        _ => false,
    }
}

/// Whether etcd refused the auth token of a request: `Unauthenticated` (any unary call),
/// or the message kept by the services etcd runs on its own in-process client (election:
/// code `Unknown`).
fn is_token_refusal(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::Unauthenticated || s.message().contains("invalid auth token")
        }
        _ => false,
    }
}

/// The error for refused credentials or permissions (see [`EtcdError::Auth`]), if etcd's
/// answer `e` is one; `None` for any other failure.
fn credentials_refused(
    config: &EtcdConfig,
    endpoints: &str,
    what: &'static str,
    key: &str,
    e: &etcd_client::Error,
) -> Option<EtcdError> {
    let etcd_client::Error::GRpcStatus(s) = e else {
        return None;
    };
    let m = s.message();
    let job_keys = records::job_prefix(&config.job);
    let detail = if m.contains("authentication failed") {
        format!("wrong user name or password ({m}): check the user and its password")
    } else if m.contains("authentication is not enabled") {
        format!("{m}: this etcd has no users; give no user, or enable authentication in etcd")
    } else if m.contains("user name is empty") || m.contains("user name not found") {
        format!("{m}: this etcd requires authentication; give a user and its password")
    } else if (s.code() == tonic::Code::PermissionDenied || m.contains("permission denied"))
        && config.auth.is_none()
    {
        format!(
            "{m}: this etcd has authentication on; give a user and its password, with read \
             and write permission on every key under {job_keys}"
        )
    } else if s.code() == tonic::Code::PermissionDenied || m.contains("permission denied") {
        format!(
            "{m}: the user needs read and write permission on every key under {job_keys} \
             (etcdctl role grant-permission ROLE --prefix=true readwrite {job_keys})"
        )
    } else if config.auth.is_none() && s.code() == tonic::Code::Unauthenticated {
        format!("{m}: this etcd requires authentication; give a user and its password")
    } else {
        return None;
    };
    let who = match &config.auth {
        Some(a) => format!("user {:?}", a.user),
        None => "a client without a user".to_string(),
    };
    Some(EtcdError::Auth {
        endpoints: endpoints.to_string(),
        who,
        what,
        key: key.to_string(),
        detail,
    })
}

/// What a failed first contact (connect, authenticate, the probe read) means: refused
/// credentials, or a failed TLS handshake (neither is retried), or etcd unreachable.
///
/// The gRPC client often reports a refused client certificate as a mere broken
/// connection (TLS 1.3 tells the client after its handshake), so with TLS one more
/// handshake finds the reason ([`tls_failure`]).
async fn first_contact_error(
    config: &EtcdConfig,
    endpoints: &str,
    what: &'static str,
    key: &str,
    e: &etcd_client::Error,
) -> EtcdError {
    if let Some(refused) = credentials_refused(config, endpoints, what, key, e) {
        return refused;
    }
    let chain = error_chain(e);
    if let Some(tls) = &config.tls {
        let wait = config.connect_timeout.min(TLS_DIAGNOSIS_WAIT);
        let detail = match tls_failure(tls, &config.endpoints, wait).await {
            Some(reason) => Some(reason),
            None => looks_like_tls_failure(&chain).then(|| chain.clone()),
        };
        if let Some(detail) = detail {
            return EtcdError::Tls {
                endpoints: endpoints.to_string(),
                detail,
            };
        }
    }
    EtcdError::Unreachable {
        endpoints: endpoints.to_string(),
        what: "connect",
        key: records::job_prefix(&config.job),
        attempts: 1,
        last_error: chain,
    }
}

/// The error's text followed by its sources' (the TLS reason is often a source).
fn error_chain(e: &etcd_client::Error) -> String {
    use std::error::Error as _;
    let mut out = e.to_string();
    let mut next: Option<&(dyn std::error::Error + 'static)> = match e {
        etcd_client::Error::GRpcStatus(s) => s.source(),
        etcd_client::Error::TransportError(t) => t.source(),
        etcd_client::Error::IoError(io) => io.source(),
        _ => None,
    };
    while let Some(err) = next {
        let text = err.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = err.source();
    }
    out
}

/// How long [`tls_failure`] waits for etcd's verdict on the client certificate after the
/// handshake.
const TLS_DIAGNOSIS_WAIT: Duration = Duration::from_secs(2);

/// Why TLS with the first reachable `https://` endpoint fails, if it does: one handshake
/// with the driver's CA and client certificate, then a read of at most `wait` (etcd
/// refuses a missing or untrusted client certificate with an alert that a TLS 1.3 client
/// reads after its handshake). `None` when the handshake works and etcd says nothing
/// against it (the failure is elsewhere), or no endpoint answers TCP.
async fn tls_failure(tls: &EtcdTls, endpoints: &[String], wait: Duration) -> Option<String> {
    use tokio::io::AsyncRead;
    let config = match tls.rustls_config() {
        Ok(c) => Arc::new(c),
        Err(e) => return Some(e),
    };
    let connector = tokio_rustls::TlsConnector::from(config);
    for endpoint in endpoints {
        let Some(rest) = endpoint.strip_prefix("https://") else {
            continue;
        };
        let authority = rest.split('/').next().unwrap_or(rest);
        let host = match authority.rsplit_once(':') {
            Some((host, _port)) => host.trim_start_matches('[').trim_end_matches(']'),
            None => authority,
        };
        let Ok(name) = rustls_pki_types::ServerName::try_from(host.to_string()) else {
            continue;
        };
        let attempt = async {
            let tcp = tokio::net::TcpStream::connect(authority).await.ok()?;
            let mut stream = match connector.connect(name, tcp).await {
                Ok(s) => s,
                Err(e) => return Some(format!("{endpoint}: {e}")),
            };
            let mut byte = [0u8; 1];
            let read = std::future::poll_fn(|cx| {
                let mut buf = tokio::io::ReadBuf::new(&mut byte);
                std::pin::Pin::new(&mut stream)
                    .poll_read(cx, &mut buf)
                    .map_ok(|()| buf.filled().len())
            });
            match tokio::time::timeout(wait, read).await {
                Ok(Err(e)) => Some(format!("{endpoint}: {e}")),
                Ok(Ok(0)) => Some(format!(
                    "{endpoint}: etcd closed the connection right after the TLS handshake (it \
                     did not accept the client certificate)"
                )),
                // etcd sent data, or waits for the client: TLS is fine.
                Ok(Ok(_)) | Err(_) => None,
            }
        };
        // The TCP connect and the handshake are bounded too (a hung etcd says nothing).
        if let Ok(Some(reason)) = tokio::time::timeout(wait.saturating_mul(2), attempt).await {
            return Some(reason);
        }
    }
    None
}

/// Whether an error text is a TLS failure (handshake, certificate, alert).
fn looks_like_tls_failure(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    [
        "certificate",
        "handshake",
        "alert",
        "tls",
        "unknownissuer",
        "unknown issuer",
        "notvalidforname",
    ]
    .iter()
    .any(|w| lower.contains(w))
}

/// Whether etcd said a lease does not exist.
fn lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => s.message().contains("lease not found"),
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("not found"),
        _ => false,
    }
}

/// Member ids are one key segment: non-empty, no `/`, no control characters.
fn check_id(what: &'static str, id: &str) -> Result<(), EtcdError> {
    if id.is_empty() || id.contains('/') || id.chars().any(char::is_control) {
        return Err(EtcdError::InvalidArgument {
            what,
            detail: format!(
                "member id {id:?} is empty or has '/' or control characters; use one key segment"
            ),
        });
    }
    Ok(())
}

/// A fenced key suffix must not touch the keys the driver owns.
fn check_suffix(suffix: &str) -> Result<(), EtcdError> {
    if suffix.is_empty() || suffix.starts_with('/') || records::is_driver_key(suffix) {
        return Err(EtcdError::InvalidArgument {
            what: "fenced_put",
            detail: format!(
                "key suffix {suffix:?} is empty, starts with '/', or names a key the driver owns \
                 (gen, members/..., leader..., suspects/...); use e.g. commits/<step>"
            ),
        });
    }
    Ok(())
}

/// The lease keep-alive loop of one registration. Ends when the lease is gone, after
/// `give_up_after` without an answer, or when aborted (stop, revoke, drop).
async fn keepalive_task(
    inner: Arc<Inner>,
    writer: Writer,
    period: Duration,
    paused: Arc<AtomicBool>,
    state: Arc<watch::Sender<LeaseState>>,
) {
    let mut stream: Option<(LeaseKeeper, LeaseKeepAliveStream)> = None;
    let mut last_answer = Instant::now();
    let mut failed_refreshes = 0u32;
    // The lease was just granted: the first refresh is due one period from now.
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if paused.load(Ordering::SeqCst) {
            stream = None;
            continue;
        }
        match refresh(&inner, &writer, &mut stream).await {
            Refresh::Alive => {
                last_answer = Instant::now();
                failed_refreshes = 0;
                state.send_if_modified(|s| {
                    let changed = *s != LeaseState::Alive;
                    *s = LeaseState::Alive;
                    changed
                });
            }
            Refresh::Gone => {
                tracing::warn!(member = %writer.member_id, lease = writer.lease, "lease lost");
                state.send_replace(LeaseState::Lost {
                    reason: format!(
                        "etcd at {} says lease {:#x} of member {} does not exist (expired or \
                         revoked)",
                        inner.endpoints, writer.lease, writer.member_id
                    ),
                });
                return;
            }
            Refresh::Refused(reason) => {
                tracing::warn!(member = %writer.member_id, lease = writer.lease, %reason, "lease refresh refused");
                state.send_replace(LeaseState::Lost { reason });
                return;
            }
            Refresh::NoAnswer(error) => {
                failed_refreshes += 1;
                if last_answer.elapsed() >= inner.config.give_up_after {
                    state.send_replace(LeaseState::Lost {
                        reason: format!(
                            "no answer from etcd at {} for {:?} while refreshing lease {:#x} of \
                             member {} (last error: {error}); it has surely expired",
                            inner.endpoints,
                            inner.config.give_up_after,
                            writer.lease,
                            writer.member_id
                        ),
                    });
                    return;
                }
                tracing::debug!(member = %writer.member_id, %error, "lease refresh got no answer");
                state.send_replace(LeaseState::Unconfirmed { failed_refreshes });
            }
        }
    }
}

/// The result of one refresh.
enum Refresh {
    /// etcd answered with a positive TTL.
    Alive,
    /// etcd says the lease does not exist.
    Gone,
    /// etcd refused the credentials (see [`EtcdError::Auth`]): the lease cannot be kept.
    Refused(String),
    /// No answer after every retry.
    NoAnswer(String),
}

/// One lease refresh: a keep-alive on the open stream (opening one first if needed),
/// with a timeout per attempt and bounded retries. A refused auth token is renewed before
/// the next attempt, which opens a new stream.
async fn refresh(
    inner: &Inner,
    writer: &Writer,
    stream: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
) -> Refresh {
    let timeout = inner.config.op_timeout;
    let mut last_error = String::new();
    for attempt in 0..=inner.config.max_retries {
        if attempt > 0 {
            tokio::time::sleep(inner.backoff(attempt)).await;
        }
        inner.requests.fetch_add(1, Ordering::Relaxed);
        inner.keepalive_requests.fetch_add(1, Ordering::Relaxed);
        let seen = inner.token_renewals.load(Ordering::SeqCst);
        // An error etcd answered with, or the text of a failure without an answer.
        let failure: Result<etcd_client::Error, String> =
            if let Some((keeper, responses)) = stream.as_mut() {
                let exchange = async {
                    keeper.keep_alive().await?;
                    responses.message().await
                };
                let failure = match tokio::time::timeout(timeout, exchange).await {
                    Ok(Ok(Some(resp))) if resp.ttl() > 0 => return Refresh::Alive,
                    Ok(Ok(Some(_))) => return Refresh::Gone,
                    Ok(Ok(None)) => Err("keep-alive stream closed by etcd".to_string()),
                    Ok(Err(e)) => Ok(e),
                    Err(_) => Err(format!("no keep-alive answer within {timeout:?}")),
                };
                // A new stream next time (it carries the token it is opened with).
                *stream = None;
                failure
            } else {
                let mut lease = inner.client.lease_client();
                // Opening the stream sends one keep-alive and reads its answer.
                match tokio::time::timeout(timeout, lease.keep_alive(writer.lease)).await {
                    Ok(Ok(opened)) => {
                        *stream = Some(opened);
                        return Refresh::Alive;
                    }
                    Ok(Err(e)) if lease_not_found(&e) => return Refresh::Gone,
                    Ok(Err(e)) => Ok(e),
                    Err(_) => Err(format!("no keep-alive answer within {timeout:?}")),
                }
            };
        last_error = match failure {
            Ok(e) => {
                let what = "keep-alive of lease";
                let label = format!("{:#x}", writer.lease);
                if inner.token_expired(&e) {
                    if let Err(refused) = inner.renew_token(seen, what, &label).await {
                        return Refresh::Refused(refused.to_string());
                    }
                } else if let Some(refused) =
                    credentials_refused(&inner.config, &inner.endpoints, what, &label, &e)
                {
                    return Refresh::Refused(refused.to_string());
                }
                e.to_string()
            }
            Err(text) => text,
        };
    }
    Refresh::NoAnswer(last_error)
}

/// Why one watch session ended.
enum SessionEnd {
    /// The receiver was dropped: stop.
    Closed,
    /// The start revision was compacted: re-read the key or range.
    Compacted,
    /// The connection broke or etcd refused: reconnect with backoff.
    Broken(String),
    /// etcd refused the auth token (expired, or lost by an etcd restart): renew it, then
    /// reconnect.
    TokenRefused(String),
    /// A malformed value, or refused credentials: give up.
    Fatal(String),
}

/// How many times in a row a watch may be refused a freshly renewed token before it gives
/// up (a user without read permission on the key is refused as "permission denied" by
/// etcd 3.4, like an expired token).
const MAX_TOKEN_REFUSALS: u32 = 3;

/// What a resumable watch reads and delivers: the plan key, or member keys.
trait WatchSource: Send + 'static {
    /// What the watch delivers.
    type Item: Send + 'static;
    /// What is re-read after a compaction, for the log.
    const WHAT: &'static str;
    /// The key, or the prefix.
    fn key(&self) -> &str;
    /// Whether [`WatchSource::key`] is a prefix.
    fn prefix(&self) -> bool;
    /// Whether a fresh read only needs the revision, not the values (then
    /// [`WatchSource::snapshot`] gets no key-values).
    fn count_only(&self) -> bool {
        false
    }
    /// What a fresh read of the key or range at `revision` delivers, in order.
    fn snapshot(
        &mut self,
        inner: &Inner,
        kvs: &[KeyValue],
        revision: i64,
    ) -> Result<Vec<Self::Item>, EtcdError>;
    /// What one watch event delivers, if anything.
    fn event(
        &mut self,
        inner: &Inner,
        kind: EventType,
        kv: &KeyValue,
    ) -> Result<Option<Self::Item>, EtcdError>;
}

/// The plan key: delivers plans whose generation is above the last one delivered.
struct PlanSource {
    /// The `gen` key.
    key: String,
    /// The generation delivered last.
    delivered: Option<u64>,
}

impl PlanSource {
    /// The update of a plan value, if its generation is new (and then it counts as
    /// delivered).
    ///
    /// A value that is not a plan envelope (another tool, a hand edit) is skipped with a
    /// warning: the watch goes on and delivers the next good plan.
    fn update(&mut self, inner: &Inner, kv: &KeyValue) -> Result<Option<PlanUpdate>, EtcdError> {
        let record = match inner.decode_plan("watch", kv) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(key = %String::from_utf8_lossy(kv.key()), revision = kv.mod_revision(), error = %e, "ignoring a malformed plan value");
                return Ok(None);
            }
        };
        inner.note_plan(record.generation, record.mod_revision);
        if self.delivered.is_some_and(|d| record.generation <= d) {
            return Ok(None);
        }
        self.delivered = Some(record.generation);
        Ok(Some(PlanUpdate {
            generation: record.generation,
            plan: record.plan,
            revision: record.mod_revision,
        }))
    }
}

impl WatchSource for PlanSource {
    type Item = PlanUpdate;
    const WHAT: &'static str = "the plan";

    fn key(&self) -> &str {
        &self.key
    }

    fn prefix(&self) -> bool {
        false
    }

    fn snapshot(
        &mut self,
        inner: &Inner,
        kvs: &[KeyValue],
        _revision: i64,
    ) -> Result<Vec<PlanUpdate>, EtcdError> {
        match kvs.first() {
            Some(kv) => Ok(self.update(inner, kv)?.into_iter().collect()),
            None => Ok(Vec::new()),
        }
    }

    fn event(
        &mut self,
        inner: &Inner,
        kind: EventType,
        kv: &KeyValue,
    ) -> Result<Option<PlanUpdate>, EtcdError> {
        if kind != EventType::Put {
            return Ok(None);
        }
        self.update(inner, kv)
    }
}

/// Member keys: one member's, or the members prefix.
struct MemberSource {
    /// The key, or the prefix.
    key: String,
    /// Whether `key` is a prefix.
    prefix: bool,
}

impl WatchSource for MemberSource {
    type Item = MemberEvent;
    const WHAT: &'static str = "the members";

    fn key(&self) -> &str {
        &self.key
    }

    fn prefix(&self) -> bool {
        self.prefix
    }

    fn snapshot(
        &mut self,
        inner: &Inner,
        kvs: &[KeyValue],
        revision: i64,
    ) -> Result<Vec<MemberEvent>, EtcdError> {
        let members = inner.parse_members("watch", kvs)?;
        Ok(vec![MemberEvent::Snapshot { members, revision }])
    }

    fn event(
        &mut self,
        inner: &Inner,
        kind: EventType,
        kv: &KeyValue,
    ) -> Result<Option<MemberEvent>, EtcdError> {
        let revision = kv.mod_revision();
        let member = inner.parse_member("watch", kv)?;
        Ok(Some(match kind {
            EventType::Put => MemberEvent::Put { member, revision },
            EventType::Delete => MemberEvent::Deleted {
                id: member.id,
                revision,
            },
        }))
    }
}

/// The suspicion reports: a sync marker for each read of the prefix, then the reports
/// put after it.
struct SuspectSource {
    /// `/tenax/<job>/suspects/`.
    key: String,
}

impl SuspectSource {
    /// The report of one put key-value, or why it is malformed.
    fn parse(&self, kv: &KeyValue) -> Result<SuspectReport, String> {
        let key = String::from_utf8_lossy(kv.key());
        let (suspect, reporter) = key
            .strip_prefix(self.key.as_str())
            .and_then(records::parse_suspect_key)
            .ok_or_else(|| format!("key {key} is not {}<suspect>/<reporter>", self.key))?;
        let record = records::decode_suspect_report(suspect, reporter, kv.value())
            .map_err(|e| e.to_string())?;
        Ok(SuspectReport {
            suspect: suspect.to_string(),
            reporter: record.reporter,
            reason: record.reason,
            at_ms: record.at_ms,
            revision: kv.mod_revision(),
        })
    }
}

impl WatchSource for SuspectSource {
    type Item = SuspectEvent;
    const WHAT: &'static str = "the suspicion reports";

    fn key(&self) -> &str {
        &self.key
    }

    fn prefix(&self) -> bool {
        true
    }

    /// Stored reports are not delivered: the read only fixes the revision.
    fn count_only(&self) -> bool {
        true
    }

    fn snapshot(
        &mut self,
        _inner: &Inner,
        _kvs: &[KeyValue],
        revision: i64,
    ) -> Result<Vec<SuspectEvent>, EtcdError> {
        Ok(vec![SuspectEvent::Synced { revision }])
    }

    fn event(
        &mut self,
        _inner: &Inner,
        kind: EventType,
        kv: &KeyValue,
    ) -> Result<Option<SuspectEvent>, EtcdError> {
        if kind != EventType::Put {
            return Ok(None);
        }
        match self.parse(kv) {
            Ok(report) => Ok(Some(SuspectEvent::Report(report))),
            Err(detail) => {
                // One bad value (another tool, a hand edit) must not end the leader's
                // watch: it is skipped.
                tracing::warn!(%detail, "ignoring a malformed suspicion report");
                Ok(None)
            }
        }
    }
}

/// The watch loop: read the key or range (unless resuming from `next_rev`), watch from
/// the next revision, resume after a break, re-read after a compaction. Ends when the
/// receiver is dropped, on a malformed value, or after `give_up_after` without a working
/// connection.
async fn watch_task<S: WatchSource>(
    inner: Arc<Inner>,
    mut source: S,
    mut next_rev: Option<i64>,
    tx: mpsc::Sender<S::Item>,
    status: watch::Sender<WatchStatus>,
    reconnects: Arc<AtomicU64>,
    resyncs: Arc<AtomicU64>,
) {
    let mut failures = 0u32;
    let mut token_refusals = 0u32;
    let mut outage_start: Option<Instant> = None;
    loop {
        if tx.is_closed() {
            return;
        }
        // The renewals before this attempt: a refused token is renewed only if nobody
        // renewed it since.
        let seen = inner.token_renewals.load(Ordering::SeqCst);
        if failures > 0 {
            let since = *outage_start.get_or_insert_with(Instant::now);
            if since.elapsed() >= inner.config.give_up_after {
                status.send_replace(WatchStatus::Failed {
                    error: format!(
                        "watch of {} at {}: no working connection for {:?}",
                        source.key(),
                        inner.endpoints,
                        inner.config.give_up_after
                    ),
                });
                return;
            }
            tokio::time::sleep(inner.backoff(failures.min(30))).await;
        }
        let from = match next_rev {
            Some(rev) => rev,
            // Read the current value(s), deliver them, and watch from the next revision.
            None => match sync(&inner, &mut source, &tx).await {
                Ok(Some(rev)) => rev,
                Ok(None) => return,
                Err(SessionEnd::Fatal(error)) => {
                    status.send_replace(WatchStatus::Failed { error });
                    return;
                }
                Err(SessionEnd::Broken(e)) => {
                    failures += 1;
                    status.send_replace(WatchStatus::Reconnecting {
                        attempts: failures,
                        last_error: e,
                    });
                    continue;
                }
                Err(SessionEnd::TokenRefused(e)) => {
                    if let Err(error) =
                        renew_for_watch(&inner, source.key(), seen, &mut token_refusals, &e).await
                    {
                        status.send_replace(WatchStatus::Failed { error });
                        return;
                    }
                    failures += 1;
                    status.send_replace(WatchStatus::Reconnecting {
                        attempts: failures,
                        last_error: e,
                    });
                    continue;
                }
                Err(SessionEnd::Closed | SessionEnd::Compacted) => return,
            },
        };
        next_rev = Some(from);
        let end = session(&inner, &mut source, from, &tx, &status, &mut next_rev).await;
        if matches!(*status.borrow(), WatchStatus::Watching) {
            // The session worked: a later break starts a fresh outage.
            failures = 0;
            token_refusals = 0;
            outage_start = None;
        }
        match end {
            SessionEnd::Closed => return,
            SessionEnd::Fatal(error) => {
                status.send_replace(WatchStatus::Failed { error });
                return;
            }
            SessionEnd::Compacted => {
                resyncs.fetch_add(1, Ordering::Relaxed);
                tracing::info!(key = %source.key(), from, "watch revision compacted; re-reading {}", S::WHAT);
                next_rev = None;
                failures = 0;
                outage_start = None;
            }
            SessionEnd::Broken(e) => {
                reconnects.fetch_add(1, Ordering::Relaxed);
                failures += 1;
                status.send_replace(WatchStatus::Reconnecting {
                    attempts: failures,
                    last_error: e,
                });
            }
            SessionEnd::TokenRefused(e) => {
                reconnects.fetch_add(1, Ordering::Relaxed);
                if let Err(error) =
                    renew_for_watch(&inner, source.key(), seen, &mut token_refusals, &e).await
                {
                    status.send_replace(WatchStatus::Failed { error });
                    return;
                }
                failures += 1;
                status.send_replace(WatchStatus::Reconnecting {
                    attempts: failures,
                    last_error: e,
                });
            }
        }
    }
}

/// Renews the auth token after etcd refused a watch's (`refusals` in a row so far, this
/// one included once counted). The error ends the watch: refused credentials, or
/// [`MAX_TOKEN_REFUSALS`] fresh tokens refused in a row (no permission on the key).
async fn renew_for_watch(
    inner: &Inner,
    key: &str,
    seen: u64,
    refusals: &mut u32,
    last_error: &str,
) -> Result<(), String> {
    *refusals += 1;
    if *refusals > MAX_TOKEN_REFUSALS {
        let user = inner.config.auth.as_ref().map_or("", |a| a.user.as_str());
        return Err(format!(
            "watch of {key} at {}: etcd refused user {user:?} {MAX_TOKEN_REFUSALS} times in a \
             row although its token was renewed each time (last: {last_error}); the user \
             needs read permission on {key}",
            inner.endpoints
        ));
    }
    inner
        .renew_token(seen, "watch", key)
        .await
        .map_err(|e| e.to_string())
}

/// How a watch treats a failed request (opening the stream, a read, a stream message):
/// a refused token is renewed, refused credentials end the watch, the rest reconnects.
fn watch_failure(inner: &Inner, key: &str, e: etcd_client::Error) -> SessionEnd {
    if inner.token_expired(&e) {
        return SessionEnd::TokenRefused(e.to_string());
    }
    if let Some(refused) = credentials_refused(&inner.config, &inner.endpoints, "watch", key, &e) {
        return SessionEnd::Fatal(refused.to_string());
    }
    SessionEnd::Broken(e.to_string())
}

/// Reads the key or range once (one attempt, with a timeout), delivers what the source
/// makes of it, and returns the revision to watch from (`Ok(None)`: receiver gone).
async fn sync<S: WatchSource>(
    inner: &Inner,
    source: &mut S,
    tx: &mpsc::Sender<S::Item>,
) -> Result<Option<i64>, SessionEnd> {
    inner.requests.fetch_add(1, Ordering::Relaxed);
    let mut kv = inner.client.kv_client();
    let opts = match (source.prefix(), source.count_only()) {
        (false, false) => None,
        (false, true) => Some(GetOptions::new().with_count_only()),
        (true, false) => Some(GetOptions::new().with_prefix()),
        (true, true) => Some(GetOptions::new().with_prefix().with_count_only()),
    };
    let resp = match tokio::time::timeout(inner.config.op_timeout, kv.get(source.key(), opts)).await
    {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => return Err(watch_failure(inner, source.key(), e)),
        Err(_) => {
            return Err(SessionEnd::Broken(format!(
                "no answer within {:?}",
                inner.config.op_timeout
            )))
        }
    };
    let revision = resp
        .header()
        .map(|h| h.revision())
        .ok_or_else(|| SessionEnd::Broken("no header in the get answer".into()))?;
    let items = source
        .snapshot(inner, resp.kvs(), revision)
        .map_err(|e| SessionEnd::Fatal(e.to_string()))?;
    for item in items {
        if tx.send(item).await.is_err() {
            return Ok(None);
        }
    }
    Ok(Some(revision + 1))
}

/// One watch stream from revision `from`: delivers what the source makes of each event
/// and advances `next_rev` past every event seen, until the stream ends.
async fn session<S: WatchSource>(
    inner: &Inner,
    source: &mut S,
    from: i64,
    tx: &mpsc::Sender<S::Item>,
    status: &watch::Sender<WatchStatus>,
    next_rev: &mut Option<i64>,
) -> SessionEnd {
    inner.requests.fetch_add(1, Ordering::Relaxed);
    let mut client = inner.client.watch_client();
    let mut opts = WatchOptions::new().with_start_revision(from);
    if source.prefix() {
        opts = opts.with_prefix();
    }
    let mut stream = match tokio::time::timeout(
        inner.config.op_timeout,
        client.watch(source.key(), Some(opts)),
    )
    .await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return watch_failure(inner, source.key(), e),
        Err(_) => {
            return SessionEnd::Broken(format!(
                "watch not opened within {:?}",
                inner.config.op_timeout
            ))
        }
    };
    // The stream may stay silent for hours; HTTP/2 pings (see HTTP2_PING_INTERVAL)
    // break it when etcd is gone, and dropping the handle aborts the task.
    loop {
        let resp = tokio::select! {
            r = stream.message() => r,
            () = tx.closed() => return SessionEnd::Closed,
        };
        let resp = match resp {
            Ok(Some(resp)) => resp,
            Ok(None) => return SessionEnd::Broken("watch stream closed by etcd".into()),
            Err(e) => return watch_failure(inner, source.key(), e),
        };
        if resp.compact_revision() > 0 {
            return SessionEnd::Compacted;
        }
        if resp.canceled() {
            // etcd checks the token when it creates the watch and answers a refused one
            // with a canceled watch ("permission denied" in 3.4, "invalid auth token" later).
            let reason = resp.cancel_reason();
            let error = format!("watch canceled by etcd: {reason}");
            if reason.contains("permission denied") || reason.contains("invalid auth token") {
                if inner.config.auth.is_some() {
                    return SessionEnd::TokenRefused(error);
                }
                return SessionEnd::Fatal(format!(
                    "{error}: etcd at {} requires authentication for {}; give a user with read \
                     permission on it",
                    inner.endpoints,
                    source.key()
                ));
            }
            return SessionEnd::Broken(error);
        }
        // A created watch that etcd did not cancel at once (it answers a refused one with
        // created and canceled together).
        if resp.created() {
            status.send_replace(WatchStatus::Watching);
        }
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            *next_rev = Some(kv.mod_revision() + 1);
            match source.event(inner, event.event_type(), kv) {
                Ok(Some(item)) => {
                    if tx.send(item).await.is_err() {
                        return SessionEnd::Closed;
                    }
                }
                Ok(None) => {}
                Err(e) => return SessionEnd::Fatal(e.to_string()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation_names_the_setting() {
        let mut c = EtcdConfig::default();
        assert!(c.validate().is_ok());
        c.lease_ttl_s = 1;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("lease_ttl_s 1"));
        let c = EtcdConfig {
            job: "a/b".into(),
            ..EtcdConfig::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("\"a/b\""));
        let c = EtcdConfig {
            endpoints: vec!["127.0.0.1:2379".into()],
            ..EtcdConfig::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("http://"));
    }

    #[test]
    fn tls_goes_with_https_endpoints_and_checks_its_pem() {
        let ca = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&rcgen::KeyPair::generate().unwrap())
            .unwrap()
            .pem()
            .into_bytes();
        let key = rcgen::KeyPair::generate()
            .unwrap()
            .serialize_pem()
            .into_bytes();
        let https = |tls: Option<EtcdTls>| EtcdConfig {
            endpoints: vec!["https://127.0.0.1:2379".into()],
            tls,
            ..EtcdConfig::default()
        };
        let table: [(EtcdConfig, Option<&str>); 7] = [
            (https(Some(EtcdTls::new(ca.clone()))), None),
            (
                https(Some(
                    EtcdTls::new(ca.clone()).with_client_cert(ca.clone(), key.clone()),
                )),
                None,
            ),
            (https(None), Some("no CA is given")),
            (
                EtcdConfig {
                    tls: Some(EtcdTls::new(ca.clone())),
                    ..EtcdConfig::default()
                },
                Some("is http:// but TLS settings are given"),
            ),
            (
                https(Some(EtcdTls::new(b"not pem".to_vec()))),
                Some("the etcd CA holds no PEM certificate"),
            ),
            (
                https(Some(
                    EtcdTls::new(ca.clone()).with_client_cert(ca.clone(), ca.clone()),
                )),
                Some("the etcd client key holds no usable PEM private key"),
            ),
            (
                https(Some(EtcdTls {
                    client_key_pem: Some(key.clone()),
                    ..EtcdTls::new(ca.clone())
                })),
                Some("give both or neither"),
            ),
        ];
        for (i, (config, want)) in table.into_iter().enumerate() {
            match (config.validate(), want) {
                (Ok(()), None) => {}
                (Err(e), Some(w)) => assert!(e.to_string().contains(w), "case {i}: {e}"),
                (got, want) => panic!("case {i}: {got:?}, wanted an error with {want:?}"),
            }
        }
    }

    #[test]
    fn debug_never_prints_the_password_or_the_key() {
        let config = EtcdConfig {
            endpoints: vec!["https://127.0.0.1:2379".into()],
            tls: Some(
                EtcdTls::new(b"CA-PEM".to_vec())
                    .with_client_cert(b"CERT-PEM".to_vec(), b"SECRET-KEY-PEM".to_vec()),
            ),
            auth: Some(EtcdAuth::new("tenax", "hunter2-secret")),
            ..EtcdConfig::default()
        };
        let text = format!("{config:?} {config:#?}");
        assert!(text.contains("\"tenax\""), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(!text.contains("SECRET-KEY"), "{text}");
        let empty = EtcdConfig {
            auth: Some(EtcdAuth::new("tenax", "")),
            ..EtcdConfig::default()
        };
        assert!(empty
            .validate()
            .unwrap_err()
            .to_string()
            .contains("empty password"));
    }

    #[test]
    fn refused_credentials_name_the_user_and_say_what_to_do() {
        let mut config = EtcdConfig {
            auth: Some(EtcdAuth::new("tenax", "pw")),
            ..EtcdConfig::default()
        };
        let status =
            |code, msg: &str| etcd_client::Error::GRpcStatus(tonic::Status::new(code, msg));
        let e = credentials_refused(
            &config,
            "https://e:1",
            "authenticate for",
            "/tenax/default/",
            &status(
                tonic::Code::InvalidArgument,
                "etcdserver: authentication failed, invalid user ID or password",
            ),
        )
        .unwrap()
        .to_string();
        assert!(
            e.contains("https://e:1") && e.contains("user \"tenax\""),
            "{e}"
        );
        assert!(e.contains("check the user and its password"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        let e = credentials_refused(
            &config,
            "https://e:1",
            "get",
            "/tenax/default/gen",
            &status(
                tonic::Code::PermissionDenied,
                "etcdserver: permission denied",
            ),
        )
        .unwrap()
        .to_string();
        assert!(e.contains("readwrite /tenax/default/"), "{e}");
        // A refused token is renewed, not reported; a transient failure is neither.
        let expired = status(
            tonic::Code::Unauthenticated,
            "etcdserver: invalid auth token",
        );
        assert!(is_token_refusal(&expired));
        assert!(is_token_refusal(&status(
            tonic::Code::Unknown,
            "etcdserver: invalid auth token"
        )));
        assert!(!is_token_refusal(&status(tonic::Code::Unavailable, "x")));
        assert!(credentials_refused(
            &config,
            "e",
            "get",
            "k",
            &status(tonic::Code::Unavailable, "etcdserver: leader changed")
        )
        .is_none());
        config.auth = None;
        let e = credentials_refused(&config, "e", "get", "k", &expired)
            .unwrap()
            .to_string();
        assert!(
            e.contains("a client without a user") && e.contains("give a user"),
            "{e}"
        );
    }

    #[test]
    fn reserved_suffixes_are_refused() {
        for s in [
            "",
            "/x",
            "gen",
            "members/a",
            "leader",
            "leader/1",
            "suspects/a/b",
        ] {
            assert!(check_suffix(s).is_err(), "{s}");
        }
        assert!(check_suffix("commits/100").is_ok());
        assert!(check_suffix("generation-notes").is_ok());
    }
}
