//! Finding a pod's cgroup and network namespace from its UID, on a node laid out
//! as the kubelet lays it out (both cgroup drivers), faked on the testbed.

use std::{fs, os::unix::fs::MetadataExt, path::Path};

use testbed::{Cluster, ClusterSpec};
use ztunnel::discovery::find_pod;

fn same_netns(a: &Path, b: &Path) -> bool {
    let (a, b) = (fs::metadata(a).unwrap(), fs::metadata(b).unwrap());
    (a.dev(), a.ino()) == (b.dev(), b.ino())
}

#[test]
fn a_pods_cgroup_and_netns_are_found_from_its_uid() {
    let cluster =
        Cluster::new(&ClusterSpec::new().node("node", ["systemd-pod", "cgroupfs-pod"])).unwrap();
    let root = &cluster.node("node").pod_cgroup_root;
    let layouts = [
        ("systemd-pod", "0f1e2d3c-aaaa-bbbb", "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0f1e2d3c_aaaa_bbbb.slice/cri-containerd-abc.scope"),
        ("cgroupfs-pod", "9a8b7c6d-cccc-dddd", "kubepods/burstable/pod9a8b7c6d-cccc-dddd/0123456789abcdef"),
    ];
    let mut children = Vec::new();
    for (pod, uid, container) in layouts {
        let container = root.join(container);
        fs::create_dir_all(&container).unwrap();
        // A process of the pod (in its netns), moved into the container's cgroup.
        let child = cluster
            .pod(pod)
            .command("sleep")
            .unwrap()
            .arg("60")
            .spawn()
            .unwrap();
        fs::write(container.join("cgroup.procs"), child.id().to_string()).unwrap();
        children.push(child);
        let found = find_pod(root, uid).unwrap().expect("the pod is found");
        assert_eq!(
            found.cgroup,
            container.parent().unwrap(),
            "{pod}: the pod's cgroup, not the container's"
        );
        assert!(
            same_netns(&found.netns, &cluster.pod(pod).netns_path()),
            "{pod}: the pod's network namespace"
        );
    }
    assert_eq!(find_pod(root, "no-such-uid").unwrap(), None);
    for mut child in children {
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

#[test]
fn the_kubelets_pod_cgroup_is_found_below_the_cgroup_mount_for_each_layout() {
    use ztunnel::discovery::kubepods_root;
    for (layout, expected) in [
        (
            "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice",
            "kubelet.slice/kubelet-kubepods.slice",
        ),
        ("kubepods.slice/kubepods-burstable.slice", "kubepods.slice"),
        ("kubepods/burstable/pod1234", "kubepods"),
    ] {
        let dir = testbed::mesh::TempDir::new("kubepods").unwrap();
        fs::create_dir_all(dir.path().join("system.slice/containerd.service")).unwrap();
        fs::create_dir_all(dir.path().join(layout)).unwrap();
        assert_eq!(
            kubepods_root(dir.path()).unwrap(),
            Some(dir.path().join(expected)),
            "{layout}"
        );
    }
    let empty = testbed::mesh::TempDir::new("no-kubepods").unwrap();
    assert_eq!(kubepods_root(empty.path()).unwrap(), None);
}
