//! eBPF redirection end to end: real programs, real pods, real sockets. The node
//! tunnel is `tb-tunnel`, a process driving ztunnel's `redirect` module, so stopping
//! it is a real process exit.

use std::{
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
};

use testbed::{
    app::{EchoServer, UdpEcho},
    Cluster, ClusterSpec, Pod,
};

const PROBE: &str = env!("CARGO_BIN_EXE_tb-probe");
const TUNNEL: &str = env!("CARGO_BIN_EXE_tb-tunnel");

/// node-a: client and server (enrolled by the tests that want them), plain (never);
/// node-b: remote (never enrolled).
fn cluster() -> Cluster {
    Cluster::new(
        &ClusterSpec::new()
            .node("node-a", ["client", "server", "plain"])
            .node("node-b", ["remote"]),
    )
    .unwrap()
}

fn pod_arg(pod: &Pod) -> String {
    format!(
        "{},{},{}",
        pod.netns_path().display(),
        pod.cgroup.display(),
        pod.ip
    )
}

/// A running tb-tunnel on node-a; killed (SIGKILL) on drop.
struct Tunnel {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Tunnel {
    fn start(cluster: &Cluster, enrolled: &[&str]) -> Tunnel {
        let node = cluster.node("node-a");
        Tunnel::start_with(cluster, enrolled, node.command(TUNNEL).unwrap())
    }

    fn start_with(cluster: &Cluster, enrolled: &[&str], mut cmd: Command) -> Tunnel {
        let node = cluster.node("node-a");
        cmd.arg("--pin-dir")
            .arg(pin_dir(cluster))
            .arg("--pod-cgroup-root")
            .arg(&node.pod_cgroup_root);
        for pod in enrolled {
            cmd.arg("--pod").arg(pod_arg(cluster.pod(pod)));
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut tunnel = Tunnel {
            stdin: child.stdin.take().unwrap(),
            stdout: BufReader::new(child.stdout.take().unwrap()),
            child,
        };
        // tb-tunnel prints `ready` or exits (EOF) with its error on stderr.
        assert_eq!(tunnel.line(), "ready");
        tunnel
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().to_owned()
    }

    fn command(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").unwrap();
        self.line()
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pin_dir(cluster: &Cluster) -> PathBuf {
    cluster.node("node-a").bpffs.join("ztunnel")
}

/// tb-probe's output for a TCP exchange from `pod`.
fn connect(cluster: &Cluster, pod: &str, target: SocketAddr, message: &str) -> String {
    let out = cluster
        .pod(pod)
        .run(PROBE, ["connect", &target.to_string(), message])
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn addr(pod: &Pod, port: u16) -> SocketAddr {
    SocketAddr::new(pod.ip.into(), port)
}

#[test]
fn outbound_connect_is_captured_with_its_original_destination() {
    let cluster = cluster();
    let _tunnel = Tunnel::start(&cluster, &["client"]);

    // Anywhere at all: the tunnel accepts it and knows where it was going, and the
    // application sees the peer it asked for.
    let out = connect(&cluster, "client", "10.1.2.3:4567".parse().unwrap(), "x");
    assert!(out.contains("reply=outbound orig=10.1.2.3:4567\n"), "{out}");
    assert!(out.contains("peer=10.1.2.3:4567\n"), "{out}");

    // A real destination: the tunnel's own connection from the node is not captured
    // again, and reaches the remote pod from the node's address.
    let remote = cluster.pod("remote");
    let echo = EchoServer::start(remote, 8080).unwrap();
    let out = connect(&cluster, "client", addr(remote, 8080), "hello");
    assert!(
        out.contains(&format!(
            "reply=outbound orig={}\nremote:hello",
            addr(remote, 8080)
        )),
        "{out}"
    );
    let peers = echo.stop().unwrap();
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].ip(), cluster.node("node-a").ip);
}

#[test]
fn loopback_inside_an_enrolled_pod_is_untouched() {
    let cluster = cluster();
    let _tunnel = Tunnel::start(&cluster, &["client"]);
    let client = cluster.pod("client");
    let echo = EchoServer::start(client, 7000).unwrap();
    // To 127.0.0.1 and to the pod's own address: both stay inside the pod.
    let out = connect(&cluster, "client", "127.0.0.1:7000".parse().unwrap(), "lo");
    assert!(out.ends_with("reply=client:lo\n"), "{out}");
    let out = connect(&cluster, "client", addr(client, 7000), "self");
    assert!(out.ends_with("reply=client:self\n"), "{out}");
    let peers = echo.stop().unwrap();
    assert_eq!(peers[0].ip().to_string(), "127.0.0.1");
    assert_eq!(peers[1].ip(), client.ip);
}

#[test]
fn a_connect_to_0_0_0_0_stays_in_the_pod_and_never_reaches_the_node() {
    let cluster = cluster();
    let _tunnel = Tunnel::start(&cluster, &["client"]);
    // A service on the node's loopback (as the tunnel's admin is).
    let node_service = cluster
        .node("node-a")
        .in_netns(|| std::net::TcpListener::bind("127.0.0.1:7001"))
        .unwrap()
        .unwrap();
    node_service.set_nonblocking(true).unwrap();
    for target in ["0.0.0.0:7001", "0.1.2.3:7001"] {
        let out = connect(&cluster, "client", target.parse().unwrap(), "x");
        assert!(!out.contains("outbound orig="), "captured: {out}");
        assert!(out.contains("error="), "{out}");
    }
    assert!(
        node_service.accept().is_err(),
        "a pod reached the node's loopback"
    );
    // 0.0.0.0 is the pod itself.
    let echo = EchoServer::start(cluster.pod("client"), 7000).unwrap();
    let out = connect(&cluster, "client", "0.0.0.0:7000".parse().unwrap(), "me");
    assert!(out.ends_with("reply=client:me\n"), "{out}");
    assert_eq!(echo.stop().unwrap().len(), 1);
}

#[test]
fn udp_other_than_dns_from_an_enrolled_pod_is_refused_and_dns_still_answered() {
    let cluster = cluster();
    let _tunnel = Tunnel::start(&cluster, &["client"]);
    let (client, remote) = (cluster.pod("client"), cluster.pod("remote"));
    let echo = UdpEcho::start(remote, 9000).unwrap();
    let target = addr(remote, 9000).to_string();
    // sendto() (the sendmsg4 hook) and a connected socket (connect4).
    for mode in ["dns", "udp"] {
        let out = client.run(PROBE, [mode, &target, "leak?"]).unwrap();
        let out = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.contains("error=Operation not permitted"),
            "{mode}: {out}"
        );
    }
    // DNS is still captured and answered.
    let out = client.run(PROBE, ["dns", "10.96.0.10:53", "q"]).unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains("reply=dns pod="), "{out}");
    // UDP inside the pod is its own business.
    let own = UdpEcho::start(client, 9001).unwrap();
    let out = client.run(PROBE, ["udp", "127.0.0.1:9001", "lo"]).unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("reply=client:lo"));
    assert_eq!(own.stop().unwrap().len(), 1);
    // A pod outside the mesh is untouched.
    let out = cluster
        .pod("plain")
        .run(PROBE, ["udp", &target, "free"])
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("reply=remote:free"));
    let peers = echo.stop().unwrap();
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!(peers[0].ip(), cluster.pod("plain").ip);
}

#[test]
fn the_plaintext_udp_opt_out_lets_an_enrolled_pods_udp_through() {
    let cluster = cluster();
    let mut tunnel = Tunnel::start(&cluster, &[]);
    let (client, remote) = (cluster.pod("client"), cluster.pod("remote"));
    assert_eq!(
        tunnel.command(&format!("enroll {},udp", pod_arg(client))),
        "ok"
    );
    let echo = UdpEcho::start(remote, 9000).unwrap();
    let target = addr(remote, 9000).to_string();
    for mode in ["dns", "udp"] {
        let out = client.run(PROBE, [mode, &target, mode]).unwrap();
        let out = String::from_utf8_lossy(&out.stdout);
        assert!(out.contains(&format!("reply=remote:{mode}")), "{out}");
    }
    // TCP is still captured, DNS still answered by the tunnel.
    let out = connect(&cluster, "client", "10.1.2.3:4567".parse().unwrap(), "x");
    assert!(out.contains("reply=outbound orig=10.1.2.3:4567\n"), "{out}");
    let out = client.run(PROBE, ["dns", "10.96.0.10:53", "q"]).unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("reply=dns pod="));
    assert_eq!(echo.stop().unwrap().len(), 2);
}

#[test]
fn ipv6_sockets_are_captured_for_ipv4_and_refused_for_ipv6() {
    let cluster = cluster();
    let _tunnel = Tunnel::start(&cluster, &["client"]);
    // A dual-stack socket talking IPv4 (what Java and many runtimes do): captured.
    let out = connect(
        &cluster,
        "client",
        "[::ffff:10.1.2.3]:4567".parse().unwrap(),
        "x",
    );
    assert!(out.contains("reply=outbound orig=10.1.2.3:4567\n"), "{out}");
    assert!(out.contains("peer=[::ffff:10.1.2.3]:4567\n"), "{out}");
    // Real IPv6 is not carried by the mesh: refused rather than sent in the clear.
    let out = connect(&cluster, "client", "[fd00::1]:80".parse().unwrap(), "x");
    assert!(out.contains("error=Operation not permitted"), "{out}");
    let out = cluster
        .pod("client")
        .run(PROBE, ["dns", "[fd00::53]:53", "q"])
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains("error=Operation not permitted"), "{out}");
    // DNS over a dual-stack socket: captured, answered as from the server.
    let out = cluster
        .pod("client")
        .run(PROBE, ["dns", "[::ffff:8.8.4.4]:53", "q"])
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains("from=[::ffff:8.8.4.4]:53\n"), "{out}");
    assert!(out.contains("reply=dns pod="), "{out}");
}

#[test]
fn a_tunnel_under_the_pod_cgroup_root_does_not_capture_itself() {
    // On a Kubernetes node the tunnel's own pod sits under the same cgroup root as
    // the pods it captures: its sockets inside pods are exempt by their mark.
    let cluster = cluster();
    let node = cluster.node("node-a");
    let own = node.pod_cgroup_root.join("ztunnel");
    std::fs::create_dir(&own).unwrap();
    let cmd = node.command_in_cgroup(TUNNEL, &own).unwrap();
    let _tunnel = Tunnel::start_with(&cluster, &["server"], cmd);
    let server = cluster.pod("server");
    let echo = EchoServer::start(server, 8080).unwrap();
    let out = connect(&cluster, "remote", addr(server, 8080), "marked");
    assert!(out.contains("reply=inbound dst="), "{out}");
    assert!(out.ends_with("\nserver:marked\n"), "{out}");
    assert_eq!(echo.stop().unwrap().len(), 1);
}

#[test]
fn inbound_connections_reach_the_tunnel_with_their_port() {
    let cluster = cluster();
    let _tunnel = Tunnel::start(&cluster, &["server"]);
    let server = cluster.pod("server");
    let remote = cluster.pod("remote");
    let echo = EchoServer::start(server, 8080).unwrap();

    let out = connect(&cluster, "remote", addr(server, 8080), "hello");
    let header = format!(
        "reply=inbound dst={} peer={}:",
        addr(server, 8080),
        remote.ip
    );
    assert!(out.contains(&header), "{out}");
    // ... and the tunnel's delivery to the application, from inside the pod, reached
    // the application instead of looping back into the tunnel.
    assert!(out.contains("\nserver:hello"), "{out}");
    assert_eq!(echo.stop().unwrap()[0].ip(), server.ip);

    let out = connect(&cluster, "remote", addr(server, 15008), "");
    let header = format!(
        "reply=hbone dst={} peer={}:",
        addr(server, 15008),
        remote.ip
    );
    assert!(out.contains(&header), "{out}");
}

#[test]
fn pods_that_are_not_enrolled_are_untouched() {
    let cluster = cluster();
    let _tunnel = Tunnel::start(&cluster, &["client", "server"]);
    let (plain, remote) = (cluster.pod("plain"), cluster.pod("remote"));
    let remote_echo = EchoServer::start(remote, 8080).unwrap();
    let plain_echo = EchoServer::start(plain, 8080).unwrap();

    let out = connect(&cluster, "plain", addr(remote, 8080), "hello");
    assert!(out.ends_with("reply=remote:hello\n"), "{out}");
    let out = connect(&cluster, "remote", addr(plain, 8080), "hi");
    assert!(out.ends_with("reply=plain:hi\n"), "{out}");
    assert_eq!(remote_echo.stop().unwrap()[0].ip(), plain.ip);
    assert_eq!(plain_echo.stop().unwrap()[0].ip(), remote.ip);
}

fn link_inodes(pin_dir: &Path) -> Vec<u64> {
    let mut pins = vec![
        pin_dir.join("links/connect4"),
        pin_dir.join("links/sockops"),
    ];
    for pod in std::fs::read_dir(pin_dir.join("pods")).unwrap() {
        pins.push(pod.unwrap().path().join("inbound"));
    }
    pins.iter()
        .map(|p| std::fs::metadata(p).unwrap().ino())
        .collect()
}

#[test]
fn with_the_tunnel_down_enrolled_pods_fail_closed_and_recover_on_restart() {
    let cluster = cluster();
    let (server, remote) = (cluster.pod("server"), cluster.pod("remote"));
    let tunnel = Tunnel::start(&cluster, &["client", "server"]);
    let pins_before = link_inodes(&pin_dir(&cluster));
    tunnel.kill();

    let remote_echo = EchoServer::start(remote, 8080).unwrap();
    let server_echo = EchoServer::start(server, 8080).unwrap();
    // Outbound: refused, not sent in the clear.
    let out = connect(&cluster, "client", addr(remote, 8080), "leak?");
    assert!(out.contains("error=Connection refused"), "{out}");
    // Inbound plaintext: never reaches the application.
    let out = connect(&cluster, "remote", addr(server, 8080), "leak?");
    assert!(out.starts_with("error="), "{out}");
    assert!(
        server_echo.stop().unwrap().is_empty(),
        "the app got a connection"
    );
    assert!(
        remote_echo.stop().unwrap().is_empty(),
        "the remote got a connection"
    );

    // Back again, with the pods' enrollment found in the pins, not redone.
    let _tunnel = Tunnel::start(&cluster, &["client", "server"]);
    assert_eq!(link_inodes(&pin_dir(&cluster)), pins_before);
    let remote_echo = EchoServer::start(remote, 8080).unwrap();
    let out = connect(&cluster, "client", addr(remote, 8080), "again");
    assert!(out.contains("\nremote:again"), "{out}");
    let server_echo = EchoServer::start(server, 8080).unwrap();
    let out = connect(&cluster, "remote", addr(server, 8080), "in");
    assert!(out.contains("reply=inbound dst="), "{out}");
    assert!(out.contains("\nserver:in"), "{out}");
    assert_eq!(remote_echo.stop().unwrap().len(), 1);
    assert_eq!(server_echo.stop().unwrap().len(), 1);
}

#[test]
fn unenroll_restores_direct_traffic() {
    let cluster = cluster();
    let mut tunnel = Tunnel::start(&cluster, &["client", "server"]);
    let (client, server, remote) = (
        cluster.pod("client"),
        cluster.pod("server"),
        cluster.pod("remote"),
    );
    let remote_echo = EchoServer::start(remote, 8080).unwrap();
    let server_echo = EchoServer::start(server, 8080).unwrap();
    assert!(connect(&cluster, "client", addr(remote, 8080), "a").contains("outbound orig="));

    assert_eq!(tunnel.command(&format!("unenroll {}", client.ip)), "ok");
    assert_eq!(tunnel.command(&format!("unenroll {}", server.ip)), "ok");
    let out = connect(&cluster, "client", addr(remote, 8080), "direct");
    assert!(out.ends_with("reply=remote:direct\n"), "{out}");
    let out = connect(&cluster, "remote", addr(server, 8080), "direct");
    assert!(out.ends_with("reply=server:direct\n"), "{out}");
    let pods_pinned = std::fs::read_dir(pin_dir(&cluster).join("pods"))
        .unwrap()
        .count();
    assert_eq!(
        pods_pinned, 0,
        "unenroll left the pods' sk_lookup links pinned"
    );

    let peers = remote_echo.stop().unwrap();
    assert_eq!(
        peers[1].ip(),
        client.ip,
        "after unenroll the remote sees the pod itself"
    );
    assert_eq!(server_echo.stop().unwrap()[0].ip(), remote.ip);

    // And enrolling again captures again.
    assert_eq!(tunnel.command(&format!("enroll {}", pod_arg(client))), "ok");
    assert!(
        connect(&cluster, "client", "10.9.9.9:99".parse().unwrap(), "")
            .contains("orig=10.9.9.9:99")
    );
}

#[test]
fn dns_from_an_enrolled_pod_reaches_the_tunnel_and_answers_from_the_server() {
    let cluster = cluster();
    let _tunnel = Tunnel::start(&cluster, &["client"]);
    let client = cluster.pod("client");
    for server in ["10.96.0.10:53", "8.8.8.8:53"] {
        let out = client.run(PROBE, ["dns", server, "example.com"]).unwrap();
        let out = String::from_utf8_lossy(&out.stdout);
        assert!(out.contains(&format!("from={server}\n")), "{out}");
        assert!(
            out.contains(&format!("reply=dns pod={} query=example.com", client.ip)),
            "{out}"
        );
    }
}

#[test]
fn bpffs_is_mounted_where_a_node_has_none_and_left_alone_where_it_has() {
    use ztunnel::redirect::{is_bpffs, mount_bpffs};
    /// Unmounts even when an assertion fails.
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = nix::mount::umount(&self.0);
        }
    }
    let dir = testbed::mesh::TempDir::new("bpffs").unwrap();
    let path = dir.path().join("bpf");
    assert!(!is_bpffs(dir.path()).unwrap());
    let _unmount = Unmount(path.clone());
    assert!(mount_bpffs(&path).unwrap(), "mounted where there was none");
    assert!(is_bpffs(&path).unwrap());
    assert!(!mount_bpffs(&path).unwrap(), "an existing mount is kept");
}
