//! `cargo xtask fuzz [target] [--seconds N]`: the cargo-fuzz targets of
//! ztunnel/fuzz (their own workspace, built with nightly), each run for a bounded
//! time. A crash leaves its input in ztunnel/fuzz/artifacts/<target>/: make it a
//! regression test (and a seed in corpus/<target>/).

use std::{fs, path::Path, process::Command, time::Instant};

use anyhow::{bail, Context, Result};

/// Every target. The waypoint's path normalizer adds "path_normalize" here (and a
/// [[bin]] in ztunnel/fuzz/Cargo.toml).
pub const TARGETS: [&str; 3] = ["policy_compile", "jwt", "path_normalize"];
/// What `cargo xtask fuzz` gives each target by default.
pub const DEFAULT_SECONDS: u64 = 60;
/// What `cargo xtask test` gives each: a smoke run, the whole kept short for CI.
pub const TEST_SECONDS: u64 = 20;

/// Runs `targets` (all when empty) for `seconds` each; fails on the first crash.
/// `dev`: an unoptimized build, quicker to build than to fuzz with (for CI).
pub fn run(targets: &[String], seconds: u64, dev: bool) -> Result<()> {
    for target in targets {
        if !TARGETS.contains(&target.as_str()) {
            bail!(
                "no fuzz target {target:?}; there are: {}",
                TARGETS.join(", ")
            );
        }
    }
    let selected: Vec<&str> = match targets.is_empty() {
        true => TARGETS.to_vec(),
        false => targets.iter().map(String::as_str).collect(),
    };
    let dir = Path::new("ztunnel/fuzz");
    let target_dir = dir.join("target");
    fs::create_dir_all(&target_dir).context("creating ztunnel/fuzz/target")?;
    // The targets never load the eBPF programs: an empty object spares the nested
    // eBPF build (which the fuzzer's instrumentation flags would reach).
    let ebpf = target_dir.join("no-ebpf.o");
    fs::write(&ebpf, b"").context("writing the placeholder eBPF object")?;
    let ebpf = fs::canonicalize(&ebpf)?;
    for target in selected {
        let log = target_dir.join(format!("{target}.log"));
        let started = Instant::now();
        let mut cmd = Command::new("cargo");
        cmd.current_dir("ztunnel")
            .args(["+nightly", "fuzz", "run", target, "--sanitizer", "none"])
            .args(dev.then_some("--dev"))
            .args(["--", &format!("-max_total_time={seconds}"), "-timeout=10"])
            .env("ZTUNNEL_EBPF_OBJECT", &ebpf);
        // Both streams into one file, in order.
        let file = fs::File::create(&log)?;
        cmd.stdout(file.try_clone()?).stderr(file);
        println!("fuzz: {target} for {seconds} s (log: {})", log.display());
        let status = cmd
            .status()
            .context("running cargo fuzz (cargo xtask bootstrap installs it)")?;
        let text = fs::read_to_string(&log).unwrap_or_default();
        if !status.success() {
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            for line in tail.into_iter().rev() {
                eprintln!("  {line}");
            }
            bail!("fuzz target {target} failed ({status}); its input is in ztunnel/fuzz/artifacts/{target}/");
        }
        let done = text
            .lines()
            .rev()
            .find(|l| l.starts_with("Done "))
            .unwrap_or("(no summary)");
        println!(
            "fuzz: {target} clean: {done} ({:.0} s with the build)",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
