//! Generates the tonic/prost code of `proto/tenax.proto` (needs `protoc`, see scripts/setup).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/tenax.proto");
    tonic_prost_build::configure().compile_protos(&["proto/tenax.proto"], &["proto"])?;
    Ok(())
}
