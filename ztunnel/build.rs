//! Compiles the gRPC APIs in `proto/` (with protox: no system protoc needed) and
//! builds the eBPF programs (ztunnel-ebpf, nightly + bpf-linker) into OUT_DIR so that
//! they are embedded in the ztunnel binary. `cargo xtask bootstrap` installs what the
//! eBPF build needs. Set ZTUNNEL_EBPF_OBJECT to a prebuilt object to skip it.
use std::{env, fs, path::PathBuf};

use anyhow::{anyhow, Context};

/// The eBPF crate's binary target, i.e. the object file's name.
const OBJECT: &str = "ztunnel-redirect";

/// The `.proto` files of the gRPC APIs we serve and call, in `proto/`.
const PROTOS: &[&str] = &["istio-ca.proto"];
/// The gRPC APIs we only call (no server generated): Envoy's ext_authz.
const CLIENT_PROTOS: &[&str] = &["envoy/service/auth/v3/external_auth.proto"];

fn compile_protos() -> anyhow::Result<()> {
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

fn main() -> anyhow::Result<()> {
    compile_protos()?;
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    println!("cargo:rerun-if-env-changed=ZTUNNEL_EBPF_OBJECT");
    if let Some(prebuilt) = env::var_os("ZTUNNEL_EBPF_OBJECT") {
        let prebuilt = PathBuf::from(prebuilt);
        println!("cargo:rerun-if-changed={}", prebuilt.display());
        fs::copy(&prebuilt, out_dir.join(OBJECT))
            .with_context(|| format!("copying ZTUNNEL_EBPF_OBJECT={}", prebuilt.display()))?;
        return Ok(());
    }
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("no manifest dir")?);
    let ebpf_dir = manifest_dir.join("../ztunnel-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path")?;
    // aya-build relays the nested cargo's stderr as build warnings: keep it to
    // real diagnostics, not a line per compiled crate.
    env::set_var("CARGO_TERM_QUIET", "true");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "ztunnel-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
    .map_err(|e| {
        anyhow!(
            "building the eBPF programs failed: {e:#}\n\
             They need the nightly toolchain with rust-src and bpf-linker: \
             run `cargo xtask bootstrap`."
        )
    })?;
    // rerun-if-changed on the eBPF crate's directory is printed by aya-build; the
    // shared types live in a sub-crate of it.
    Ok(())
}
