//! LocalCluster against a real etcd and a real `moto_server`, with a shell script standing
//! in for the `tenax` binary: it prints its arguments and part of its environment, exits 3
//! when given `--exit-now`, and otherwise sleeps (as `exec sleep`, so the PID the cluster
//! holds is the only process).

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tenax_chaos::{ClusterSpec, LocalCluster, Signal};

const FAKE_TENAX: &str = r#"#!/bin/sh
echo "args: $*"
echo "env: TEST_VAR=$TENAX_TEST_VAR AWS_ENDPOINT=$AWS_ENDPOINT"
case " $* " in
  *" --exit-now "*) exit 3 ;;
esac
exec sleep 30
"#;

fn fake_tenax(dir: &Path) -> PathBuf {
    let path = dir.join("fake-tenax");
    std::fs::write(&path, FAKE_TENAX).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Waits until node `node`'s log holds `n` lines starting with `args:`, and returns them.
fn args_lines(cluster: &LocalCluster, node: usize, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines: Vec<String> = cluster
            .log(node)
            .lines()
            .filter(|l| l.starts_with("args: "))
            .map(str::to_string)
            .collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "node {node}: {n} start(s) not in log:\n{}",
            cluster.log(node)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether a process with this PID exists (`kill -0`).
fn alive(pid: u32) -> bool {
    Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

#[test]
fn spawns_signals_restarts_and_tears_down_daemons() {
    let bin_dir = tempfile::tempdir().unwrap();
    let spec = ClusterSpec {
        tenax_bin: fake_tenax(bin_dir.path()),
        job: "job-a".to_string(),
        bucket: "cluster-test".to_string(),
        daemon_args: vec!["--preset".into(), "tiny".into()],
        env: vec![("TENAX_TEST_VAR".into(), "forty-two".into())],
        tls: false,
    };
    let mut cluster = LocalCluster::start(spec).expect("start etcd and moto_server");
    assert!(cluster.etcd().is_healthy());
    assert_eq!(cluster.store_url(), "s3://cluster-test/ckpt");
    assert_eq!(LocalCluster::node_id(1), "node-1");
    assert_eq!(cluster.run_dir(1), cluster.dir().join("node-1"));
    assert_eq!(cluster.log_path(1), cluster.dir().join("node-1.log"));
    assert_eq!(cluster.nodes(), 0);
    assert_eq!(cluster.pid(0), None);
    assert_eq!(cluster.log(0), "");
    assert_eq!(
        cluster.wait(0, Duration::ZERO).unwrap_err().kind(),
        std::io::ErrorKind::InvalidInput
    );

    cluster.spawn_daemon(0, &[]).unwrap();
    cluster
        .spawn_daemon(1, &["--steps".into(), "7".into()])
        .unwrap();
    assert_eq!(cluster.nodes(), 2);
    assert_eq!(cluster.starts(1), 1);

    // The command line, exactly.
    let line = &args_lines(&cluster, 1, 1)[0];
    let expected = format!(
        "args: daemon --job job-a --etcd {} --store s3://cluster-test/ckpt --listen {} \
         --metrics-listen {} --node-id node-1 --run-dir {} --insecure --preset tiny --steps 7",
        cluster.etcd_endpoint(),
        cluster.listen_addr(1).unwrap(),
        cluster.metrics_addr(1).unwrap(),
        cluster.run_dir(1).display(),
    );
    assert_eq!(line, &expected);
    assert!(cluster.run_dir(1).is_dir());
    assert_ne!(cluster.listen_addr(0), cluster.listen_addr(1));
    assert_ne!(cluster.listen_addr(1), cluster.metrics_addr(1));
    let log = cluster.log(1);
    assert!(
        log.starts_with("--- tenax-chaos: node-1 start 1 ---\n"),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "env: TEST_VAR=forty-two AWS_ENDPOINT={}",
            cluster.s3().endpoint()
        )),
        "{log}"
    );
    assert!(cluster
        .s3_env()
        .contains(&("AWS_ENDPOINT".into(), cluster.s3().endpoint())));

    // A running node cannot be spawned twice.
    assert_eq!(
        cluster.spawn_daemon(1, &[]).unwrap_err().kind(),
        std::io::ErrorKind::AlreadyExists
    );

    // SIGTERM ends node 0; its PID is forgotten once reaped.
    args_lines(&cluster, 0, 1);
    assert_eq!(cluster.wait(0, Duration::ZERO).unwrap(), None);
    cluster.signal(0, Signal::Term).unwrap();
    let status = cluster
        .wait(0, Duration::from_secs(10))
        .unwrap()
        .expect("exited");
    assert_eq!(status.signal(), Some(Signal::Term.number()));
    assert_eq!(cluster.pid(0), None);
    assert_eq!(cluster.wait(0, Duration::ZERO).unwrap(), Some(status));
    assert_eq!(
        cluster.signal(0, Signal::Term).unwrap_err().kind(),
        std::io::ErrorKind::NotFound
    );

    // SIGSTOP keeps node 1 alive, SIGCONT resumes it, SIGKILL ends it.
    cluster.signal(1, Signal::Stop).unwrap();
    assert_eq!(cluster.wait(1, Duration::from_millis(200)).unwrap(), None);
    cluster.signal(1, Signal::Cont).unwrap();
    cluster.signal(1, Signal::Kill).unwrap();
    let status = cluster
        .wait(1, Duration::from_secs(10))
        .unwrap()
        .expect("exited");
    assert_eq!(status.signal(), Some(Signal::Kill.number()));

    // A restarted node appends to the same log; its exit code comes back.
    cluster.spawn_daemon(0, &["--exit-now".into()]).unwrap();
    let status = cluster
        .wait(0, Duration::from_secs(10))
        .unwrap()
        .expect("exited");
    assert_eq!(status.code(), Some(3));
    assert_eq!(cluster.starts(0), 2);
    let lines = args_lines(&cluster, 0, 2);
    assert!(lines[1].ends_with("--preset tiny --exit-now"), "{lines:?}");
    assert!(cluster
        .log(0)
        .contains("--- tenax-chaos: node-0 start 2 ---"));

    // wait_all: exited nodes report their status, running and never-started ones None.
    cluster.spawn_daemon(3, &[]).unwrap();
    args_lines(&cluster, 3, 1);
    let statuses = cluster.wait_all(Duration::from_millis(100)).unwrap();
    assert_eq!(statuses.len(), 4);
    assert_eq!(statuses[0].and_then(|s| s.code()), Some(3));
    assert_eq!(statuses[1].and_then(|s| s.signal()), Some(9));
    assert_eq!(statuses[2], None);
    assert_eq!(statuses[3], None);

    // Drop kills what runs (node 3 and a fresh node 1) and both servers.
    cluster.spawn_daemon(1, &[]).unwrap();
    args_lines(&cluster, 1, 2);
    let pids = [
        cluster.pid(1).unwrap(),
        cluster.pid(3).unwrap(),
        cluster.etcd().pid().unwrap(),
        cluster.s3().pid(),
    ];
    let dir = cluster.dir().to_path_buf();
    assert!(pids.iter().all(|&pid| alive(pid)));
    drop(cluster);
    for pid in pids {
        assert!(!alive(pid), "pid {pid} survived the drop");
    }
    assert!(!dir.exists());
}

#[test]
fn kill_all_ends_every_daemon() {
    let bin_dir = tempfile::tempdir().unwrap();
    let mut spec = ClusterSpec::new(fake_tenax(bin_dir.path()), "job-b");
    spec.bucket = "cluster-kill-all".to_string();
    // The fake binary makes no certificates.
    spec.tls = false;
    let mut cluster = LocalCluster::start(spec).expect("start etcd and moto_server");
    for node in 0..2 {
        cluster.spawn_daemon(node, &[]).unwrap();
    }
    let pids = [cluster.pid(0).unwrap(), cluster.pid(1).unwrap()];
    cluster.kill_all();
    assert_eq!(cluster.pid(0), None);
    assert_eq!(cluster.pid(1), None);
    let statuses = cluster.wait_all(Duration::ZERO).unwrap();
    assert!(
        statuses
            .iter()
            .all(|s| s.and_then(|s| s.signal()) == Some(9)),
        "{statuses:?}"
    );
    for pid in pids {
        assert!(!alive(pid), "pid {pid} survived kill_all");
    }
    // Servers still run until the handle is dropped.
    assert!(cluster.etcd().is_healthy());
}
