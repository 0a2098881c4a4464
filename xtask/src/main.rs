//! Project tasks: `cargo xtask <bootstrap|test|interop|fuzz|bench|demo|run>`.

mod bootstrap;
mod demo;
mod fuzz;
mod kind;

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, test and demo tasks for the ztunnel workspace")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (idempotent): iproute2, nftables, the nightly
    /// toolchain's rust-src, a pinned bpf-linker, cargo-fuzz.
    Bootstrap,
    /// Run every test of the workspace (as root: the tests build real namespaces,
    /// cgroups and BPF programs), then each fuzz target briefly. Extra arguments go
    /// to the test runner (and skip the fuzz targets).
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the fuzz targets of ztunnel/fuzz (all, or the one named), each for a
    /// bounded time: policy_compile, jwt, path_normalize.
    Fuzz {
        target: Option<String>,
        /// Seconds per target.
        #[arg(long, default_value_t = fuzz::DEFAULT_SECONDS)]
        seconds: u64,
    },
    /// Run the interoperability tests alone: Istio's own ztunnel against ours
    /// ($ISTIO_ZTUNNEL, or shared/peers/istio-ztunnel beside the checkout).
    Interop {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run benchmarks (as root), all of them or those named: redirect, ca, mesh, policy, waypoint, config, soak, dns.
    Bench {
        names: Vec<String>,
        /// The mesh benchmark also measures Istio's ztunnel ($ISTIO_ZTUNNEL, or
        /// shared/peers/istio-ztunnel beside the checkout) and reports ours/Istio.
        #[arg(long)]
        peer: bool,
    },
    /// Build a two-node testbed cluster, run the mesh on it and show traffic
    /// crossing it: which flows were encrypted, with which identities.
    Demo,
    /// Run the mesh in a kind cluster (needs Docker and kind): build and load the
    /// image, apply deploy/, deploy a sample namespace with a policy, and show
    /// mutual TLS and the policy at work.
    Run {
        /// Print the commands instead of running them.
        #[arg(long)]
        dry_run: bool,
        /// Delete the cluster.
        #[arg(long)]
        down: bool,
        #[arg(long, default_value = "ztunnel")]
        cluster: String,
    },
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    std::env::set_current_dir(workspace_root()).context("entering the workspace root")?;
    match cli.task {
        Task::Bootstrap => bootstrap::run(true),
        Task::Test { args } => {
            require_root("the tests")?;
            bootstrap::run(false)?;
            test(&args)?;
            // The whole suite (what CI runs) includes a smoke run of every fuzz target.
            match args.is_empty() {
                true => fuzz::run(&[], fuzz::TEST_SECONDS, FUZZ_SMOKE_DEV),
                false => Ok(()),
            }
        }
        Task::Fuzz { target, seconds } => {
            bootstrap::run(false)?;
            fuzz::run(&Vec::from_iter(target), seconds, false)
        }
        Task::Interop { args } => {
            require_root("the tests")?;
            bootstrap::run(false)?;
            let mut only = vec![
                "-p".into(),
                "ztunnel-tests".into(),
                "--test".into(),
                "interop".into(),
            ];
            only.extend(args);
            test(&only)
        }
        Task::Bench { names, peer } => {
            require_root("the benchmarks")?;
            bootstrap::run(false)?;
            bench(&names, peer)
        }
        Task::Demo => {
            require_root("the demo")?;
            bootstrap::run(false)?;
            demo::run()
        }
        Task::Run {
            dry_run,
            down,
            cluster,
        } => {
            let options = kind::Options {
                cluster,
                dry_run,
                down,
            };
            if !dry_run && !down {
                // Say what is missing before installing anything.
                kind::require_tools(false)?;
                // The image is built from host-built binaries (the eBPF build).
                bootstrap::run(false)?;
            }
            kind::run(&options)
        }
    }
}

/// The smoke run's build: unoptimized, which builds quicker than it fuzzes.
const FUZZ_SMOKE_DEV: bool = true;

/// The packages of the binaries the end-to-end tests, the benchmarks, the demo and
/// the image run: `ztunnel` (the node tunnel), `ztunnel-ca` and `waypoint`.
pub const BINARY_PACKAGES: [&str; 6] = [
    "-p",
    "ztunnel",
    "-p",
    "ztunnel-ca",
    "-p",
    "ztunnel-waypoint",
];

fn test(args: &[String]) -> Result<()> {
    // End-to-end tests run the real binaries; cargo only builds a package's
    // binaries for that package's own integration tests.
    status(
        Command::new("cargo")
            .args(["build", "--quiet"])
            .args(BINARY_PACKAGES)
            .arg("--bins"),
    )?;
    let mut cmd = Command::new("cargo");
    if bootstrap::have_nextest() {
        cmd.args(["nextest", "run", "--no-fail-fast"]);
    } else {
        println!("xtask: cargo-nextest not found, using cargo test");
        cmd.args(["test", "--no-fail-fast"]);
    }
    // Default members: everything but the eBPF crate, which only builds for BPF.
    cmd.args(args);
    status(&mut cmd)
}

/// Benchmarks of the tests package (tests/benches), each reporting ratios measured
/// within one run.
const BENCHES: [&str; 8] = [
    "redirect", "ca", "mesh", "policy", "waypoint", "config", "soak", "dns",
];

fn bench(names: &[String], peer: bool) -> Result<()> {
    for name in names {
        if !BENCHES.contains(&name.as_str()) {
            bail!("no benchmark {name:?}; there are: {}", BENCHES.join(", "));
        }
    }
    let selected: Vec<&str> = match names.is_empty() {
        true => BENCHES.to_vec(),
        false => names.iter().map(String::as_str).collect(),
    };
    // The mesh and waypoint benchmarks drive the real (optimized) binaries.
    status(
        Command::new("cargo")
            .args(["build", "--release", "--quiet"])
            .args(BINARY_PACKAGES)
            .arg("--bins"),
    )?;
    for name in selected {
        let mut cmd = Command::new("cargo");
        cmd.args(["bench", "-p", "ztunnel-tests", "--bench", name]);
        if peer && name == "mesh" {
            cmd.args(["--", "--peer"]);
        }
        status(&mut cmd)?;
    }
    Ok(())
}

fn require_root(what: &str) -> Result<()> {
    testbed::host::require_root().with_context(|| format!("{what} cannot run"))
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs `cmd`, failing unless it exits 0.
pub(crate) fn status(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
