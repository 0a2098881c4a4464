//! `cargo xtask demo`: the mesh on a two-node testbed (see tests/src/bin/tb-demo.rs).

use std::{path::PathBuf, process::Command};

use anyhow::Result;

use crate::status;

pub fn run() -> Result<()> {
    // The demo drives the real binaries: build them (this needs what bootstrap
    // installed, so it cannot be a dependency of xtask itself).
    status(
        Command::new("cargo")
            .args(["build", "--quiet"])
            .args(crate::BINARY_PACKAGES)
            .args(["-p", "ztunnel-tests", "--bins"]),
    )?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    status(&mut Command::new(target.join("debug/tb-demo")))
}
