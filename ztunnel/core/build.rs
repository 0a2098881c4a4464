//! Compiles the gRPC APIs in `proto/` (with protox: no system protoc needed).
use anyhow::Context;

/// The `.proto` files of the gRPC APIs we serve and call, in `proto/`.
const PROTOS: &[&str] = &["istio-ca.proto"];
/// The gRPC APIs we only call (no server generated): Envoy's ext_authz.
const CLIENT_PROTOS: &[&str] = &["envoy/service/auth/v3/external_auth.proto"];

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=proto");
    for (protos, server) in [(PROTOS, true), (CLIENT_PROTOS, false)] {
        let files = protox::compile(protos, ["proto"]).context("parsing proto/")?;
        tonic_prost_build::configure()
            .build_transport(false)
            .build_server(server)
            .compile_fds(files)
            .context("generating code from proto/")?;
    }
    Ok(())
}
