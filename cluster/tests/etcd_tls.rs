//! The etcd driver against a real etcd over TLS with client certificates
//! ([`tenax_chaos::EtcdServer::start_tls`], `--client-cert-auth`) and with etcd's
//! username/password authentication enabled through `etcdctl`
//! ([`tenax_chaos::EtcdServer::enable_auth`]). Each test starts its own server (killed on
//! drop).
//!
//! Waits are bounded polls with generous deadlines; the times measured are printed
//! (`--nocapture`) and never decide a verdict.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tenax_chaos::{EtcdServer, EtcdServerOptions, EtcdTlsFiles, EtcdUser};
use tenax_cluster::etcd::{
    EtcdAuth, EtcdConfig, EtcdError, EtcdMembership, EtcdTls, FenceOutcome, LeaseState,
    MemberEvent, MemberWatch, PlanUpdate, PlanWatch, WatchStatus, WriteOutcome,
};

/// The most any single wait in these tests may take; far above what it needs.
const WAIT: Duration = Duration::from_secs(30);

/// etcd's root password in these tests.
const ROOT_PASSWORD: &str = "root-pw-for-tests";

/// The user the driver authenticates as, with read-write on `/tenax/`.
const USER: EtcdUser<'static> = EtcdUser {
    name: "tenax",
    password: "tenax-pw-for-tests",
    prefix: "/tenax/",
};

/// Starts a TLS etcd with `options` (TLS forced on), and turns on authentication with
/// [`USER`] when `auth`.
fn start_etcd(mut options: EtcdServerOptions, auth: bool) -> Result<EtcdServer> {
    let t = Instant::now();
    options.tls = true;
    let mut server = tokio::task::block_in_place(|| EtcdServer::start_with(&options))
        .context("starting etcd with TLS")?;
    if auth {
        tokio::task::block_in_place(|| server.enable_auth(ROOT_PASSWORD, &USER))
            .context("enabling etcd auth with etcdctl")?;
    }
    eprintln!("etcd {} up in {:?}", server.endpoint(), t.elapsed());
    Ok(server)
}

fn files(server: &EtcdServer) -> &EtcdTlsFiles {
    server.tls_files().expect("a TLS server")
}

fn read(path: &std::path::Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The CA and the client certificate of `server`.
fn tls(server: &EtcdServer) -> EtcdTls {
    let f = files(server);
    EtcdTls::new(read(&f.ca)).with_client_cert(read(&f.client_cert), read(&f.client_key))
}

/// A config for `job` on `server` with TLS, the client certificate and, if given, a user.
fn config(server: &EtcdServer, job: &str, auth: Option<EtcdAuth>) -> EtcdConfig {
    let mut c = EtcdConfig::new(vec![server.endpoint()], job);
    c.lease_ttl_s = 5;
    c.backoff_initial = Duration::from_millis(50);
    c.backoff_max = Duration::from_millis(500);
    c.max_retries = 8;
    c.tls = Some(tls(server));
    c.auth = auth;
    c
}

fn user() -> Option<EtcdAuth> {
    Some(EtcdAuth::new(USER.name, USER.password))
}

/// A small JSON plan for generation `g`.
fn plan(g: u64) -> Vec<u8> {
    format!(r#"{{"members": ["a"], "dp": {g}}}"#).into_bytes()
}

/// The next update of `watch`, at most [`WAIT`] away.
async fn next(watch: &mut PlanWatch) -> Result<PlanUpdate> {
    match tokio::time::timeout(WAIT, watch.recv()).await {
        Ok(Some(u)) => Ok(u),
        Ok(None) => bail!("the watch ended: {:?}", watch.status()),
        Err(_) => bail!("no plan within {WAIT:?}; watch status {:?}", watch.status()),
    }
}

/// The next event of a member watch, at most [`WAIT`] away.
async fn next_member(watch: &mut MemberWatch) -> Result<MemberEvent> {
    match tokio::time::timeout(WAIT, watch.recv()).await {
        Ok(Some(e)) => Ok(e),
        Ok(None) => bail!("the member watch ended: {:?}", watch.status()),
        Err(_) => bail!(
            "no member event within {WAIT:?}; status {:?}",
            watch.status()
        ),
    }
}

/// A raw etcd client as root (TLS, client certificate), for what the driver does not do.
async fn root_client(server: &EtcdServer) -> Result<etcd_client::Client> {
    let options = etcd_client::ConnectOptions::new()
        .with_tls(
            etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read(&files(server).ca)))
                .identity(etcd_client::Identity::from_pem(
                    read(&files(server).client_cert),
                    read(&files(server).client_key),
                )),
        )
        .with_user("root", ROOT_PASSWORD);
    Ok(etcd_client::Client::connect([server.endpoint()], Some(options)).await?)
}

/// Waits until etcd sees `lease`'s remaining TTL go up (a keep-alive arrived), at most
/// [`WAIT`]; returns the TTL seen then.
async fn lease_refreshed(raw: &mut etcd_client::Client, lease: i64) -> Result<i64> {
    let since = Instant::now();
    let mut prev = raw.lease_time_to_live(lease, None).await?.ttl();
    loop {
        ensure!(
            since.elapsed() < WAIT,
            "no refresh of lease {lease:#x} within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let ttl = raw.lease_time_to_live(lease, None).await?.ttl();
        ensure!(ttl > 0, "lease {lease:#x} expired");
        if ttl > prev {
            return Ok(ttl);
        }
        prev = ttl;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_registers_leads_and_commits_over_tls_with_a_client_certificate_and_a_user(
) -> Result<()> {
    let etcd = start_etcd(EtcdServerOptions::default(), true)?;
    ensure!(
        etcd.endpoint().starts_with("https://"),
        "{}",
        etcd.endpoint()
    );
    let m = EtcdMembership::connect(config(&etcd, "tls", user())).await?;
    let reg = m.register("a", b"host-a:1").await?;
    let w = reg.writer();
    let leadership = m
        .campaign(&w, WAIT)
        .await?
        .context("no leadership within the wait")?;
    assert_eq!(leadership.info.member_id, "a");
    let out = m.write_plan(None, 1, &plan(1), &w).await?;
    assert!(matches!(out, WriteOutcome::Written { .. }), "{out:?}");
    let out = m.fenced_put("commits/1", b"step-1", 1, &w).await?;
    assert!(matches!(out, FenceOutcome::Committed { .. }), "{out:?}");
    assert_eq!(m.get("commits/1").await?.as_deref(), Some(&b"step-1"[..]));
    let members = m.members().await?;
    assert_eq!(members.len(), 1);
    assert_eq!(m.leader().await?.map(|l| l.member_id).as_deref(), Some("a"));

    // What the driver wrote is there for etcdctl too, as root over TLS.
    let stored = tokio::task::block_in_place(|| {
        etcd.etcdctl(&["get", "/tenax/tls/commits/1", "--print-value-only"], "")
    })?;
    assert_eq!(stored.trim(), "step-1");

    m.resign(leadership).await?;
    reg.revoke().await?;
    assert_eq!(m.token_renewals(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_or_user_is_a_one_line_error_naming_the_user_and_the_endpoint(
) -> Result<()> {
    let mut etcd = start_etcd(EtcdServerOptions::default(), false)?;
    // A user given while etcd has authentication off.
    let err = EtcdMembership::connect(config(&etcd, "auth", user()))
        .await
        .expect_err("authenticating with auth off");
    eprintln!("auth off: {err}");
    assert!(matches!(err, EtcdError::Auth { .. }), "{err:?}");
    assert!(err.to_string().contains("not enabled"), "{err}");

    tokio::task::block_in_place(|| etcd.enable_auth(ROOT_PASSWORD, &USER))?;
    let wrong_password = EtcdAuth::new(USER.name, "not-the-password");
    let wrong_user = EtcdAuth::new("nobody", USER.password);
    for (auth, who) in [
        (wrong_password, "user \"tenax\""),
        (wrong_user, "user \"nobody\""),
    ] {
        let t = Instant::now();
        let err = EtcdMembership::connect(config(&etcd, "auth", Some(auth)))
            .await
            .expect_err("a wrong password or user");
        let text = err.to_string();
        eprintln!("{who}: {:?}: {text}", t.elapsed());
        // Refused credentials are never retried: the variant says so.
        assert!(matches!(err, EtcdError::Auth { .. }), "{err:?}");
        assert!(!text.contains('\n'), "not one line: {text}");
        assert!(text.contains(&etcd.endpoint()), "{text}");
        assert!(text.contains(who), "{text}");
        assert!(text.contains("check the user and its password"), "{text}");
        assert!(
            !text.contains("not-the-password"),
            "the password leaked: {text}"
        );
        assert!(!format!("{err:?}").contains("not-the-password"));
        ensure!(t.elapsed() < WAIT, "took {:?}", t.elapsed());
    }

    // No user at all: etcd takes the client certificate's common name as the user, which
    // is no etcd user here: refused, and the error says a user is needed.
    let err = EtcdMembership::connect(config(&etcd, "auth", None))
        .await
        .expect_err("no user");
    eprintln!("no user: {err}");
    assert!(matches!(err, EtcdError::Auth { .. }), "{err:?}");
    assert!(err.to_string().contains("a client without a user"), "{err}");
    assert!(err.to_string().contains("give a user"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_trusted_client_certificate_the_connection_is_refused_clearly() -> Result<()> {
    let etcd = start_etcd(EtcdServerOptions::default(), true)?;
    let f = files(&etcd).clone();
    let ca = read(&f.ca);
    let cases = [
        (
            "no client certificate, no user",
            EtcdTls::new(ca.clone()),
            None,
        ),
        (
            "no client certificate, a user",
            EtcdTls::new(ca.clone()),
            user(),
        ),
        (
            "a client certificate of another CA",
            EtcdTls::new(ca.clone()).with_client_cert(
                read(&f.untrusted_client_cert),
                read(&f.untrusted_client_key),
            ),
            user(),
        ),
        (
            "a CA that did not sign etcd's certificate",
            EtcdTls::new(read(&f.untrusted_client_cert))
                .with_client_cert(read(&f.client_cert), read(&f.client_key)),
            user(),
        ),
    ];
    for (what, tls, auth) in cases {
        let mut c = config(&etcd, "notls", auth);
        c.tls = Some(tls);
        let t = Instant::now();
        let err = EtcdMembership::connect(c).await.expect_err(what);
        let text = err.to_string();
        eprintln!("{what}: {:?}: {text}", t.elapsed());
        assert!(matches!(err, EtcdError::Tls { .. }), "{what}: {err:?}");
        assert!(text.contains(&etcd.endpoint()), "{what}: {text}");
        assert!(text.contains("client certificate"), "{what}: {text}");
    }

    // Plain http:// to a TLS etcd: the config says what is wrong before any connection.
    let mut c = config(&etcd, "notls", user());
    c.endpoints = vec![etcd.endpoint().replace("https://", "http://")];
    let err = EtcdMembership::connect(c)
        .await
        .expect_err("http:// with TLS");
    assert!(matches!(err, EtcdError::InvalidConfig { .. }), "{err:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_renewed_across_an_etcd_restart_for_calls_keepalive_and_watches() -> Result<()>
{
    // etcd replays the Authenticate entries of its log on a restart: the tokens issued
    // since its last snapshot survive. A snapshot after every entry (3.4's default is
    // every 100 000) makes the restart lose them, as a real one does after a snapshot.
    let options = EtcdServerOptions {
        extra_args: vec!["--snapshot-count".into(), "1".into()],
        ..EtcdServerOptions::default()
    };
    let mut etcd = start_etcd(options, true)?;
    let m = EtcdMembership::connect(config(&etcd, "renew", user())).await?;
    let leader = m.register("leader", b"").await?;
    let w = leader.writer();
    m.write_plan(None, 1, &plan(1), &w).await?;
    let mut watch = m.watch_plan().await;
    assert_eq!(next(&mut watch).await?.generation, 1);
    let mut members = m.watch_members();
    ensure!(
        matches!(next_member(&mut members).await?, MemberEvent::Snapshot { ref members, .. } if members.len() == 1),
        "first member event is not the snapshot of one member"
    );

    // A restart loses every token etcd handed out (simple tokens live in memory).
    let down = Instant::now();
    tokio::task::block_in_place(|| etcd.restart())?;
    eprintln!("etcd restarted in {:?}", down.elapsed());

    // Calls: refused with "invalid auth token", renewed, sent again.
    let stored = m.read_plan().await?.context("plan after restart")?;
    assert_eq!(stored.generation, 1);
    ensure!(
        m.token_renewals() >= 1,
        "a read after the restart did not renew the token"
    );
    let out = m.write_plan(Some(1), 2, &plan(2), &w).await?;
    assert!(matches!(out, WriteOutcome::Written { .. }), "{out:?}");
    m.write_plan(Some(2), 3, &plan(3), &w).await?;

    // The plan watch resumed (with a new token) and delivers both plans.
    assert_eq!(next(&mut watch).await?.generation, 2);
    assert_eq!(next(&mut watch).await?.generation, 3);
    ensure!(watch.reconnects() >= 1, "the plan watch never reconnected");
    ensure!(
        matches!(watch.status(), WatchStatus::Watching),
        "plan watch status {:?}",
        watch.status()
    );
    eprintln!(
        "plan watch reconnects: {}, token renewals: {}",
        watch.reconnects(),
        m.token_renewals()
    );

    // The member watch too: a new registration after the restart is seen.
    let b = m.register("b", b"").await?;
    let since = Instant::now();
    loop {
        ensure!(
            since.elapsed() < WAIT,
            "member b not seen by the member watch"
        );
        if let MemberEvent::Put { member, .. } = next_member(&mut members).await? {
            if member.id == "b" {
                break;
            }
        }
    }

    // The keep-alive goes on: etcd sees the lease refreshed after the restart.
    let mut raw = root_client(&etcd).await?;
    let ttl = lease_refreshed(&mut raw, leader.lease_id()).await?;
    eprintln!("lease TTL back up to {ttl} s after the restart");
    assert_eq!(*leader.lease_state().borrow(), LeaseState::Alive);
    let out = m.fenced_put("commits/after-restart", b"ok", 3, &w).await?;
    assert!(matches!(out, FenceOutcome::Committed { .. }), "{out:?}");
    b.revoke().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_token_that_expired_is_renewed() -> Result<()> {
    // etcd drops a simple token unused for --auth-token-ttl seconds (300 by default).
    let options = EtcdServerOptions {
        extra_args: vec!["--auth-token-ttl".into(), "2".into()],
        ..EtcdServerOptions::default()
    };
    let etcd = start_etcd(options, true)?;
    let m = EtcdMembership::connect(config(&etcd, "ttl", user())).await?;
    assert_eq!(m.read_plan().await?, None);
    // Idle well past the TTL (the driver sends nothing meanwhile), then call again. The
    // verdict does not rest on the timing: a slow machine only idles longer.
    let since = Instant::now();
    let renewed = loop {
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(m.read_plan().await?, None);
        if m.token_renewals() >= 1 {
            break since.elapsed();
        }
        ensure!(
            since.elapsed() < WAIT,
            "the token was never refused after idling: etcd's --auth-token-ttl not applied?"
        );
    };
    eprintln!("token renewed after idling {renewed:?}");
    Ok(())
}
