//! `tenax certs`: the cluster CA and the node and operator certificates of mutual TLS
//! (made with rcgen by `tenax_cluster::tls`).

use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};
use clap::Subcommand;
use tenax_cluster::tls::{self, PeerIdentity};

/// Default validity of a CA, in days.
const CA_DAYS: u32 = 3650;
/// Default validity of a node or operator certificate, in days.
const LEAF_DAYS: u32 = 365;

/// `tenax certs` subcommands.
#[derive(Subcommand, Debug)]
pub enum CertsCommand {
    /// Make a cluster CA: DIR/ca.pem (give it to every node and operator) and
    /// DIR/ca-key.pem (keep it secret: whoever holds it can join the cluster).
    Init {
        /// Folder for the CA (created; existing files are never overwritten).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = CA_DAYS)]
        days: u32,
    },
    /// Issue a node certificate (`--node ID`: serves and dials peers; pass it to
    /// `tenax daemon --tls-cert`) or an operator certificate (`--operator NAME`: needed
    /// for `tenax control`; also reads `tenax status`).
    Issue {
        /// The CA folder made by `tenax certs init`.
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// The node id the certificate names (the daemon's --node-id).
        #[arg(
            long,
            value_name = "ID",
            conflicts_with = "operator",
            required_unless_present = "operator"
        )]
        node: Option<String>,
        /// The operator name the certificate names.
        #[arg(long, value_name = "NAME")]
        operator: Option<String>,
        /// Folder for <node-ID|operator-NAME>.pem, its -key.pem and a copy of ca.pem
        /// [default: the CA folder].
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Validity in days.
        #[arg(long, default_value_t = LEAF_DAYS)]
        days: u32,
    },
}

/// Runs a `tenax certs` subcommand.
pub fn run(command: CertsCommand) -> Result<()> {
    tls::install_crypto_provider();
    match command {
        CertsCommand::Init { out, days } => {
            if days == 0 {
                bail!("--days 0: a CA must be valid for at least a day");
            }
            let (cert, key) = tls::init_ca(&out, days).map_err(|e| anyhow!("{e}"))?;
            println!(
                "cluster CA: {} (give it to every node and operator), {} (keep it secret)",
                cert.display(),
                key.display()
            );
            Ok(())
        }
        CertsCommand::Issue {
            ca,
            node,
            operator,
            out,
            days,
        } => {
            if days == 0 {
                bail!("--days 0: a certificate must be valid for at least a day");
            }
            let who = match (node, operator) {
                (Some(id), None) => PeerIdentity::Node(id),
                (None, Some(name)) => PeerIdentity::Operator(name),
                _ => bail!("give one of --node ID or --operator NAME"),
            };
            let out = out.unwrap_or_else(|| ca.clone());
            let files = tls::issue(&ca, &who, &out, days).map_err(|e| anyhow!("{e}"))?;
            println!(
                "{who}: --tls-ca {} --tls-cert {} --tls-key {}",
                files.ca.display(),
                files.cert.display(),
                files.key.display()
            );
            Ok(())
        }
    }
}

/// The TLS files of a client of the control API (`tenax status`, `tenax control`): an
/// operator certificate (a node's also reads `status`, but control calls need an
/// operator's). None given: plain TCP, for daemons started with `--insecure`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ClientTlsArgs {
    /// The cluster CA certificate (PEM).
    #[arg(long, env = "TENAX_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Your certificate (PEM), e.g. from `tenax certs issue --operator NAME`.
    #[arg(long, env = "TENAX_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// Your private key (PEM).
    #[arg(long, env = "TENAX_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
}

impl ClientTlsArgs {
    /// The client configuration that accepts any node of the cluster CA, or `None`
    /// without TLS files.
    ///
    /// # Errors
    /// Some but not all three files given, or files that do not load (one line naming the
    /// file).
    pub fn client(&self) -> Result<Option<tonic::transport::ClientTlsConfig>> {
        match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (None, None, None) => Ok(None),
            (Some(ca), Some(cert), Some(key)) => {
                let material = tls::TlsMaterial::load(&tls::TlsFiles {
                    ca: ca.clone(),
                    cert: cert.clone(),
                    key: key.clone(),
                })
                .map_err(|e| anyhow!("TLS: {e}"))?;
                Ok(Some(material.client_for_any_node()))
            }
            _ => bail!("--tls-ca, --tls-cert and --tls-key go together: give all three"),
        }
    }
}
