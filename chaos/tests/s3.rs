//! MotoServer and FaultProxy against a real `moto_server` (each test starts its own on
//! its own port).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path;
use object_store::{BackoffConfig, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};
use tenax_chaos::{FaultAction, FaultProxy, MotoServer, ProxyFaults};

const BUCKET: &str = "tenax-test";

/// Quick retries: up to `max_retries`, 10-100 ms apart.
fn retry(max_retries: usize) -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(100),
            base: 2.0,
        },
        max_retries,
        retry_timeout: Duration::from_secs(30),
    }
}

fn s3(endpoint: &str, retry: RetryConfig) -> Arc<dyn ObjectStore> {
    let store = AmazonS3Builder::new()
        .with_endpoint(endpoint)
        .with_allow_http(true)
        .with_virtual_hosted_style_request(false)
        .with_bucket_name(BUCKET)
        .with_region("us-east-1")
        .with_access_key_id("testing")
        .with_secret_access_key("testing")
        .with_retry(retry)
        .build()
        .unwrap();
    Arc::new(store)
}

fn moto() -> MotoServer {
    let server = MotoServer::start().expect("start moto_server");
    server.create_bucket(BUCKET).expect("create bucket");
    server
}

fn body(i: usize) -> Bytes {
    Bytes::from(format!("object {i} ").repeat(20 + i))
}

#[tokio::test]
async fn moto_round_trip() {
    let server = moto();
    assert!(server.pid() > 0);
    assert_eq!(server.endpoint(), format!("http://{}", server.addr()));
    let store = s3(&server.endpoint(), retry(0));
    let path = Path::from("dir/hello.txt");
    store
        .put(&path, PutPayload::from_static(b"hello moto"))
        .await
        .unwrap();
    let got = store.get(&path).await.unwrap().bytes().await.unwrap();
    assert_eq!(got.as_ref(), b"hello moto");
    let listed: Vec<_> = store
        .list(Some(&Path::from("dir")))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert!(
        server.log_tail().contains("PUT /tenax-test/dir/hello.txt"),
        "{}",
        server.log_tail()
    );
    let pid = server.pid();
    drop(server);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "moto_server {pid} still running after drop"
    );
}

#[tokio::test]
async fn s3_env_configures_object_store() {
    let server = moto();
    let mut builder = AmazonS3Builder::new().with_bucket_name(BUCKET);
    // The same path as AmazonS3Builder::from_env, without touching the process env.
    for (key, value) in server.s3_env() {
        let key: AmazonS3ConfigKey = key.to_ascii_lowercase().parse().unwrap();
        builder = builder.with_config(key, value);
    }
    let store = builder.build().unwrap();
    store
        .put(&Path::from("env"), PutPayload::from_static(b"ok"))
        .await
        .unwrap();
    let got = store
        .get(&Path::from("env"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(got.as_ref(), b"ok");
}

#[tokio::test]
async fn proxy_errors_are_absorbed_by_object_store_retries() {
    let server = moto();
    let faults = ProxyFaults {
        error_rate: 0.2,
        ..ProxyFaults::default()
    };
    let proxy = FaultProxy::start(server.addr(), faults, 42).unwrap();
    let store = s3(&proxy.endpoint(), retry(10));
    for i in 0..30 {
        let path = Path::from(format!("retry/{i}"));
        store.put(&path, PutPayload::from(body(i))).await.unwrap();
    }
    for i in 0..30 {
        let path = Path::from(format!("retry/{i}"));
        let got = store.get(&path).await.unwrap().bytes().await.unwrap();
        assert_eq!(got, body(i));
    }
    let stats = proxy.stats();
    assert!(stats.errors_injected > 0, "{stats:?}");
    assert_eq!(stats.forwarded, 60, "{stats:?}");
    assert_eq!(
        stats.requests,
        stats.forwarded + stats.errors_injected,
        "{stats:?}"
    );
    // Both injected statuses were used.
    let statuses: Vec<_> = proxy
        .history()
        .iter()
        .filter_map(|e| e.injected_status)
        .collect();
    assert!(
        statuses.contains(&503) && statuses.contains(&500),
        "{statuses:?}"
    );
}

#[tokio::test]
async fn proxy_mixed_faults_are_absorbed_by_retries() {
    let server = moto();
    let faults = ProxyFaults {
        error_rate: 0.1,
        drop_before_rate: 0.1,
        drop_after_rate: 0.1,
        latency_rate: 0.2,
        latency_ms: (1, 20),
    };
    let proxy = FaultProxy::start(server.addr(), faults, 7).unwrap();
    let store = s3(&proxy.endpoint(), retry(10));
    for i in 0..20 {
        let path = Path::from(format!("mixed/{i}"));
        store.put(&path, PutPayload::from(body(i))).await.unwrap();
        let got = store.get(&path).await.unwrap().bytes().await.unwrap();
        assert_eq!(got, body(i));
    }
    let stats = proxy.stats();
    assert!(stats.dropped_before > 0, "{stats:?}");
    assert!(stats.dropped_after > 0, "{stats:?}");
    assert!(stats.delayed > 0, "{stats:?}");
    assert_eq!(
        stats.requests,
        stats.forwarded
            + stats.errors_injected
            + stats.dropped_before
            + stats.dropped_after
            + stats.upstream_failures,
        "{stats:?}"
    );
    assert_eq!(stats.upstream_failures, 0, "{stats:?}");
}

#[tokio::test]
async fn lost_response_put_is_nevertheless_stored() {
    let server = moto();
    let faults = ProxyFaults {
        drop_after_rate: 1.0,
        ..ProxyFaults::default()
    };
    let proxy = FaultProxy::start(server.addr(), faults, 1).unwrap();
    let via_proxy = s3(&proxy.endpoint(), retry(0));
    let path = Path::from("lost/response");
    let err = via_proxy
        .put(&path, PutPayload::from_static(b"written anyway"))
        .await
        .unwrap_err();
    eprintln!("put through the proxy failed as expected: {err}");
    assert_eq!(proxy.stats().dropped_after, 1);
    let direct = s3(&server.endpoint(), retry(0));
    let got = direct.get(&path).await.unwrap().bytes().await.unwrap();
    assert_eq!(got.as_ref(), b"written anyway");
    // Faults can be switched off for later requests.
    proxy.set_faults(ProxyFaults::default());
    let got = via_proxy.get(&path).await.unwrap().bytes().await.unwrap();
    assert_eq!(got.as_ref(), b"written anyway");
}

/// Runs 20 sequential puts without retries through a fresh proxy; returns which failed
/// and the actions the proxy logged.
async fn fault_pattern(server: &MotoServer, seed: u64) -> (Vec<bool>, Vec<FaultAction>) {
    let faults = ProxyFaults {
        error_rate: 0.25,
        drop_before_rate: 0.15,
        ..ProxyFaults::default()
    };
    let proxy = FaultProxy::start(server.addr(), faults, seed).unwrap();
    let store = s3(&proxy.endpoint(), retry(0));
    let mut failed = Vec::new();
    for i in 0..20 {
        let path = Path::from(format!("det/{seed}/{i}"));
        failed.push(store.put(&path, PutPayload::from(body(i))).await.is_err());
    }
    let history = proxy.history();
    assert_eq!(history.len(), 20);
    for (i, event) in history.iter().enumerate() {
        assert_eq!(event.index, i as u64);
        assert_eq!(event.method, "PUT");
        assert_eq!(event.action, faults.decide(seed, i as u64).action);
    }
    (failed, history.iter().map(|e| e.action).collect())
}

#[tokio::test]
async fn same_seed_same_faults() {
    let server = moto();
    let (failed_a, actions_a) = fault_pattern(&server, 1234).await;
    let (failed_b, actions_b) = fault_pattern(&server, 1234).await;
    assert_eq!(failed_a, failed_b);
    assert_eq!(actions_a, actions_b);
    assert!(failed_a.iter().any(|f| *f) && failed_a.iter().any(|f| !*f));
    // A request fails exactly when a fault was injected into it.
    let injected: Vec<bool> = actions_a
        .iter()
        .map(|a| *a != FaultAction::Forward)
        .collect();
    assert_eq!(failed_a, injected);
    let (failed_c, _) = fault_pattern(&server, 99).await;
    assert_ne!(failed_a, failed_c, "another seed, another pattern");
}
