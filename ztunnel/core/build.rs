//! Compiles the gRPC APIs in `proto/` (with protox: no system protoc needed).
use anyhow::Context;

/// The `.proto` files of the gRPC APIs we serve and call, in `proto/`.
const PROTOS: &[&str] = &["istio-ca.proto"];

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=proto");
    let files = protox::compile(PROTOS, ["proto"]).context("parsing proto/")?;
    tonic_prost_build::configure()
        .build_transport(false)
        .compile_fds(files)
        .context("generating code from proto/")
}
