//! What the testbed needs from the machine: root, a cgroup v2 hierarchy, a bpffs
//! mount, iproute2. Missing pieces are mounted when possible and otherwise reported
//! as errors: a test that cannot run must fail, never skip.

use std::{
    fs, io,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use anyhow::{bail, Context, Result};
use nix::mount::{mount, MsFlags};

/// Every name the testbed gives (network namespaces, cgroups, pins) starts with this.
pub const PREFIX: &str = "ztb";

/// Where the testbed mounts cgroup v2 when the machine has no mount of it.
const CGROUP2_FALLBACK: &str = "/run/ztunnel-testbed/cgroup2";
/// Where the testbed mounts bpffs when the machine has none mounted.
const BPFFS_DEFAULT: &str = "/sys/fs/bpf";

pub fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the testbed needs root (network namespaces, cgroups, BPF): run as root");
    }
    Ok(())
}

pub fn require_iproute2() -> Result<()> {
    match Command::new("ip").arg("-V").output() {
        Ok(out) if out.status.success() => Ok(()),
        _ => bail!("`ip` (iproute2) is missing: run `cargo xtask bootstrap`"),
    }
}

/// The cgroup v2 mount point, mounting one if there is none.
pub fn cgroup2_root() -> Result<&'static Path> {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    if let Some(root) = ROOT.get() {
        return Ok(root);
    }
    let root = match find_mount("cgroup2")? {
        Some(root) => root,
        None => {
            let target = Path::new(CGROUP2_FALLBACK);
            mount_fs("cgroup2", target)?;
            target.to_path_buf()
        }
    };
    Ok(ROOT.get_or_init(|| root))
}

/// The bpffs mount point, mounting one if there is none.
pub fn bpffs_root() -> Result<&'static Path> {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    if let Some(root) = ROOT.get() {
        return Ok(root);
    }
    let root = match find_mount("bpf")? {
        Some(root) => root,
        None => {
            let target = Path::new(BPFFS_DEFAULT);
            // A concurrent test may have mounted it between our look and now.
            if let Err(e) = mount_fs("bpf", target) {
                find_mount("bpf")?.ok_or(e)?;
            }
            target.to_path_buf()
        }
    };
    Ok(ROOT.get_or_init(|| root))
}

/// The cgroup under which every testbed cluster makes its groups.
pub fn testbed_cgroup() -> Result<PathBuf> {
    let dir = cgroup2_root()?.join("ztunnel-testbed");
    create_dir(&dir)?;
    Ok(dir)
}

/// The bpffs directory under which every testbed cluster pins its objects.
pub fn testbed_bpffs() -> Result<PathBuf> {
    let dir = bpffs_root()?.join("ztunnel-testbed");
    create_dir(&dir)?;
    Ok(dir)
}

fn create_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

fn find_mount(fstype: &str) -> Result<Option<PathBuf>> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    Ok(mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, kind) = (fields.next()?, fields.next()?, fields.next()?);
        (kind == fstype).then(|| PathBuf::from(target))
    }))
}

fn mount_fs(fstype: &str, target: &Path) -> Result<()> {
    fs::create_dir_all(target).with_context(|| format!("creating {}", target.display()))?;
    mount(
        Some(fstype),
        target,
        Some(fstype),
        MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mounting {fstype} at {}", target.display()))
}

/// Runs `ip` with `args`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (iproute2): run `cargo xtask bootstrap`")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Names of the network namespaces `ip netns` knows.
pub fn netns_names() -> Result<Vec<String>> {
    Ok(ip(&["netns", "list"])?
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect())
}

/// Ignores "not found": the thing to remove is already gone.
pub(crate) fn ignore_missing(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// CPU seconds (user + system) a process has used: fields 14 and 15 of
/// /proc/<pid>/stat, in clock ticks.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces; the fields after it do not.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("/proc/<pid>/stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / per_second)
}
