//! Finding a pod on its node: its cgroup and its network namespace, from the pod's
//! UID (what the Kubernetes source knows) and the node's cgroup tree.
//!
//! The kubelet names a pod's cgroup after its UID: with the cgroupfs driver
//! `…/kubepods/<qos>/pod<uid>`, with the systemd driver
//! `…/kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid with _ for ->.slice`.
//! The containers' cgroups sit below it; any process in them (the pause process
//! first) shares the pod's network namespace, reached as `/proc/<pid>/ns/net`.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

/// Where a pod lives on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRuntime {
    pub cgroup: PathBuf,
    pub netns: PathBuf,
}

/// How deep below the root pod cgroups are looked for (kubepods/<qos>/pod<uid>).
const MAX_DEPTH: usize = 4;

/// The pod's runtime, or None when the node has no cgroup for it, or no process in
/// it yet.
pub fn find_pod(root: &Path, uid: &str) -> io::Result<Option<PodRuntime>> {
    let Some(cgroup) = find_cgroup(root, uid, 0)? else {
        return Ok(None);
    };
    Ok(first_pid(&cgroup, 0)?.map(|pid| PodRuntime {
        netns: PathBuf::from(format!("/proc/{pid}/ns/net")),
        cgroup,
    }))
}

fn is_pod_cgroup(name: &str, uid: &str) -> bool {
    name == format!("pod{uid}") || name.ends_with(&format!("-pod{}.slice", uid.replace('-', "_")))
}

fn subdirectories(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut dirs = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            dirs.push(entry.path());
        }
    }
    dirs.sort();
    Ok(dirs)
}

fn find_cgroup(dir: &Path, uid: &str, depth: usize) -> io::Result<Option<PathBuf>> {
    if depth > MAX_DEPTH {
        return Ok(None);
    }
    for sub in subdirectories(dir)? {
        let name = sub.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if is_pod_cgroup(name, uid) {
            return Ok(Some(sub));
        }
        if let Some(found) = find_cgroup(&sub, uid, depth + 1)? {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

/// A process in the cgroup or below it.
fn first_pid(dir: &Path, depth: usize) -> io::Result<Option<u32>> {
    let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    if let Some(pid) = procs.lines().find_map(|l| l.trim().parse().ok()) {
        return Ok(Some(pid));
    }
    if depth > MAX_DEPTH {
        return Ok(None);
    }
    for sub in subdirectories(dir)? {
        if let Some(pid) = first_pid(&sub, depth + 1)? {
            return Ok(Some(pid));
        }
    }
    Ok(None)
}
