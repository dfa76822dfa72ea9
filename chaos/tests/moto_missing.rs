//! MotoServer::start without `moto_server` on PATH. Its own test binary (one process,
//! one test), because it changes the process environment.

use tenax_chaos::MotoServer;

#[test]
fn missing_moto_server_says_how_to_install_it() {
    std::env::set_var("PATH", "/nonexistent-tenax-test-path");
    let err = MotoServer::start().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    assert_eq!(
        err.to_string(),
        "moto_server not found on PATH: run scripts/setup (pip install \"moto[server]\")"
    );
}
