//! `EtcdServer::start` without `etcd` on PATH. Its own test binary (one process, one
//! test), because it changes the process environment.

use tenax_chaos::EtcdServer;

#[test]
fn missing_etcd_says_how_to_install_it() {
    std::env::set_var("PATH", "/nonexistent-tenax-test-path");
    let err = EtcdServer::start().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    assert_eq!(
        err.to_string(),
        "etcd not found on PATH: run scripts/setup (apt-get install etcd-server)"
    );
}
