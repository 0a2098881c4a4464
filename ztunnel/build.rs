//! Builds the eBPF programs (ztunnel-ebpf, nightly + bpf-linker) into OUT_DIR so that
//! they are embedded in the ztunnel binary. `cargo xtask bootstrap` installs what the
//! eBPF build needs. Set ZTUNNEL_EBPF_OBJECT to a prebuilt object to skip it.
use std::{env, fs, path::PathBuf};

use anyhow::{anyhow, Context};

/// The eBPF crate's binary target, i.e. the object file's name.
const OBJECT: &str = "ztunnel-redirect";

fn main() -> anyhow::Result<()> {
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
