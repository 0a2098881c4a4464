//! Compiles `proto/echo.proto` (the test gRPC service) and the waypoint's copy of
//! Envoy's ext_authz API (its server, for a stand-in provider) with protox: no
//! system protoc. Only the `mesh` feature's test code uses them.

/// Where the waypoint's `.proto` files are: the test provider is generated from
/// the same definitions as the waypoint's client.
#[cfg(feature = "mesh")]
const ZTUNNEL_PROTO: &str = "../ztunnel/core/proto";

fn main() -> anyhow::Result<()> {
    #[cfg(feature = "mesh")]
    {
        println!("cargo:rerun-if-changed=proto");
        println!("cargo:rerun-if-changed={ZTUNNEL_PROTO}");
        let files = protox::compile(["echo.proto"], ["proto"])?;
        tonic_prost_build::configure()
            .build_transport(false)
            .compile_fds(files)?;
        let files = protox::compile(
            ["envoy/service/auth/v3/external_auth.proto"],
            [ZTUNNEL_PROTO],
        )?;
        tonic_prost_build::configure()
            .build_transport(false)
            .build_client(false)
            .compile_fds(files)?;
    }
    Ok(())
}
