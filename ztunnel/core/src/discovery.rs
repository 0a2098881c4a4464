//! Finding a pod on its node: its cgroup and its network namespace, from the pod's
//! UID (what the Kubernetes source knows) and the node's cgroup tree.
//!
//! The kubelet names a pod's cgroup after its UID: with the cgroupfs driver
//! `…/kubepods/<qos>/pod<uid>`, with the systemd driver
//! `…/kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid with _ for ->.slice`.
//! The containers' cgroups sit below it; any process in them (the pause process
//! first) shares the pod's network namespace, reached as `/proc/<pid>/ns/net`.

use std::{
    collections::HashMap,
    fs, io,
    path::{Path, PathBuf},
};

/// Where a pod lives on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRuntime {
    pub cgroup: PathBuf,
    pub netns: PathBuf,
}

impl PodRuntime {
    /// Whether it still describes the pod: its cgroup is there and the process its
    /// namespace was found through is still in it (the PID, reused by a process
    /// elsewhere, would name another namespace).
    pub fn is_current(&self) -> bool {
        self.cgroup.exists()
            && match crate::netns::proc_pid(&self.netns) {
                Some(pid) => cgroup_holds(&self.cgroup, pid),
                None => self.netns.exists(),
            }
    }
}

/// How deep below the root pod cgroups are looked for (kubepods/<qos>/pod<uid>).
const MAX_DEPTH: usize = 4;

/// The pod's runtime, or None when the node has no cgroup for it, or no process in
/// it yet.
pub fn find_pod(root: &Path, uid: &str) -> io::Result<Option<PodRuntime>> {
    match pod_cgroups(root)?.get(uid) {
        Some(cgroup) => runtime_of(cgroup),
        None => Ok(None),
    }
}

/// Every pod cgroup below the root, by pod UID: one walk of the tree for all pods.
pub fn pod_cgroups(root: &Path) -> io::Result<HashMap<String, PathBuf>> {
    let mut found = HashMap::new();
    collect_pod_cgroups(root, 0, &mut found)?;
    Ok(found)
}

/// Where a pod with this cgroup lives: the cgroup and the network namespace of a
/// process in it; None while it has no process.
pub fn runtime_of(cgroup: &Path) -> io::Result<Option<PodRuntime>> {
    Ok(first_pid(cgroup, 0)?.map(|pid| PodRuntime {
        netns: PathBuf::from(format!("/proc/{pid}/ns/net")),
        cgroup: cgroup.to_owned(),
    }))
}

/// The pod UID a kubelet cgroup name carries, if it is a pod's.
fn pod_uid(name: &str) -> Option<String> {
    // systemd: kubepods-burstable-pod<uid with _>.slice, kubepods-pod<uid>.slice
    if let Some(stem) = name.strip_suffix(".slice") {
        let (_, uid) = stem.rsplit_once("-pod")?;
        return Some(uid.replace('_', "-"));
    }
    // cgroupfs: pod<uid>
    name.strip_prefix("pod").map(str::to_owned)
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

fn collect_pod_cgroups(
    dir: &Path,
    depth: usize,
    found: &mut HashMap<String, PathBuf>,
) -> io::Result<()> {
    if depth > MAX_DEPTH {
        return Ok(());
    }
    for sub in subdirectories(dir)? {
        let name = sub.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        match pod_uid(name).filter(|uid| !uid.is_empty()) {
            // The containers below a pod's cgroup are not pods.
            Some(uid) => {
                found.insert(uid, sub);
            }
            None => collect_pod_cgroups(&sub, depth + 1, found)?,
        }
    }
    Ok(())
}

/// Whether process `pid` is in the cgroup or below it (read after the fact: a
/// process cannot be moved into a pod's cgroup by a PID's reuse).
pub fn cgroup_holds(cgroup: &Path, pid: u32) -> bool {
    fn walk(dir: &Path, pid: u32, depth: usize) -> bool {
        let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        if procs.lines().any(|l| l.trim().parse() == Ok(pid)) {
            return true;
        }
        depth < MAX_DEPTH
            && subdirectories(dir)
                .unwrap_or_default()
                .iter()
                .any(|sub| walk(sub, pid, depth + 1))
    }
    walk(cgroup, pid, 0)
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

/// The kubelet's cgroup holding every pod, found below the cgroup v2 mount: the
/// cgroupfs driver's `kubepods`, the systemd driver's `kubepods.slice`, or, with a
/// kubelet `--cgroup-root` (kind's `/kubelet`), `kubelet.slice/kubelet-kubepods.slice`.
pub fn kubepods_root(cgroup_mount: &Path) -> io::Result<Option<PathBuf>> {
    let is_kubepods = |name: &str| {
        name == "kubepods" || name == "kubepods.slice" || name.ends_with("-kubepods.slice")
    };
    let mut level = vec![cgroup_mount.to_owned()];
    for _ in 0..3 {
        let mut next = Vec::new();
        for dir in &level {
            for sub in subdirectories(dir)? {
                if sub
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(is_kubepods)
                {
                    return Ok(Some(sub));
                }
                next.push(sub);
            }
        }
        level = next;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runtime_whose_process_left_the_pod_cgroup_is_stale() {
        let dir = std::env::temp_dir().join(format!("ztunnel-discovery-{}", std::process::id()));
        let sandbox = dir.join("pod0c0ffee/sandbox");
        fs::create_dir_all(&sandbox).unwrap();
        fs::write(sandbox.join("cgroup.procs"), "4242\n").unwrap();
        let runtime = |pid: u32| PodRuntime {
            cgroup: dir.join("pod0c0ffee"),
            netns: PathBuf::from(format!("/proc/{pid}/ns/net")),
        };
        assert!(runtime(4242).is_current());
        assert!(
            !runtime(4243).is_current(),
            "a PID outside the pod's cgroup"
        );
        fs::write(sandbox.join("cgroup.procs"), "").unwrap();
        assert!(!runtime(4242).is_current(), "the process left");
        fs::remove_dir_all(&dir).unwrap();
        assert!(!runtime(4242).is_current(), "the cgroup is gone");
    }
}
