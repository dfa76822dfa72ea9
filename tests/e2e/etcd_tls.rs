//! Daemons against an etcd that serves TLS only, requires client certificates
//! (`--client-cert-auth`) and has username/password authentication on
//! ([`tenax_chaos::EtcdServer::start_tls`], [`tenax_chaos::EtcdServer::enable_auth`]):
//! the `--etcd-ca/--etcd-cert/--etcd-key/--etcd-user` flags with the password from
//! `--etcd-password-file` or `TENAX_ETCD_PASSWORD`. A module of `tests/e2e.rs` (serial,
//! one candle thread); no verdict depends on time.

use std::path::Path;
use std::time::{Duration, Instant};

use tenax_chaos::{EtcdServer, EtcdUser};

use super::{
    cluster, committed_steps, corpus, daemon_train_flags, export_bytes, job_export, node_hashes,
    ok, tenax_env, wait_all_ok,
};

/// The user the daemons authenticate as; its role may read and write `/tenax/`.
const USER: EtcdUser<'static> = EtcdUser {
    name: "tenax",
    password: "e2e-etcd-password",
    prefix: "/tenax/",
};

/// A TLS etcd with client certificates required and authentication on.
fn tls_etcd() -> EtcdServer {
    let mut etcd = EtcdServer::start_tls().expect("start etcd with TLS (scripts/setup)");
    etcd.enable_auth("e2e-root-password", &USER)
        .expect("enable etcd auth with etcdctl (scripts/setup installs etcd-client)");
    etcd
}

/// `--etcd URL` and the TLS flags for `etcd`, and `--etcd-user`.
fn etcd_client_flags(etcd: &EtcdServer) -> Vec<String> {
    let f = etcd.tls_files().expect("a TLS etcd");
    let path = |p: &Path| p.to_string_lossy().into_owned();
    vec![
        "--etcd".into(),
        etcd.endpoint(),
        "--etcd-ca".into(),
        path(&f.ca),
        "--etcd-cert".into(),
        path(&f.client_cert),
        "--etcd-key".into(),
        path(&f.client_key),
        "--etcd-user".into(),
        USER.name.into(),
    ]
}

/// The flags after `--etcd URL`: what a daemon of the cluster gets (the cluster gives
/// `--etcd` itself).
fn tls_and_user_flags(etcd: &EtcdServer) -> Vec<String> {
    etcd_client_flags(etcd).split_off(2)
}

#[test]
fn two_daemons_train_against_etcd_over_tls_with_client_certs_and_auth() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let steps = 6;
    // The reference: `tenax train --ranks 2` with the same flags.
    let run = tmp.path().join("reference");
    let mut args: Vec<String> = vec!["train".into()];
    args.extend(daemon_train_flags(&data, steps, &[]));
    args.extend(["--ranks", "2", "--run-dir", run.to_str().unwrap()].map(String::from));
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let want = export_bytes(
        &format!("file://{}", run.join("checkpoints").display()),
        &[],
        &tmp.path().join("reference.safetensors"),
    );

    let etcd = tls_etcd();
    let job = "etcdtls";
    let mut c = cluster(job, &data, steps, &["--ckpt-every", "3"]);
    let password_file = tmp.path().join("etcd-password");
    std::fs::write(&password_file, format!("{}\n", USER.password)).unwrap();
    for n in 0..2 {
        c.set_node_etcd(n, Some(etcd.endpoint()));
    }
    let mut flags = tls_and_user_flags(&etcd);
    flags.extend(["--start-nodes".into(), "2".into()]);
    // Node 0 reads the password from a file, node 1 from the environment.
    let mut flags0 = flags.clone();
    flags0.extend([
        "--etcd-password-file".into(),
        password_file.to_string_lossy().into_owned(),
    ]);
    c.spawn_daemon(0, &flags0).unwrap();
    c.spawn_daemon_env(
        1,
        &flags,
        &[("TENAX_ETCD_PASSWORD".into(), USER.password.into())],
    )
    .unwrap();
    wait_all_ok(&mut c, &[0, 1], Duration::from_secs(300));

    let h0 = node_hashes(&c, 0);
    assert_eq!(
        h0.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        (1..=steps).collect::<Vec<_>>(),
        "node 0 recorded every step once"
    );
    assert_eq!(node_hashes(&c, 1), h0, "node 1 agrees with node 0");
    assert_eq!(committed_steps(&c, job), [3, 6]);
    let got = job_export(&c, job, &tmp.path().join("job.safetensors"));
    assert!(
        got == want,
        "the job's final weights differ from tenax train --ranks 2"
    );
    // The fenced checkpoint record went through the TLS etcd, as the user.
    let record = etcd
        .etcdctl(
            &[
                "get",
                &format!("/tenax/{job}/checkpoint"),
                "--print-value-only",
            ],
            "",
        )
        .unwrap();
    assert!(
        !record.trim().is_empty(),
        "no checkpoint record in the TLS etcd"
    );

    // `tenax status` reaches the same etcd with the same flags (the job is over: it finds
    // no member, which it can only know after TLS and authentication succeeded).
    let mut status: Vec<String> = vec!["status".into()];
    status.extend(etcd_client_flags(&etcd));
    status.extend(["--job".into(), job.into()]);
    let refs: Vec<&str> = status.iter().map(String::as_str).collect();
    let out = tenax_env(
        &refs,
        &[("TENAX_ETCD_PASSWORD".into(), USER.password.into())],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("has no registered members"),
        "tenax status over TLS with auth: {stderr}"
    );
}

/// The one `error:` line of a failed `tenax` run with `env`, and how long it took.
fn fails_env(args: &[String], env: &[(String, String)]) -> (String, Duration) {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let t = Instant::now();
    let out = tenax_env(&refs, env);
    let took = t.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    eprintln!("tenax {} stderr:\n{stderr}", args[0]);
    assert!(
        !out.status.success(),
        "tenax {args:?} should fail:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "want exactly one error line:\n{stderr}");
    // Only warnings (e.g. about --insecure) may come before it.
    assert_eq!(
        stderr.lines().find(|l| !l.starts_with("warning:")),
        Some(errors[0]),
        "the error is not the first line after the warnings:\n{stderr}"
    );
    (errors[0].to_string(), took)
}

#[test]
fn a_daemon_with_a_wrong_etcd_password_exits_with_one_line_naming_user_and_endpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let etcd = tls_etcd();
    let store = format!("file://{}", tmp.path().join("store").display());
    let mut args: Vec<String> = vec!["daemon".into(), "--job".into(), "wrongpw".into()];
    args.extend(etcd_client_flags(&etcd));
    args.extend(
        [
            "--store",
            &store,
            "--listen",
            "127.0.0.1:0",
            "--insecure",
            "--run-dir",
            tmp.path().join("run").to_str().unwrap(),
        ]
        .map(String::from),
    );
    args.extend(daemon_train_flags(&data, 2, &[]));
    let wrong = [("TENAX_ETCD_PASSWORD".to_string(), "not-it".to_string())];
    let (line, took) = fails_env(&args, &wrong);
    eprintln!("wrong password: {took:?}: {line}");
    assert!(line.contains(&etcd.endpoint()), "{line}");
    assert!(line.contains("user \"tenax\""), "{line}");
    assert!(line.contains("password"), "{line}");
    assert!(!line.contains("not-it"), "the password leaked: {line}");

    // The same from the daemon's TOML keys (the password in a file).
    let f = etcd.tls_files().unwrap();
    let wrong_file = tmp.path().join("wrong-password");
    std::fs::write(&wrong_file, "not-it\n").unwrap();
    let toml = tmp.path().join("daemon.toml");
    std::fs::write(
        &toml,
        format!(
            "etcd = {:?}\netcd_ca = {:?}\netcd_cert = {:?}\netcd_key = {:?}\n\
             etcd_user = \"tenax\"\netcd_password_file = {:?}\n",
            etcd.endpoint(),
            f.ca,
            f.client_cert,
            f.client_key,
            wrong_file
        ),
    )
    .unwrap();
    let flags = etcd_client_flags(&etcd).len();
    let mut from_toml: Vec<String> = args[..3].to_vec();
    from_toml.extend(args[3 + flags..].iter().cloned());
    from_toml.extend(["--config".into(), toml.to_string_lossy().into_owned()]);
    let (line, _) = fails_env(&from_toml, &[]);
    assert!(
        line.contains("user \"tenax\"") && line.contains(&etcd.endpoint()),
        "{line}"
    );

    // `tenax status` says the same, and so does a missing password.
    let mut status: Vec<String> = vec!["status".into()];
    status.extend(etcd_client_flags(&etcd));
    let (line, _) = fails_env(&status, &wrong);
    assert!(
        line.contains("user \"tenax\"") && line.contains(&etcd.endpoint()),
        "{line}"
    );
    let (line, _) = fails_env(&status, &[]);
    assert!(line.contains("TENAX_ETCD_PASSWORD"), "{line}");
}
