//! `tenax bench state-copy` and its donor process: the state copy between peers (the
//! state stream and gRPC `FetchState`, with and without mutual TLS) against a bare TCP
//! (and TLS) copy of the same bytes, side by side.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tenax_core::rng::SplitMix64;

use crate::bench::median;

/// Flags of `tenax bench state-copy`.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchStateCopyArgs {
    /// Parameters of the state (three f32 vectors of this length travel: parameters and
    /// AdamW's two moments; gpt2-small has 124M).
    #[arg(long, default_value_t = 33_333_333)]
    pub params: usize,
    /// Copies measured (after one warm-up copy).
    #[arg(long, default_value_t = 3)]
    pub copies: usize,
}

/// Flags of the donor process `tenax bench state-copy` starts.
#[derive(Clone, Debug, clap::Args)]
pub struct StateDonorArgs {
    /// Parameters of the state it serves.
    #[arg(long)]
    pub params: usize,
    /// Also serve it over mutual TLS, as node `donor`, with the CA and certificates in
    /// this folder (`tenax certs` layout).
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
}

const BENCH_JOB: &str = "bench-state-copy";

/// Writes the state's three vectors as little-endian bytes to `conn`, in blocks of 2^20
/// values (the bare-socket baselines of `tenax bench state-copy`).
fn write_state_raw(conn: &mut dyn std::io::Write, snap: &tenax_cluster::peer::StateSnapshot) {
    let mut block = Vec::with_capacity(4 << 20);
    for values in [&snap.params, &snap.m, &snap.v] {
        for piece in values.chunks(1 << 20) {
            block.clear();
            for v in piece {
                block.extend_from_slice(&v.to_le_bytes());
            }
            if conn.write_all(&block).is_err() {
                return;
            }
        }
    }
    let _ = conn.flush();
}

/// Reads three vectors of `n` values as `write_state_raw` sends them, decoded into f32
/// vectors; returns GB/s.
fn read_state_raw(conn: &mut dyn std::io::Read, n: usize, t0: Instant) -> Result<f64> {
    let mut block = vec![0u8; 4 << 20];
    let mut tensors: Vec<Vec<f32>> = Vec::new();
    for _ in 0..3 {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let take = (n - out.len()).min(1 << 20);
            conn.read_exact(&mut block[..take * 4])?;
            out.extend(
                block[..take * 4]
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
        }
        tensors.push(out);
    }
    Ok((12 * n) as f64 / t0.elapsed().as_secs_f64() / 1e9)
}

/// The donor side of `tenax bench state-copy`: publishes a state of `--params` random
/// values and serves it until its stdin closes, printing `listening A B C D` on stdout:
/// the peer port (gRPC and the state stream, [`PeerHub::incoming`]), a bare TCP socket
/// (the bytes only), and with `--tls-dir` the peer port over mutual TLS and a bare TLS
/// socket.
pub async fn state_donor(a: StateDonorArgs) -> Result<()> {
    use tenax_cluster::peer::{HubConfig, PeerHub, StateSnapshot};
    let hub = PeerHub::new(BENCH_JOB, HubConfig::default());
    let mut rng = SplitMix64::new(5);
    let mut vector = || -> Vec<f32> {
        (0..a.params)
            .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
            .collect()
    };
    let snap = StateSnapshot {
        step: 1,
        cursor: 0,
        opt_step: 1,
        param_hash: String::new(),
        params: vector(),
        m: vector(),
        v: vector(),
        guard_state: Vec::new(),
    };
    let snap = std::sync::Arc::new(snap);
    let _publication = hub.publish_state(1, snap.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding a loopback port")?;
    // The baseline: the same bytes over a plain TCP socket, no framing, no checks.
    let raw = std::net::TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
    // The same state over mutual TLS, on a third port, and a bare TLS socket on a fourth.
    let mut tls_server = None;
    let (mut tls_addr, mut raw_tls_addr) = (String::new(), String::new());
    if let Some(dir) = &a.tls_dir {
        let who = tenax_cluster::tls::PeerIdentity::Node("donor".into());
        let tls = tenax_cluster::tls::Tls::load(tenax_cluster::tls::TlsFiles::in_folder(dir, &who))
            .map_err(|e| anyhow!("{e}"))?;
        let tls_hub = PeerHub::with_tls(BENCH_JOB, HubConfig::default(), Some(tls.clone()));
        let publication = tls_hub.publish_state(1, snap.clone());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding a loopback port")?;
        tls_addr = l.local_addr()?.to_string();
        let incoming = tls.incoming(l).map_err(|e| anyhow!("{e}"))?;
        let raw_tls =
            std::net::TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
        raw_tls_addr = raw_tls.local_addr()?.to_string();
        let config = tls.current().server_config().map_err(|e| anyhow!("{e}"))?;
        let snap = snap.clone();
        std::thread::spawn(move || {
            for conn in raw_tls.incoming() {
                let Ok(conn) = conn else { return };
                let _ = conn.set_nodelay(true);
                let Ok(session) = rustls::ServerConnection::new(config.clone()) else {
                    return;
                };
                let mut stream = rustls::StreamOwned::new(session, conn);
                write_state_raw(&mut stream, &snap);
            }
        });
        tls_server = Some((tls_hub, publication, incoming));
    }
    println!(
        "listening {} {} {tls_addr} {raw_tls_addr}",
        listener.local_addr()?,
        raw.local_addr()?
    );
    {
        let snap = snap.clone();
        std::thread::spawn(move || {
            for conn in raw.incoming() {
                let Ok(mut conn) = conn else { return };
                let _ = conn.set_nodelay(true);
                write_state_raw(&mut conn, &snap);
            }
        });
    }
    let stop = tokio_util::sync::CancellationToken::new();
    {
        let stop = stop.clone();
        tokio::task::spawn_blocking(move || {
            let mut sink = String::new();
            let _ = std::io::stdin().read_line(&mut sink);
            stop.cancel();
        });
    }
    let server = || {
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(tenax_cluster::peer::STREAM_WINDOW_BYTES))
            .initial_connection_window_size(Some(tenax_cluster::peer::CONNECTION_WINDOW_BYTES))
            .max_frame_size(tenax_cluster::peer::MAX_HTTP2_FRAME_BYTES)
    };
    // The TLS hub's publication lives as long as the servers do.
    let mut _tls_publication = None;
    if let Some((tls_hub, publication, incoming)) = tls_server {
        _tls_publication = Some(publication);
        let stop = stop.clone();
        let router = server().add_service(tls_hub.service());
        let incoming = tls_hub.incoming(incoming);
        tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(incoming, stop.cancelled())
                .await
        });
    }
    server()
        .add_service(hub.service())
        .serve_with_incoming_shutdown(
            hub.incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
            stop.cancelled(),
        )
        .await
        .context("serving the state")?;
    Ok(())
}

/// Throughput of the state copy a joining daemon makes from a donor: a donor process and
/// this one on loopback, over gRPC `FetchState` and over the state stream (chunked,
/// checksummed), each without and with mutual TLS, against bare TCP and bare TLS sockets
/// carrying the same bytes, in alternating rounds.
pub async fn state_copy(a: BenchStateCopyArgs) -> Result<()> {
    use std::io::BufRead;
    use tenax_cluster::peer::{fetch_state, HubConfig, PeerAddr, PeerHub};
    if a.copies == 0 {
        bail!("--copies 0: the median needs at least one measured copy; pass --copies 1 or more");
    }
    if a.params == 0 {
        bail!("--params 0: an empty state has nothing to copy; pass --params 1 or more");
    }
    let exe = std::env::current_exe().context("the tenax binary")?;
    // A throwaway CA: the donor serves as node `donor`, this process fetches as `receiver`.
    let tmp = tempfile::tempdir().context("temp dir")?;
    let tls_dir = tmp.path().join("tls");
    tenax_cluster::tls::init_ca(&tls_dir, 1).map_err(|e| anyhow!("{e}"))?;
    let mut receiver_files = None;
    for id in ["donor", "receiver"] {
        let who = tenax_cluster::tls::PeerIdentity::Node(id.into());
        let files =
            tenax_cluster::tls::issue(&tls_dir, &who, &tls_dir, 1).map_err(|e| anyhow!("{e}"))?;
        receiver_files = Some(files);
    }
    let receiver_tls =
        tenax_cluster::tls::Tls::load(receiver_files.context("receiver certificate")?)
            .map_err(|e| anyhow!("{e}"))?;
    let mut child = std::process::Command::new(&exe)
        .args([
            "bench",
            "state-donor",
            "--params",
            &a.params.to_string(),
            "--tls-dir",
        ])
        .arg(&tls_dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting the donor process")?;
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().context("donor stdout")?)
        .read_line(&mut first)
        .context("reading the donor's address")?;
    let addrs: Vec<String> = first
        .trim()
        .strip_prefix("listening ")
        .map(|a| a.split(' ').map(str::to_string).collect())
        .unwrap_or_default();
    let [addr, raw_addr, tls_addr, raw_tls_addr] =
        <[String; 4]>::try_from(addrs).map_err(|_| {
            let _ = child.kill();
            anyhow!("the donor process did not start: {first:?}")
        })?;
    let grpc_only = HubConfig {
        state_stream: false,
        ..HubConfig::default()
    };
    let hub = PeerHub::new(BENCH_JOB, grpc_only.clone());
    let stream_hub = PeerHub::new(BENCH_JOB, HubConfig::default());
    let tls_hub = PeerHub::with_tls(BENCH_JOB, grpc_only, Some(receiver_tls.clone()));
    let tls_stream_hub =
        PeerHub::with_tls(BENCH_JOB, HubConfig::default(), Some(receiver_tls.clone()));
    let donor = PeerAddr {
        id: "donor".into(),
        addr,
    };
    let tls_donor = PeerAddr {
        id: "donor".into(),
        addr: tls_addr,
    };
    let (client_config, donor_name) = receiver_tls
        .current()
        .rustls_client_for_node("donor")
        .map_err(|e| anyhow!("{e}"))?;
    let mut rates = Vec::new();
    let mut stream_rates = Vec::new();
    let mut tls_rates = Vec::new();
    let mut tls_stream_rates = Vec::new();
    let mut raw_rates = Vec::new();
    let mut raw_tls_rates = Vec::new();
    let mut bytes = 0;
    let mut outcome = Ok(());
    // Rounds alternate every path, so that the machine's noise falls on all alike.
    'rounds: for i in 0..=a.copies {
        for (hub, donor, rates) in [
            (&hub, &donor, &mut rates),
            (&stream_hub, &donor, &mut stream_rates),
            (&tls_hub, &tls_donor, &mut tls_rates),
            (&tls_stream_hub, &tls_donor, &mut tls_stream_rates),
        ] {
            match fetch_state(hub, 1, "receiver", donor, 1, "", Duration::from_secs(600)).await {
                Ok((snap, stats)) => {
                    if snap.params.len() != a.params {
                        outcome = Err(anyhow!("the copy has {} parameters", snap.params.len()));
                        break 'rounds;
                    }
                    bytes = stats.bytes;
                    if i > 0 {
                        rates.push(stats.gb_per_s());
                    }
                }
                Err(e) => {
                    outcome = Err(anyhow!("{e}"));
                    break 'rounds;
                }
            }
        }
        // Baselines: bare TCP and bare TLS sockets, the same bytes, decoded into the same
        // vectors.
        for tls in [false, true] {
            let addr = if tls {
                raw_tls_addr.clone()
            } else {
                raw_addr.clone()
            };
            let n = a.params;
            let (config, name) = (client_config.clone(), donor_name.clone());
            let r = tokio::task::spawn_blocking(move || -> Result<f64> {
                let t0 = Instant::now();
                let conn = std::net::TcpStream::connect(&addr)?;
                conn.set_nodelay(true)?;
                if tls {
                    let session = rustls::ClientConnection::new(config, name)?;
                    let mut stream = rustls::StreamOwned::new(session, conn);
                    read_state_raw(&mut stream, n, t0)
                } else {
                    let mut conn = conn;
                    read_state_raw(&mut conn, n, t0)
                }
            })
            .await
            .context("the baseline copy")?;
            match r {
                Ok(g) if i > 0 => {
                    if tls {
                        raw_tls_rates.push(g)
                    } else {
                        raw_rates.push(g)
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    outcome = Err(anyhow!("baseline copy over a bare socket (TLS {tls}): {e}"));
                    break 'rounds;
                }
            }
        }
    }
    drop(child.stdin.take());
    let _ = child.wait();
    outcome?;
    let grpc = median(rates.clone());
    let stream = median(stream_rates.clone());
    let mtls = median(tls_rates.clone());
    let mtls_stream = median(tls_stream_rates.clone());
    let raw = median(raw_rates.clone());
    let raw_tls = median(raw_tls_rates.clone());
    println!(
        "{}",
        serde_json::json!({
            "bench": "state-copy", "params": a.params, "bytes": bytes, "copies": a.copies,
            "gb_per_s": rates, "gb_per_s_median": grpc,
            "stream_gb_per_s": stream_rates, "stream_gb_per_s_median": stream,
            "plain_tcp_gb_per_s": raw_rates, "plain_tcp_gb_per_s_median": raw,
            "bare_tls_gb_per_s": raw_tls_rates, "bare_tls_gb_per_s_median": raw_tls,
            "state_copy_over_plain_tcp": grpc / raw,
            "stream_over_plain_tcp": stream / raw,
            "mtls_gb_per_s": tls_rates, "mtls_gb_per_s_median": mtls,
            "mtls_stream_gb_per_s": tls_stream_rates, "mtls_stream_gb_per_s_median": mtls_stream,
            "mtls_state_copy_over_plain_tcp": mtls / raw, "mtls_over_plain_grpc": mtls / grpc,
            "mtls_stream_over_plain_tcp": mtls_stream / raw,
            "mtls_stream_over_bare_tls": mtls_stream / raw_tls,
            "bare_tls_over_plain_tcp": raw_tls / raw,
        })
    );
    Ok(())
}
