//! Mutual TLS for the daemon's gRPC services (peer data plane, state copy, control and
//! status): a cluster CA and its node and operator certificates (rcgen), the rustls
//! configurations both ends use, the acceptor of the daemon's listener, and the identity
//! a peer's certificate names.
//!
//! Identities. A node certificate names its node id as the URI SAN `tenax://node/<id>`;
//! an operator certificate names `tenax://operator/<name>`. A server reads the client's
//! identity from that URI SAN ([`peer_identity`]): the peer plane refuses a frame or a
//! state request whose claimed member differs from it, the control API refuses drain,
//! pause, resume and checkpoint calls without an operator identity. A client dialling a
//! node checks the server's certificate against the node id it expects (the DNS SAN
//! [`node_dns_name`] that every node certificate carries beside its URI SAN), never
//! against the dialled IP; an operator, who dials an address, accepts any node
//! certificate of the cluster CA ([`ANY_NODE_DNS`]).
//!
//! One rustls crypto provider for the whole binary: aws-lc-rs, the one object_store's S3
//! client already brings ([`install_crypto_provider`]).

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// The URI SAN prefix of a node certificate: `tenax://node/<id>`.
pub const NODE_URI_PREFIX: &str = "tenax://node/";
/// The URI SAN prefix of an operator certificate: `tenax://operator/<name>`.
pub const OPERATOR_URI_PREFIX: &str = "tenax://operator/";
/// The DNS SAN every node certificate carries: what an operator's client checks when it
/// dials a node by address.
pub const ANY_NODE_DNS: &str = "node.tenax";
/// File name of the CA certificate in a CA folder.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA's private key in a CA folder.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// How long a TLS handshake on the daemon's listener may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections accepted but not yet taken by the gRPC server.
const ACCEPT_QUEUE: usize = 64;
/// Longest node id whose DNS label is the id itself (`n-<id>`: 63 characters at most).
const MAX_PLAIN_LABEL_ID: usize = 61;
/// Longest node id (in bytes) that is not a DNS label (`x-<hex>`).
const MAX_HEX_LABEL_ID: usize = 30;

/// Who a certificate names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerIdentity {
    /// A node (a daemon) with this member id.
    Node(String),
    /// An operator with this name (control calls, status).
    Operator(String),
}

impl PeerIdentity {
    /// The URI SAN that names this identity.
    pub fn uri(&self) -> String {
        match self {
            PeerIdentity::Node(id) => format!("{NODE_URI_PREFIX}{id}"),
            PeerIdentity::Operator(name) => format!("{OPERATOR_URI_PREFIX}{name}"),
        }
    }

    /// The identity a URI SAN names, if it is one of ours.
    pub fn from_uri(uri: &str) -> Option<PeerIdentity> {
        if let Some(id) = uri.strip_prefix(NODE_URI_PREFIX) {
            (!id.is_empty()).then(|| PeerIdentity::Node(id.to_string()))
        } else if let Some(name) = uri.strip_prefix(OPERATOR_URI_PREFIX) {
            (!name.is_empty()).then(|| PeerIdentity::Operator(name.to_string()))
        } else {
            None
        }
    }

    /// The node id, for a node identity.
    pub fn node(&self) -> Option<&str> {
        match self {
            PeerIdentity::Node(id) => Some(id),
            PeerIdentity::Operator(_) => None,
        }
    }

    /// The file name stem of its certificate in a folder (`node-<id>`, `operator-<name>`).
    pub fn file_stem(&self) -> String {
        match self {
            PeerIdentity::Node(id) => format!("node-{id}"),
            PeerIdentity::Operator(name) => format!("operator-{name}"),
        }
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerIdentity::Node(id) => write!(f, "node {id}"),
            PeerIdentity::Operator(name) => write!(f, "operator {name}"),
        }
    }
}

/// Why TLS material could not be made, read or used. Each message names the file or the
/// value and what to do.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A file holds no usable certificate or key, or they do not fit together.
    #[error("{}: {detail}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        detail: String,
    },
    /// A value (a node id, a name) cannot go into a certificate, or rustls refused the
    /// configuration.
    #[error("{0}")]
    Config(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn invalid(path: &Path, detail: impl Into<String>) -> TlsError {
    TlsError::Invalid {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

/// Installs aws-lc-rs as the process's rustls crypto provider (once; later calls do
/// nothing): every TLS client and server of the binary then uses the same one.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
}

/// The DNS SAN that names node `id` in its certificate and that a client dialling that
/// node checks: `n-<id>.node.tenax` for an id that is a lowercase DNS label, otherwise
/// `x-<hex of id>.node.tenax` (two forms that never collide).
///
/// # Errors
/// [`TlsError::Config`] for an empty id or one too long for a DNS label.
pub fn node_dns_name(id: &str) -> Result<String, TlsError> {
    let plain = !id.is_empty()
        && id.len() <= MAX_PLAIN_LABEL_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.ends_with('-');
    if plain {
        return Ok(format!("n-{id}.{ANY_NODE_DNS}"));
    }
    if id.is_empty() || id.len() > MAX_HEX_LABEL_ID {
        return Err(TlsError::Config(format!(
            "node id {id:?} cannot be named in a certificate: use 1 to {MAX_PLAIN_LABEL_ID} \
             characters of a-z, 0-9 and '-' (or at most {MAX_HEX_LABEL_ID} bytes of others)"
        )));
    }
    let hex: String = id.bytes().map(|b| format!("{b:02x}")).collect();
    Ok(format!("x-{hex}.{ANY_NODE_DNS}"))
}

fn check_name(what: &str, name: &str) -> Result<(), TlsError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(TlsError::Config(format!(
            "{what} {name:?} cannot be named in a certificate: use 1 to 128 characters of \
             letters, digits, '-', '_' and '.'"
        )))
    }
}

/// The identity named by the first URI SAN of ours in a DER certificate, if any.
pub fn identity_of_der(der: &[u8]) -> Option<PeerIdentity> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(uri) => PeerIdentity::from_uri(uri),
        _ => None,
    })
}

/// The identity of the client of a request served over TLS (its certificate's URI
/// SAN); `None` for a request over plain TCP, and `Some(None)` for a TLS client whose
/// certificate names none of ours.
pub fn peer_identity<T>(request: &tonic::Request<T>) -> Option<Option<PeerIdentity>> {
    let certs = request.peer_certs()?;
    Some(certs.first().and_then(|c| identity_of_der(c)))
}

/// The files of one party's TLS material: the cluster CA certificate, its own
/// certificate and its private key (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The cluster CA certificate.
    pub ca: PathBuf,
    /// This party's certificate, issued by the CA.
    pub cert: PathBuf,
    /// This party's private key.
    pub key: PathBuf,
}

impl TlsFiles {
    /// The files `tenax certs issue` writes for `who` in `dir` (with the CA's certificate
    /// copied there).
    pub fn in_folder(dir: &Path, who: &PeerIdentity) -> TlsFiles {
        let stem = who.file_stem();
        TlsFiles {
            ca: dir.join(CA_CERT_FILE),
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}-key.pem")),
        }
    }
}

/// One party's loaded and checked TLS material.
pub struct TlsMaterial {
    identity: PeerIdentity,
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    server: Option<Arc<ServerConfig>>,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl TlsMaterial {
    /// Reads and checks `files`: the certificate must be issued by the CA and name a node
    /// or an operator, and the key must be its key.
    ///
    /// # Errors
    /// [`TlsError`] naming the file that is missing or wrong.
    pub fn load(files: &TlsFiles) -> Result<TlsMaterial, TlsError> {
        let ca_pem = fs::read(&files.ca).map_err(io_err(&files.ca))?;
        let cert_pem = fs::read(&files.cert).map_err(io_err(&files.cert))?;
        let key_pem = fs::read(&files.key).map_err(io_err(&files.key))?;
        let ca = CertificateDer::from_pem_slice(&ca_pem)
            .map_err(|e| invalid(&files.ca, format!("no PEM certificate ({e}); pass the cluster CA's ca.pem from `tenax certs init`")))?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| invalid(&files.cert, format!("unreadable PEM ({e})")))?;
        let Some(leaf) = chain.first().cloned() else {
            return Err(invalid(
                &files.cert,
                "holds no certificate; pass one from `tenax certs issue`",
            ));
        };
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            invalid(
                &files.key,
                format!("no PEM private key ({e}); pass the -key.pem written with the certificate"),
            )
        })?;
        let identity = identity_of_der(&leaf).ok_or_else(|| {
            invalid(
                &files.cert,
                "names no tenax node or operator (no tenax:// URI SAN); issue it with `tenax certs issue`",
            )
        })?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca)
            .map_err(|e| invalid(&files.ca, format!("not a usable CA certificate ({e})")))?;
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| TlsError::Config(format!("client verifier: {e}")))?;
        verifier
            .verify_client_cert(&leaf, &chain[1..], UnixTime::now())
            .map_err(|e| {
                invalid(
                    &files.cert,
                    format!(
                        "not a valid certificate of the CA in {} ({e}); issue one with `tenax certs issue --ca <that folder>`",
                        files.ca.display()
                    ),
                )
            })?;
        let server = match identity {
            PeerIdentity::Node(_) => {
                let mut config = ServerConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| TlsError::Config(format!("TLS versions: {e}")))?
                    .with_client_cert_verifier(verifier)
                    .with_single_cert(chain, key.clone_key())
                    .map_err(|e| {
                        invalid(
                            &files.key,
                            format!("does not fit {} ({e})", files.cert.display()),
                        )
                    })?;
                config.alpn_protocols = vec![b"h2".to_vec()];
                Some(Arc::new(config))
            }
            PeerIdentity::Operator(_) => None,
        };
        Ok(TlsMaterial {
            identity,
            ca_pem,
            cert_pem,
            key_pem,
            server,
        })
    }

    /// Who the certificate names.
    pub fn identity(&self) -> &PeerIdentity {
        &self.identity
    }

    /// The rustls server configuration (client certificates of the CA required).
    ///
    /// # Errors
    /// [`TlsError::Config`] for an operator certificate: only nodes serve.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        self.server.clone().ok_or_else(|| {
            TlsError::Config(format!(
                "{} holds an operator certificate: a daemon needs a node certificate (`tenax certs issue --node ID`)",
                self.identity
            ))
        })
    }

    fn client(&self, domain: String) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .domain_name(domain)
    }

    /// The client configuration for dialling node `node_id`: its certificate must name
    /// that node.
    ///
    /// # Errors
    /// [`node_dns_name`]'s.
    pub fn client_for_node(&self, node_id: &str) -> Result<ClientTlsConfig, TlsError> {
        Ok(self.client(node_dns_name(node_id)?))
    }

    /// The rustls client configuration and server name for dialling node `node_id`
    /// outside tonic (the state stream, [`crate::peer`]): the same checks as
    /// [`TlsMaterial::client_for_node`] (the server's certificate is of the cluster CA and
    /// names that node), with this party's certificate as the client certificate.
    ///
    /// # Errors
    /// [`node_dns_name`]'s, or unusable material.
    pub fn rustls_client_for_node(
        &self,
        node_id: &str,
    ) -> Result<
        (
            Arc<rustls::ClientConfig>,
            rustls_pki_types::ServerName<'static>,
        ),
        TlsError,
    > {
        let name = rustls_pki_types::ServerName::try_from(node_dns_name(node_id)?)
            .map_err(|e| TlsError::Config(format!("server name of node {node_id:?}: {e}")))?;
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(&self.ca_pem) {
            let ca = ca.map_err(|e| TlsError::Config(format!("CA certificate: {e}")))?;
            roots
                .add(ca)
                .map_err(|e| TlsError::Config(format!("CA certificate: {e}")))?;
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError::Config(format!("certificate: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem)
            .map_err(|e| TlsError::Config(format!("private key: {e}")))?;
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(format!("TLS versions: {e}")))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| TlsError::Config(format!("client certificate: {e}")))?;
        Ok((Arc::new(config), name))
    }

    /// The client configuration for dialling any node of the cluster by address (an
    /// operator's `tenax status`, `tenax control`).
    pub fn client_for_any_node(&self) -> ClientTlsConfig {
        self.client(ANY_NODE_DNS.to_string())
    }
}

/// A party's TLS material that can be reloaded from its files (SIGHUP): clients take the
/// current material at each connect, the acceptor at each handshake; connections already
/// up keep theirs. Also counts refused handshakes and identities.
#[derive(Clone, Debug)]
pub struct Tls {
    inner: Arc<TlsInner>,
}

#[derive(Debug)]
struct TlsInner {
    files: TlsFiles,
    current: RwLock<Arc<TlsMaterial>>,
    handshakes_refused: AtomicU64,
    reloads: AtomicU64,
}

impl Tls {
    /// Loads `files` ([`TlsMaterial::load`]).
    ///
    /// # Errors
    /// [`TlsMaterial::load`]'s.
    pub fn load(files: TlsFiles) -> Result<Tls, TlsError> {
        let material = TlsMaterial::load(&files)?;
        Ok(Tls {
            inner: Arc::new(TlsInner {
                files,
                current: RwLock::new(Arc::new(material)),
                handshakes_refused: AtomicU64::new(0),
                reloads: AtomicU64::new(0),
            }),
        })
    }

    /// The material in use.
    pub fn current(&self) -> Arc<TlsMaterial> {
        Arc::clone(
            &self
                .inner
                .current
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// Reads the files again and uses them from now on if they load; the material in use
    /// stays otherwise. The identity may not change.
    ///
    /// # Errors
    /// [`TlsMaterial::load`]'s, or [`TlsError::Config`] when the new certificate names
    /// another identity.
    pub fn reload(&self) -> Result<(), TlsError> {
        let material = TlsMaterial::load(&self.inner.files)?;
        let old = self.current();
        if material.identity() != old.identity() {
            return Err(TlsError::Config(format!(
                "{} now names {} instead of {}: a node keeps its identity; restart it to change it",
                self.inner.files.cert.display(),
                material.identity(),
                old.identity()
            )));
        }
        *self
            .inner
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(material);
        self.inner.reloads.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The files it loads.
    pub fn files(&self) -> &TlsFiles {
        &self.inner.files
    }

    /// TLS handshakes on the acceptor that failed (no certificate, another CA, expired,
    /// timed out).
    pub fn handshakes_refused(&self) -> u64 {
        self.inner.handshakes_refused.load(Ordering::Relaxed)
    }

    /// Successful reloads.
    pub fn reloads(&self) -> u64 {
        self.inner.reloads.load(Ordering::Relaxed)
    }

    /// The TLS connections of `listener` for a tonic server's `serve_with_incoming`:
    /// every accepted connection's handshake runs on its own task (at most
    /// [`HANDSHAKE_TIMEOUT`]) with the material current then; a failed one is counted and
    /// dropped. The accept loop ends when the returned stream is dropped.
    ///
    /// # Errors
    /// [`TlsMaterial::server_config`]'s (an operator certificate).
    pub fn incoming(
        &self,
        listener: TcpListener,
    ) -> Result<tokio_stream::wrappers::ReceiverStream<io::Result<TlsStream<TcpStream>>>, TlsError>
    {
        self.current().server_config()?;
        let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
        let tls = self.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = tx.closed() => return,
                    a = listener.accept() => a,
                };
                let (tcp, remote) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let Ok(config) = tls.current().server_config() else {
                    return;
                };
                let (tx, tls) = (tx.clone(), tls.clone());
                tokio::spawn(async move {
                    let acceptor = tokio_rustls::TlsAcceptor::from(config);
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send(Ok(stream)).await;
                        }
                        Ok(Err(e)) => {
                            tls.inner.handshakes_refused.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(%remote, error = %e, "TLS handshake refused");
                        }
                        Err(_) => {
                            tls.inner.handshakes_refused.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(%remote, "TLS handshake timed out");
                        }
                    }
                });
            }
        });
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
    }
}

fn write_new(path: &Path, bytes: &[u8], private: bool) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    if private {
        options.mode(0o600);
    }
    let mut f = options.open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            invalid(
                path,
                "already exists; remove it or choose another folder (nothing was written)",
            )
        } else {
            TlsError::Io {
                path: path.to_path_buf(),
                source: e,
            }
        }
    })?;
    f.write_all(bytes).map_err(io_err(path))
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
}

fn rcgen_err(e: rcgen::Error) -> TlsError {
    TlsError::Config(format!("certificate generation: {e}"))
}

/// Makes a cluster CA in `dir` (created if missing): `ca.pem` and `ca-key.pem` (mode
/// 0600), valid for `days`; returns their paths. Nothing is overwritten.
///
/// # Errors
/// [`TlsError`] when the files exist or cannot be written.
pub fn init_ca(dir: &Path, days: u32) -> Result<(PathBuf, PathBuf), TlsError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let (cert_path, key_path) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(invalid(
                p,
                "already exists; remove it or choose another folder (nothing was written)",
            ));
        }
    }
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rcgen_err)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params
        .distinguished_name
        .push(DnType::CommonName, "tenax cluster CA");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, days);
    let key = KeyPair::generate().map_err(rcgen_err)?;
    let cert = params.self_signed(&key).map_err(rcgen_err)?;
    write_new(&key_path, key.serialize_pem().as_bytes(), true)?;
    write_new(&cert_path, cert.pem().as_bytes(), false)?;
    Ok((cert_path, key_path))
}

/// Issues a certificate for `who` signed by the CA in `ca_dir`, valid for `days`, into
/// `out_dir` (created if missing): `<stem>.pem`, `<stem>-key.pem` (0600) and a copy of
/// `ca.pem` if the folder has none ([`TlsFiles::in_folder`]). A node certificate serves
/// and dials (URI SAN `tenax://node/<id>`, DNS SANs [`node_dns_name`] and
/// [`ANY_NODE_DNS`]); an operator certificate only dials (`tenax://operator/<name>`).
///
/// # Errors
/// [`TlsError`] for a name that cannot be certified, a CA folder without a CA, or files
/// that exist.
pub fn issue(
    ca_dir: &Path,
    who: &PeerIdentity,
    out_dir: &Path,
    days: u32,
) -> Result<TlsFiles, TlsError> {
    let (ca_cert_path, ca_key_path) = (ca_dir.join(CA_CERT_FILE), ca_dir.join(CA_KEY_FILE));
    let ca_pem = fs::read_to_string(&ca_cert_path).map_err(io_err(&ca_cert_path))?;
    let ca_key_pem = fs::read_to_string(&ca_key_path).map_err(io_err(&ca_key_path))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .map_err(|e| invalid(&ca_key_path, format!("not a private key ({e})")))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
        .map_err(|e| invalid(&ca_cert_path, format!("not a CA certificate ({e})")))?;
    let mut names = Vec::new();
    let uri = |s: String| {
        s.try_into()
            .map(SanType::URI)
            .map_err(|e| TlsError::Config(format!("{who}: {e}")))
    };
    let dns = |s: String| {
        s.try_into()
            .map(SanType::DnsName)
            .map_err(|e| TlsError::Config(format!("{who}: {e}")))
    };
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rcgen_err)?;
    match who {
        PeerIdentity::Node(id) => {
            let dns_name = node_dns_name(id)?;
            if !id.bytes().all(|b| b.is_ascii_graphic() && b != b'/') {
                return Err(TlsError::Config(format!(
                    "node id {id:?} cannot be named in a certificate: use printable ASCII \
                     without spaces or '/'"
                )));
            }
            names.push(uri(who.uri())?);
            names.push(dns(dns_name)?);
            names.push(dns(ANY_NODE_DNS.to_string())?);
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
        }
        PeerIdentity::Operator(name) => {
            check_name("operator name", name)?;
            names.push(uri(who.uri())?);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
    }
    params.subject_alt_names = names;
    params
        .distinguished_name
        .push(DnType::CommonName, who.to_string());
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, days);
    let key = KeyPair::generate().map_err(rcgen_err)?;
    let cert = params.signed_by(&key, &issuer).map_err(rcgen_err)?;
    fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
    let files = TlsFiles::in_folder(out_dir, who);
    write_new(&files.key, key.serialize_pem().as_bytes(), true)?;
    write_new(&files.cert, cert.pem().as_bytes(), false)?;
    if !files.ca.exists() {
        write_new(&files.ca, ca_pem.as_bytes(), false)?;
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_dns_names_are_labels_and_never_collide() {
        let table = [
            ("node-0", Some("n-node-0.node.tenax")),
            ("a", Some("n-a.node.tenax")),
            ("Node-0", Some("x-4e6f64652d30.node.tenax")),
            ("n_1", Some("x-6e5f31.node.tenax")),
            ("bad-", Some("x-6261642d.node.tenax")),
            ("", None),
            (&"y".repeat(61), Some("")),
            (&"Y".repeat(31), None),
        ];
        for (id, want) in table {
            let got = node_dns_name(id).ok();
            match want {
                Some("") => assert!(got.is_some(), "{id}"),
                Some(w) => assert_eq!(got.as_deref(), Some(w), "{id}"),
                None => assert!(got.is_none(), "{id}"),
            }
        }
        // A plain id that looks like the hex form of another stays apart from it.
        assert_ne!(
            node_dns_name("x-4e6f64652d30").unwrap(),
            node_dns_name("Node-0").unwrap()
        );
    }

    #[test]
    fn uris_round_trip_and_others_are_not_ours() {
        for who in [
            PeerIdentity::Node("node-1".into()),
            PeerIdentity::Operator("alice".into()),
        ] {
            assert_eq!(PeerIdentity::from_uri(&who.uri()), Some(who));
        }
        for uri in [
            "tenax://node/",
            "spiffe://x/node/a",
            "tenax://operator/",
            "",
        ] {
            assert_eq!(PeerIdentity::from_uri(uri), None, "{uri}");
        }
    }

    #[test]
    fn issued_certificates_load_and_name_their_identity() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init_ca(&ca, 30).unwrap();
        let node = issue(&ca, &PeerIdentity::Node("node-7".into()), &ca, 30).unwrap();
        let op = issue(
            &ca,
            &PeerIdentity::Operator("ops".into()),
            &dir.path().join("op"),
            30,
        )
        .unwrap();
        let m = TlsMaterial::load(&node).unwrap();
        assert_eq!(m.identity(), &PeerIdentity::Node("node-7".into()));
        assert!(m.server_config().is_ok());
        let o = TlsMaterial::load(&op).unwrap();
        assert_eq!(o.identity(), &PeerIdentity::Operator("ops".into()));
        assert!(o.server_config().is_err());
        // Nothing is overwritten.
        assert!(init_ca(&ca, 30).is_err());
        assert!(issue(&ca, &PeerIdentity::Node("node-7".into()), &ca, 30).is_err());
    }

    #[test]
    fn a_certificate_of_another_ca_or_a_wrong_key_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        init_ca(&a, 30).unwrap();
        init_ca(&b, 30).unwrap();
        let node_a = issue(&a, &PeerIdentity::Node("n1".into()), &a, 30).unwrap();
        let node_b = issue(&b, &PeerIdentity::Node("n2".into()), &b, 30).unwrap();
        let crossed = TlsFiles {
            ca: node_a.ca.clone(),
            ..node_b.clone()
        };
        let e = TlsMaterial::load(&crossed).unwrap_err().to_string();
        assert!(e.contains("n2.pem") || e.contains("node-n2.pem"), "{e}");
        assert!(e.contains("not a valid certificate of the CA"), "{e}");
        let wrong_key = TlsFiles {
            key: node_b.key.clone(),
            ..node_a.clone()
        };
        let e = TlsMaterial::load(&wrong_key).unwrap_err().to_string();
        assert!(e.contains("does not fit"), "{e}");
        let missing = TlsFiles {
            cert: dir.path().join("nope.pem"),
            ..node_a
        };
        let e = TlsMaterial::load(&missing).unwrap_err().to_string();
        assert!(e.contains("nope.pem"), "{e}");
    }

    #[test]
    fn reload_keeps_the_identity() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init_ca(&ca, 30).unwrap();
        let files = issue(&ca, &PeerIdentity::Node("n1".into()), &ca, 30).unwrap();
        let tls = Tls::load(files.clone()).unwrap();
        // A renewed certificate for the same node is taken.
        fs::remove_file(&files.cert).unwrap();
        fs::remove_file(&files.key).unwrap();
        issue(&ca, &PeerIdentity::Node("n1".into()), &ca, 60).unwrap();
        tls.reload().unwrap();
        assert_eq!(tls.reloads(), 1);
        // One naming another node is not, and the old material stays.
        let other = issue(&ca, &PeerIdentity::Node("n2".into()), &ca, 30).unwrap();
        fs::rename(&other.cert, &files.cert).unwrap();
        fs::rename(&other.key, &files.key).unwrap();
        assert!(tls.reload().is_err());
        assert_eq!(tls.current().identity(), &PeerIdentity::Node("n1".into()));
    }
}
