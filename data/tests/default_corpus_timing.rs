//! Timing of the built-in corpus with the gpt2 tokenizer, run by hand in release:
//! `cargo test -p tenax-data --release -- --ignored --nocapture`.

use std::time::Instant;

use tenax_data::{default_corpus, Tokenizer, TokenizerKind};

#[test]
#[ignore = "timing report; run in release with --ignored --nocapture"]
fn default_corpus_gpt2_timing() {
    let start = Instant::now();
    let corpus = default_corpus().unwrap();
    let load_s = start.elapsed().as_secs_f64();

    let start = Instant::now();
    let tokenizer = Tokenizer::build(TokenizerKind::Gpt2, &corpus.text).unwrap();
    let build_s = start.elapsed().as_secs_f64();

    let start = Instant::now();
    let tokens = tokenizer.encode(&corpus.text).unwrap();
    let encode_s = start.elapsed().as_secs_f64();

    println!("{}", corpus.description);
    println!(
        "bytes {} files {} sha256 {}",
        corpus.bytes(),
        corpus.files,
        corpus.sha256
    );
    println!(
        "gpt2 tokens {} ({:.2} bytes/token)",
        tokens.len(),
        corpus.bytes() as f64 / tokens.len() as f64
    );
    println!("default_corpus {load_s:.3}s, gpt2 tables {build_s:.3}s, gpt2 encode {encode_s:.3}s");
    assert_eq!(tokenizer.decode(&tokens), corpus.text);
}
