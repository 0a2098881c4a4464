//! Compiles `proto/echo.proto` (the test gRPC service) with protox: no system
//! protoc. Only the `mesh` feature's test code uses it.
fn main() -> anyhow::Result<()> {
    #[cfg(feature = "mesh")]
    {
        println!("cargo:rerun-if-changed=proto");
        let files = protox::compile(["echo.proto"], ["proto"])?;
        tonic_prost_build::configure()
            .build_transport(false)
            .compile_fds(files)?;
    }
    Ok(())
}
