//! `tenax status` and `tenax control`: operator commands that talk to the daemons of a
//! job over their gRPC Control service.
//!
//! - [`status`] finds the job's registered members in etcd (read only: it never writes
//!   there), asks every member's `Control.Status` at once, each under a deadline, and
//!   prints a table (or, with `--json`, one JSON object). A member that does not answer
//!   is listed with its error; it is not fatal.
//! - [`control`] sends one of Drain, CheckpointNow, Pause, Resume to one member, found
//!   by id in etcd (`--node`) or by address (`--addr`, which skips etcd), and prints its
//!   answer; a refusal is an error (non-zero exit).
//!
//! The summary and the table are pure functions in `tenax_cluster::status`, table-tested
//! there; the etcd and Control clients of both are in src/status/client.rs.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use serde_json::Value;
use tenax_cluster::status::{render_table, summarize};
use tenax_proto::v1::{
    CheckpointNowRequest, ControlReply, DrainRequest, PauseRequest, ResumeRequest,
};
use tonic::transport::ClientTlsConfig;

mod client;

use client::{
    all_members, connect_control, describe_status, no_members, parse_endpoints, parse_member,
    read_job, resolve, timed, with_deadline,
};
pub(crate) use client::{probe_control, query_status};

/// The etcd endpoint used when neither `--etcd` nor `TENAX_ETCD` is given.
pub const DEFAULT_ETCD: &str = "http://127.0.0.1:2379";

/// The job used when neither `--job` nor `TENAX_JOB` is given.
pub const DEFAULT_JOB: &str = "default";

/// Arguments of `tenax status`.
#[derive(clap::Args, Debug, Clone)]
pub struct StatusArgs {
    /// etcd client URL(s), comma-separated; `http://` is added when missing.
    #[arg(long, env = "TENAX_ETCD", value_name = "URL[,URL...]", default_value = DEFAULT_ETCD)]
    pub etcd: String,
    /// TLS and authentication to etcd (--etcd-ca, --etcd-cert, --etcd-key, --etcd-user).
    #[command(flatten)]
    pub etcd_client: crate::etcd_args::EtcdClientArgs,
    /// The job whose members to ask.
    #[arg(long, env = "TENAX_JOB", value_name = "NAME", default_value = DEFAULT_JOB)]
    pub job: String,
    /// Print exactly one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Deadline of each etcd call and of each member's answer, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 5.0, value_parser = parse_timeout)]
    pub timeout_s: f64,
    /// Mutual TLS with the members (when they run with --tls-*).
    #[command(flatten)]
    pub tls: crate::certs::ClientTlsArgs,
}

/// Which member a `tenax control` command goes to: `--node ID` (looked up in etcd) or
/// `--addr HOST:PORT` (etcd is not contacted).
#[derive(clap::Args, Debug, Clone)]
pub struct Target {
    /// etcd client URL(s), comma-separated; `http://` is added when missing.
    #[arg(long, env = "TENAX_ETCD", value_name = "URL[,URL...]", default_value = DEFAULT_ETCD)]
    pub etcd: String,
    /// TLS and authentication to etcd (--etcd-ca, --etcd-cert, --etcd-key, --etcd-user).
    #[command(flatten)]
    pub etcd_client: crate::etcd_args::EtcdClientArgs,
    /// The job the member belongs to.
    #[arg(long, env = "TENAX_JOB", value_name = "NAME", default_value = DEFAULT_JOB)]
    pub job: String,
    /// The member id (as `tenax status` lists it); its address is read from etcd.
    #[arg(
        long,
        value_name = "ID",
        required_unless_present_any = ["addr", "all"],
        conflicts_with_all = ["addr", "all"]
    )]
    pub node: Option<String>,
    /// The member's control address, host:port; etcd is not contacted.
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "all")]
    pub addr: Option<String>,
    /// Every member registered in etcd (e.g. to pause or resume the whole job).
    #[arg(long)]
    pub all: bool,
    /// Deadline of each etcd call and of the member's answer, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 5.0, value_parser = parse_timeout)]
    pub timeout_s: f64,
    /// Mutual TLS with the members (when they run with --tls-*).
    #[command(flatten)]
    pub tls: crate::certs::ClientTlsArgs,
}

/// `tenax control`: one request to one member of a running job.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum ControlCommand {
    /// Make the member leave the job after the current step (the others re-form
    /// without it).
    Drain {
        #[command(flatten)]
        target: Target,
        /// Also save a final checkpoint first (what SIGTERM does).
        #[arg(long)]
        checkpoint: bool,
    },
    /// Save a group checkpoint at the next step boundary.
    Checkpoint {
        #[command(flatten)]
        target: Target,
    },
    /// Hold training at the next step boundary (its peers wait for it inside their next
    /// step, at most --step-timeout-s); `--all` pauses the whole job.
    Pause {
        #[command(flatten)]
        target: Target,
    },
    /// Go on training after a pause.
    Resume {
        #[command(flatten)]
        target: Target,
    },
}

/// `tenax status`: prints the job's state and one line per registered member (or one
/// JSON object with `--json`).
///
/// # Errors
/// etcd unreachable; the job has no registered members; none of the members answered
/// (after printing what is known).
pub async fn status(args: StatusArgs) -> Result<()> {
    let summary = collect(&args).await?;
    if args.json {
        println!("{summary}");
    } else {
        print!("{}", render_table(&summary));
    }
    let members = summary["members"].as_array().map_or(0, Vec::len);
    let answered = summary["members"]
        .as_array()
        .map_or(0, |m| m.iter().filter(|m| m["error"].is_null()).count());
    if answered == 0 {
        bail!(
            "none of the {members} registered member(s) of job {} answered (see above)",
            args.job
        );
    }
    Ok(())
}

/// Reads the members and the plan generation from etcd, asks every member, summarizes.
async fn collect(args: &StatusArgs) -> Result<Value> {
    let timeout = Duration::from_secs_f64(args.timeout_s);
    let tls = args.tls.client()?;
    let tls = tls.as_ref();
    let endpoints = parse_endpoints(&args.etcd)?;
    let url = endpoints.join(",");
    let (members, plan_gen) = read_job(&endpoints, &args.job, &args.etcd_client, timeout).await?;
    if members.is_empty() {
        bail!(no_members(&args.job, &url));
    }
    let queries = members.iter().map(|m| async move {
        match parse_member(m) {
            Ok(info) => {
                let reply = query_status(&info.addr, timeout, tls).await;
                (info, reply)
            }
            Err((info, e)) => (info, Err(e)),
        }
    });
    let replies = futures::future::join_all(queries).await;
    Ok(summarize(&args.job, plan_gen, replies))
}

/// Parses `--timeout-s`: a finite number of seconds above 0 (at most a day).
fn parse_timeout(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(v > 0.0 && v <= 86_400.0) {
        return Err(format!("{s} must be above 0 and at most 86400 seconds"));
    }
    Ok(v)
}

/// `tenax control ...`: sends the request to the target member and prints its answer.
///
/// # Errors
/// The member cannot be found or reached, or it does not accept the request (the error
/// carries its message).
pub async fn control(cmd: ControlCommand) -> Result<()> {
    let (target, what) = match &cmd {
        ControlCommand::Drain { target, .. } => (target, "drain"),
        ControlCommand::Checkpoint { target } => (target, "checkpoint"),
        ControlCommand::Pause { target } => (target, "pause"),
        ControlCommand::Resume { target } => (target, "resume"),
    };
    let timeout = Duration::from_secs_f64(target.timeout_s);
    let tls = target.tls.client()?;
    let targets = if target.all {
        all_members(target, timeout).await?
    } else {
        vec![resolve(target, timeout).await?]
    };
    let mut failures = Vec::new();
    for (who, addr) in targets {
        match control_one(&cmd, what, &who, &addr, timeout, tls.as_ref()).await {
            Ok(message) => println!("{message}"),
            Err(e) => {
                if target.all {
                    eprintln!("warning: {e:#}");
                }
                failures.push(e);
            }
        }
    }
    match failures.len() {
        0 => Ok(()),
        1 if !target.all => Err(failures.remove(0)),
        n => bail!("{n} member(s) did not accept the request to {what} (see the warnings above)"),
    }
}

/// Sends one control request; returns the message to print.
async fn control_one(
    cmd: &ControlCommand,
    what: &str,
    who: &str,
    addr: &str,
    timeout: Duration,
    tls: Option<&ClientTlsConfig>,
) -> Result<String> {
    let reply = with_deadline(timeout, async {
        let mut client = connect_control(addr, timeout, tls).await?;
        let reply = match &cmd {
            ControlCommand::Drain { checkpoint, .. } => {
                client
                    .drain(timed(
                        DrainRequest {
                            checkpoint: *checkpoint,
                        },
                        timeout,
                    ))
                    .await
            }
            ControlCommand::Checkpoint { .. } => {
                client
                    .checkpoint_now(timed(CheckpointNowRequest {}, timeout))
                    .await
            }
            ControlCommand::Pause { .. } => client.pause(timed(PauseRequest {}, timeout)).await,
            ControlCommand::Resume { .. } => client.resume(timed(ResumeRequest {}, timeout)).await,
        };
        reply
            .map(tonic::Response::into_inner)
            .map_err(|s| describe_status(&s))
    })
    .await
    .map_err(|e| anyhow!("{who} at {addr} could not be asked to {what}: {e}"))?;
    accepted(who, what, reply)
}

/// The message to print for an accepted reply, or the error for a refused one.
fn accepted(who: &str, what: &str, reply: ControlReply) -> Result<String> {
    let message = if reply.message.is_empty() {
        if reply.accepted {
            "accepted"
        } else {
            "no reason given"
        }
        .to_string()
    } else {
        reply.message
    };
    if reply.accepted {
        Ok(message)
    } else {
        Err(anyhow!("{who} refused to {what}: {message}"))
    }
}

#[cfg(test)]
mod tests {
    use super::client::{control_uri, member_addr, short_reason};
    use super::*;
    use clap::Parser;
    use serde_json::json;
    use std::net::SocketAddr;
    use std::sync::Arc;
    use tenax_cluster::etcd::{EtcdConfig, EtcdMembership, Member};
    use tenax_core::membership::{MemberId, MemberInfo};
    use tenax_proto::v1::control_server::{Control, ControlServer};
    use tenax_proto::v1::{StatusReply, StatusRequest};
    use tokio::task::JoinHandle;
    use tokio_util::sync::CancellationToken;

    fn info(id: &str, addr: &str) -> MemberInfo {
        MemberInfo {
            id: MemberId::new(id),
            devices: 1,
            joined_gen: 0,
            addr: addr.to_string(),
            metrics_addr: format!("{addr}9"),
        }
    }

    /// A Status reply of member `id` of job `j` (the rest of its fields empty).
    fn reply(id: &str, step: u64, ranks: Vec<u32>, leader: bool) -> StatusReply {
        let (job, member_id, generation) = ("j".into(), id.into(), 3);
        StatusReply {
            job,
            member_id,
            generation,
            ranks,
            step,
            leader,
            ..Default::default()
        }
    }

    #[test]
    fn small_helpers() {
        assert_eq!(
            short_reason("grpc: ConnectError(Os { kind: ConnectionRefused })"),
            "connection refused"
        );
        assert_eq!(short_reason("odd"), "odd");
        assert_eq!(
            parse_endpoints(" a:1, http://b:2 ,").unwrap(),
            vec!["http://a:1".to_string(), "http://b:2".to_string()]
        );
        assert!(parse_endpoints(" , ").is_err());
        assert_eq!(parse_timeout("0.5"), Ok(0.5));
        for bad in ["0", "-1", "nan", "inf", "x"] {
            assert!(parse_timeout(bad).is_err(), "{bad}");
        }
        assert_eq!(control_uri("h:1"), "http://h:1");
        assert_eq!(control_uri("http://h:1"), "http://h:1");
        assert_eq!(
            accepted(
                "m",
                "pause",
                ControlReply {
                    accepted: true,
                    message: String::new()
                }
            )
            .unwrap(),
            "accepted"
        );
        let refused = accepted(
            "m",
            "pause",
            ControlReply {
                accepted: false,
                message: "already paused".into(),
            },
        );
        assert_eq!(
            refused.unwrap_err().to_string(),
            "m refused to pause: already paused"
        );

        let member = |id: &str, info: &[u8]| Member {
            id: id.into(),
            info: info.to_vec(),
            lease: 1,
        };
        let good = serde_json::to_vec(&info("a", "h:1")).unwrap();
        let no_addr = serde_json::to_vec(&info("b", "")).unwrap();
        let members = vec![member("a", &good), member("b", &no_addr), member("c", b"{")];
        assert_eq!(member_addr("a", "j", "u", &members).unwrap(), "h:1");
        let e = member_addr("x", "j", "u", &members)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "member x is not registered in job j at u; registered: a, b, c"
        );
        assert!(member_addr("b", "j", "u", &members)
            .unwrap_err()
            .to_string()
            .contains("no control address"));
        assert!(member_addr("c", "j", "u", &members)
            .unwrap_err()
            .to_string()
            .contains("not readable"));
        assert_eq!(
            member_addr("a", "j", "u", &[]).unwrap_err().to_string(),
            "job j has no registered members in etcd at u: is the daemon running, and is --job right?"
        );
    }

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        cmd: ControlCommand,
    }

    #[test]
    fn control_arguments() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["t"], args].concat());
        let Cli {
            cmd: ControlCommand::Drain { target, checkpoint },
        } = parse(&["drain", "--node", "n1", "--checkpoint", "--job", "x"]).unwrap()
        else {
            panic!("not drain")
        };
        assert!(checkpoint);
        assert_eq!(target.node.as_deref(), Some("n1"));
        assert_eq!(target.job, "x");
        assert_eq!(target.timeout_s, 5.0);
        assert!(parse(&["pause", "--addr", "h:1"]).is_ok());
        assert!(parse(&["resume"]).is_err(), "needs --node or --addr");
        assert!(
            parse(&["checkpoint", "--node", "a", "--addr", "h:1"]).is_err(),
            "not both"
        );
        assert!(parse(&["pause", "--addr", "h:1", "--timeout-s", "0"]).is_err());
    }

    /// A Control service with a fixed Status reply that accepts everything but Pause.
    struct Fake {
        status: StatusReply,
    }

    #[tonic::async_trait]
    impl Control for Fake {
        async fn status(
            &self,
            _: tonic::Request<StatusRequest>,
        ) -> Result<tonic::Response<StatusReply>, tonic::Status> {
            Ok(tonic::Response::new(self.status.clone()))
        }
        async fn drain(
            &self,
            r: tonic::Request<DrainRequest>,
        ) -> Result<tonic::Response<ControlReply>, tonic::Status> {
            let message = format!("draining (checkpoint: {})", r.into_inner().checkpoint);
            Ok(tonic::Response::new(ControlReply {
                accepted: true,
                message,
            }))
        }
        async fn checkpoint_now(
            &self,
            _: tonic::Request<CheckpointNowRequest>,
        ) -> Result<tonic::Response<ControlReply>, tonic::Status> {
            Ok(tonic::Response::new(ControlReply {
                accepted: true,
                message: "saving".into(),
            }))
        }
        async fn pause(
            &self,
            _: tonic::Request<PauseRequest>,
        ) -> Result<tonic::Response<ControlReply>, tonic::Status> {
            Ok(tonic::Response::new(ControlReply {
                accepted: false,
                message: "already paused".into(),
            }))
        }
        async fn resume(
            &self,
            _: tonic::Request<ResumeRequest>,
        ) -> Result<tonic::Response<ControlReply>, tonic::Status> {
            Err(tonic::Status::unavailable("shutting down"))
        }
    }

    /// The timeout of every call these tests expect to succeed: far above what a call on
    /// the loopback takes on a loaded machine (refused calls fail at once anyway).
    const WAIT_S: f64 = 30.0;

    /// Serves a [`Fake`] on a free port until the token is cancelled; the task ends once
    /// the server has stopped (its listener closed).
    async fn fake_server(status: StatusReply) -> (SocketAddr, CancellationToken, JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let token = CancellationToken::new();
        let stop = token.clone();
        let server = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(ControlServer::from_arc(Arc::new(Fake { status })))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    stop.cancelled_owned(),
                )
                .await
                .unwrap();
        });
        (addr, token, server)
    }

    /// A local port nobody listens on.
    async fn closed_port() -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    }

    fn target(addr: Option<String>, node: Option<&str>, etcd: &str, job: &str) -> Target {
        Target {
            etcd: etcd.into(),
            job: job.into(),
            node: node.map(str::to_string),
            addr,
            all: false,
            timeout_s: WAIT_S,
            tls: Default::default(),
            etcd_client: Default::default(),
        }
    }

    #[tokio::test]
    async fn control_and_query_against_a_fake_daemon() {
        let (addr, stop, _server) = fake_server(reply("a", 3, vec![0], true)).await;
        let t = target(Some(addr.to_string()), None, DEFAULT_ETCD, "j");

        control(ControlCommand::Drain {
            target: t.clone(),
            checkpoint: true,
        })
        .await
        .unwrap();
        control(ControlCommand::Checkpoint { target: t.clone() })
            .await
            .unwrap();
        let e = control(ControlCommand::Pause { target: t.clone() })
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("refused to pause: already paused"),
            "{e}"
        );
        let e = control(ControlCommand::Resume { target: t })
            .await
            .unwrap_err();
        assert!(e.to_string().contains("shutting down"), "{e}");

        let got = query_status(&addr.to_string(), Duration::from_secs_f64(WAIT_S), None)
            .await
            .unwrap();
        assert_eq!(got.step, 3);

        let dead = closed_port().await.to_string();
        let e = query_status(&dead, Duration::from_secs_f64(WAIT_S), None)
            .await
            .unwrap_err();
        assert!(e.to_lowercase().contains("refused"), "{e}");
        let e = control(ControlCommand::Pause {
            target: target(Some(dead), None, DEFAULT_ETCD, "j"),
        })
        .await
        .unwrap_err();
        assert!(e.to_string().contains("could not be asked to pause"), "{e}");
        stop.cancel();
    }

    #[tokio::test]
    async fn unreachable_etcd_is_one_clear_line() {
        let dead = format!("http://{}", closed_port().await);
        let args = StatusArgs {
            etcd: dead.clone(),
            job: "j".into(),
            json: true,
            timeout_s: WAIT_S,
            tls: Default::default(),
            etcd_client: Default::default(),
        };
        let e = status(args).await.unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("etcd at {dead} is unreachable (")),
            "{e}"
        );
        assert_eq!(
            e,
            format!("etcd at {dead} is unreachable (connection refused): start etcd or fix --etcd")
        );
        let e = control(ControlCommand::Pause {
            target: target(None, Some("a"), &dead, "j"),
        })
        .await
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with(&format!("etcd at {dead} is unreachable (")),
            "{e}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn status_end_to_end_with_etcd() {
        let server = match tokio::task::spawn_blocking(tenax_chaos::etcd::EtcdServer::start)
            .await
            .unwrap()
        {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                eprintln!("skipped: etcd is not installed");
                return;
            }
            Err(e) => panic!("starting etcd: {e}"),
        };
        let url = server.endpoint();
        let job = format!("status-test-{}", std::process::id());
        let args = StatusArgs {
            etcd: url.clone(),
            job: job.clone(),
            json: true,
            timeout_s: WAIT_S,
            tls: Default::default(),
            etcd_client: Default::default(),
        };
        let e = collect(&args).await.unwrap_err().to_string();
        assert_eq!(e, no_members(&job, &url));

        let (addr, stop, server) = fake_server(reply("a", 12, vec![0, 1], true)).await;
        let dead = closed_port().await;
        let etcd = EtcdMembership::connect(EtcdConfig::new(vec![url.clone()], job.clone()))
            .await
            .unwrap();
        let reg_a = etcd
            .register(
                "a",
                &serde_json::to_vec(&info("a", &addr.to_string())).unwrap(),
            )
            .await
            .unwrap();
        let _reg_b = etcd
            .register(
                "b",
                &serde_json::to_vec(&info("b", &dead.to_string())).unwrap(),
            )
            .await
            .unwrap();
        etcd.write_plan(None, 6, br#"{"any":"plan"}"#, &reg_a.writer())
            .await
            .unwrap();

        let summary = collect(&args).await.unwrap();
        assert_eq!(summary["generation"], json!(6));
        assert_eq!(summary["step"], json!(12));
        assert_eq!(summary["leader"], json!("a"));
        assert_eq!(summary["members"][0]["ranks"], json!([0, 1]));
        assert!(summary["members"][0]["error"].is_null());
        assert!(summary["members"][1]["error"].is_string(), "{summary}");
        status(args.clone()).await.unwrap();

        // --node resolves through etcd.
        control(ControlCommand::Checkpoint {
            target: target(None, Some("a"), &url, &job),
        })
        .await
        .unwrap();
        let e = control(ControlCommand::Checkpoint {
            target: target(None, Some("zz"), &url, &job),
        })
        .await
        .unwrap_err();
        assert!(e.to_string().contains("registered: a, b"), "{e}");

        // Nobody answers: the status is printed, then it is an error.
        stop.cancel();
        tokio::time::timeout(Duration::from_secs_f64(WAIT_S), server)
            .await
            .expect("the fake daemon stops")
            .unwrap();
        let e = status(args).await.unwrap_err().to_string();
        assert!(e.contains("none of the 2 registered member(s)"), "{e}");
    }
}
