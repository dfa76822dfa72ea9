//! FaultStore against object_store's in-memory store: every crash point.

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tenax_chaos::{CrashPoint, FaultStore};

fn setup(crash: CrashPoint) -> (Arc<InMemory>, FaultStore) {
    let inner = Arc::new(InMemory::new());
    let store = FaultStore::new(inner.clone(), crash);
    (inner, store)
}

fn payload(n: usize, fill: u8) -> PutPayload {
    PutPayload::from(vec![fill; n])
}

async fn exists(store: &dyn ObjectStore, path: &str) -> bool {
    match store.head(&Path::from(path)).await {
        Ok(_) => true,
        Err(object_store::Error::NotFound { .. }) => false,
        Err(e) => panic!("head {path}: {e}"),
    }
}

fn assert_injected(e: &object_store::Error) {
    match e {
        object_store::Error::Generic { store, source } => {
            assert_eq!(*store, "FaultStore");
            assert!(source.to_string().contains("injected crash"), "{source}");
        }
        other => panic!("expected an injected crash, got {other:?}"),
    }
}

/// Every kind of call fails once crashed.
async fn assert_dead(store: &FaultStore) {
    assert!(store.crashed());
    let p = Path::from("any/thing");
    assert_injected(&store.put(&p, payload(1, 0)).await.unwrap_err());
    assert_injected(&store.get(&p).await.unwrap_err());
    assert_injected(&store.head(&p).await.unwrap_err());
    assert_injected(&store.delete(&p).await.unwrap_err());
    assert_injected(&store.list(None).try_collect::<Vec<_>>().await.unwrap_err());
    assert_injected(&store.list_with_delimiter(None).await.unwrap_err());
    assert_injected(&store.copy(&p, &Path::from("x")).await.unwrap_err());
    assert_injected(&store.put_multipart(&p).await.unwrap_err());
}

#[tokio::test]
async fn never_only_counts_and_delegates() {
    let (inner, store) = setup(CrashPoint::Never);
    store.put(&Path::from("a/1"), payload(10, 1)).await.unwrap();
    store.put(&Path::from("a/2"), payload(20, 2)).await.unwrap();
    let mut up = store.put_multipart(&Path::from("a/3")).await.unwrap();
    up.put_part(payload(5, 3)).await.unwrap();
    up.complete().await.unwrap();
    assert_eq!(store.bytes_written(), 35);
    assert!(!store.crashed());
    let got = store
        .get(&Path::from("a/2"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(got, Bytes::from(vec![2u8; 20]));
    let listed: Vec<_> = store
        .list(Some(&Path::from("a")))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(listed.len(), 3);
    store.delete(&Path::from("a/1")).await.unwrap();
    assert!(!exists(inner.as_ref(), "a/1").await);
    assert!(store.to_string().starts_with("FaultStore("));
}

#[tokio::test]
async fn after_bytes_fails_the_crossing_put_and_everything_after() {
    let (inner, store) = setup(CrashPoint::AfterBytes(100));
    store.put(&Path::from("x/a"), payload(60, 1)).await.unwrap();
    store.put(&Path::from("x/b"), payload(40, 2)).await.unwrap(); // exactly 100: fine
    assert!(!store.crashed());
    let e = store
        .put(&Path::from("x/c"), payload(1, 3))
        .await
        .unwrap_err();
    assert_injected(&e);
    assert_eq!(store.bytes_written(), 100);
    assert!(exists(inner.as_ref(), "x/a").await);
    assert!(exists(inner.as_ref(), "x/b").await);
    assert!(
        !exists(inner.as_ref(), "x/c").await,
        "the crossing put wrote nothing"
    );
    assert_dead(&store).await;
}

#[tokio::test]
async fn after_bytes_counts_multipart_parts() {
    let (inner, store) = setup(CrashPoint::AfterBytes(250));
    let path = Path::from("ckpt/shard-0");
    let mut up = store.put_multipart(&path).await.unwrap();
    up.put_part(payload(100, 1)).await.unwrap();
    up.put_part(payload(100, 2)).await.unwrap();
    assert_eq!(store.bytes_written(), 200);
    let e = up.put_part(payload(100, 3)).await.unwrap_err();
    assert_injected(&e);
    assert!(store.crashed());
    assert_injected(&up.complete().await.unwrap_err());
    assert_injected(&up.abort().await.unwrap_err());
    assert!(!exists(inner.as_ref(), "ckpt/shard-0").await);
    assert_dead(&store).await;
}

#[tokio::test]
async fn before_put_writes_nothing_for_the_matching_path() {
    let (inner, store) = setup(CrashPoint::BeforePut("manifest".into()));
    store
        .put(&Path::from("step-1/shard-0"), payload(8, 1))
        .await
        .unwrap();
    let e = store
        .put(&Path::from("step-1/manifest.json"), payload(8, 2))
        .await
        .unwrap_err();
    assert_injected(&e);
    assert!(exists(inner.as_ref(), "step-1/shard-0").await);
    assert!(!exists(inner.as_ref(), "step-1/manifest.json").await);
    assert_eq!(store.bytes_written(), 8, "the refused put counts no bytes");
    assert_dead(&store).await;
}

#[tokio::test]
async fn before_put_applies_to_multipart_complete() {
    let (inner, store) = setup(CrashPoint::BeforePut("manifest".into()));
    let mut up = store
        .put_multipart(&Path::from("m/manifest"))
        .await
        .unwrap();
    up.put_part(payload(10, 1)).await.unwrap();
    assert!(!store.crashed(), "parts are not the put");
    assert_injected(&up.complete().await.unwrap_err());
    assert!(!exists(inner.as_ref(), "m/manifest").await);
    assert_dead(&store).await;
}

#[tokio::test]
async fn after_put_writes_then_loses_the_response() {
    let (inner, store) = setup(CrashPoint::AfterPut("manifest".into()));
    store
        .put(&Path::from("s/shard"), payload(4, 1))
        .await
        .unwrap();
    let e = store
        .put(&Path::from("s/manifest.json"), payload(4, 2))
        .await
        .unwrap_err();
    assert_injected(&e);
    assert!(
        exists(inner.as_ref(), "s/manifest.json").await,
        "it was written"
    );
    assert_dead(&store).await;
}

#[tokio::test]
async fn after_put_applies_to_multipart_complete() {
    let (inner, store) = setup(CrashPoint::AfterPut("big".into()));
    let mut up = store.put_multipart(&Path::from("s/big")).await.unwrap();
    up.put_part(payload(7, 1)).await.unwrap();
    assert_injected(&up.complete().await.unwrap_err());
    let got = inner
        .get(&Path::from("s/big"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(got.len(), 7);
    assert_dead(&store).await;
}

#[tokio::test]
async fn streams_handed_out_before_the_crash_fail_after_it() {
    let (_inner, store) = setup(CrashPoint::BeforePut("boom".into()));
    store.put(&Path::from("r/a"), payload(3, 1)).await.unwrap();
    let pending_get = store.get(&Path::from("r/a")).await.unwrap();
    let pending_list = store.list(None);
    let _ = store
        .put(&Path::from("boom"), payload(1, 0))
        .await
        .unwrap_err();
    assert_injected(&pending_get.bytes().await.unwrap_err());
    assert_injected(&pending_list.try_collect::<Vec<_>>().await.unwrap_err());
}

#[tokio::test]
async fn lose_response_writes_reports_an_error_once_and_keeps_working() {
    let (inner, store) = setup(CrashPoint::LoseResponse("MANIFEST".into()));
    store
        .put(&Path::from("c/shard"), payload(3, 1))
        .await
        .unwrap();
    let e = store
        .put(&Path::from("c/MANIFEST.json"), payload(4, 2))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("injected lost response"), "{e}");
    assert!(!store.crashed());
    assert!(
        exists(inner.as_ref(), "c/MANIFEST.json").await,
        "it was written"
    );
    // Only the first matching put loses its response; reads and later puts work.
    assert!(exists(&store, "c/MANIFEST.json").await);
    store
        .put(&Path::from("d/MANIFEST.json"), payload(4, 3))
        .await
        .unwrap();
}
