//! Installs what the build, the tests and the fuzz targets need, once; later runs
//! only check.
//!
//! Pinned together (see README.md, "Toolchain"): aya 0.14.0, aya-ebpf 0.2.1,
//! aya-build 0.2.0 (Cargo.toml) and bpf-linker 0.13.0 built against the nightly
//! toolchain's own libLLVM.

use std::{
    env, fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::status;

pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// The fuzz targets' runner (`cargo xtask fuzz`, and briefly `cargo xtask test`).
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";
const NIGHTLY: &str = "nightly";
/// Debian packages the tests need, with a binary that proves each is there
/// (nftables: the interop tests redirect an Istio pod's traffic as istio-cni would;
/// dnsutils: the DNS tests ask with `dig`, a resolver no one here wrote).
const DEBIAN_PACKAGES: [(&str, &str); 3] =
    [("iproute2", "ip"), ("nftables", "nft"), ("dnsutils", "dig")];

/// Checks every piece and installs what is missing. `verbose` also reports the
/// pieces already in place.
pub fn run(verbose: bool) -> Result<()> {
    debian_packages(verbose)?;
    nightly_rust_src(verbose)?;
    bpf_linker(verbose)?;
    cargo_fuzz(verbose)?;
    if verbose {
        match have_nextest() {
            true => println!("ok: cargo-nextest"),
            false => println!("note: cargo-nextest not found; `cargo xtask test` uses cargo test"),
        }
    }
    Ok(())
}

pub fn have_nextest() -> bool {
    Command::new("cargo")
        .args(["nextest", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn debian_packages(verbose: bool) -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .filter(|(_, binary)| !runs("sh", &["-c", &format!("command -v {binary}")]))
        .map(|(package, _)| *package)
        .collect();
    if missing.is_empty() {
        if verbose {
            println!(
                "ok: Debian packages ({})",
                DEBIAN_PACKAGES.map(|p| p.0).join(", ")
            );
        }
        return Ok(());
    }
    println!("installing Debian packages: {}", missing.join(" "));
    if !runs("sh", &["-c", "command -v apt-get"]) {
        bail!(
            "missing {} and apt-get is not available: install them by hand",
            missing.join(" ")
        );
    }
    let install = |cmd: &mut Command| status(cmd.env("DEBIAN_FRONTEND", "noninteractive"));
    let mut apt = Command::new("apt-get");
    apt.args(["install", "-y", "--no-install-recommends"])
        .args(&missing);
    if install(&mut apt).is_err() {
        // A fresh machine may have no package lists yet.
        install(Command::new("apt-get").arg("update"))?;
        let mut apt = Command::new("apt-get");
        apt.args(["install", "-y", "--no-install-recommends"])
            .args(&missing);
        install(&mut apt).with_context(|| format!("apt-get install {}", missing.join(" ")))?;
    }
    Ok(())
}

fn nightly_rust_src(verbose: bool) -> Result<()> {
    let installed = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", NIGHTLY])
        .output()
        .context("running rustup: the eBPF programs need rustup with a nightly toolchain")?;
    if !installed.status.success() {
        println!("installing the nightly toolchain (for the eBPF programs)");
        status(Command::new("rustup").args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))
        .context("installing the nightly toolchain")?;
        return Ok(());
    }
    let components = String::from_utf8_lossy(&installed.stdout);
    if components.lines().any(|l| l.starts_with("rust-src")) {
        if verbose {
            println!("ok: nightly toolchain with rust-src");
        }
        return Ok(());
    }
    println!("installing rust-src for the nightly toolchain");
    status(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
        .context("rustup component add rust-src --toolchain nightly")
}

fn bpf_linker(verbose: bool) -> Result<()> {
    let current = Command::new("bpf-linker").arg("--version").output();
    if let Ok(out) = &current {
        let version = String::from_utf8_lossy(&out.stdout);
        if out.status.success() && version.split_whitespace().nth(1) == Some(BPF_LINKER_VERSION) {
            if verbose {
                println!("ok: bpf-linker {BPF_LINKER_VERSION}");
            }
            return Ok(());
        }
    }
    // cargo install on its own finds the system LLVM (too old) or none; the nightly
    // toolchain ships the LLVM it was built with, which is exactly what bpf-linker
    // must match. Point bpf-linker's build at it through a small prefix directory.
    let sysroot = output("rustc", &["+nightly", "--print", "sysroot"])?;
    let sysroot = PathBuf::from(sysroot.trim());
    let meta = output("rustc", &["+nightly", "-vV"])?;
    let major = meta
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("`rustc +nightly -vV` does not say its LLVM version")?
        .to_owned();
    let libllvm = fs::read_dir(sysroot.join("lib"))
        .context("reading the nightly sysroot")?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM") && n.contains(".so"))
        })
        .context("the nightly toolchain has no libLLVM shared library")?;
    let prefix = llvm_prefix()?;
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    for name in [
        PathBuf::from("libLLVM.so"),
        PathBuf::from(libllvm.file_name().expect("a file")),
    ] {
        let link = lib.join(name);
        let _ = fs::remove_file(&link);
        symlink(&libllvm, &link).with_context(|| format!("linking {}", link.display()))?;
    }
    println!(
        "installing bpf-linker {BPF_LINKER_VERSION} against the nightly toolchain's LLVM {major} ({})",
        libllvm.display()
    );
    status(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
            ])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
            ])
            .env("LLVM_PREFIX", &prefix),
    )
    .context("building bpf-linker (needs network access to crates.io and a C/C++ compiler)")?;
    Ok(())
}

fn cargo_fuzz(verbose: bool) -> Result<()> {
    if runs("cargo", &["fuzz", "--version"]) {
        if verbose {
            println!("ok: cargo-fuzz");
        }
        return Ok(());
    }
    println!("installing cargo-fuzz {CARGO_FUZZ_VERSION} (runs the fuzz targets)");
    status(Command::new("cargo").args([
        "install",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
        "--locked",
    ]))
    .context("installing cargo-fuzz (needs network access to crates.io)")
}

/// Kept for as long as bpf-linker is installed: its RUNPATH points here.
fn llvm_prefix() -> Result<PathBuf> {
    let data = match env::var_os("XDG_DATA_HOME") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(&env::var_os("HOME").context("HOME is not set")?).join(".local/share"),
    };
    Ok(data.join("ztunnel-bootstrap/llvm"))
}

fn output(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
