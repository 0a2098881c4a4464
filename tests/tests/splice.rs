//! Same-node splice (`--same-node-splice`): a connection between two pods of one
//! node, once policy allows it, is joined in the kernel by the tunnel (eBPF
//! sockmap), or relayed in user space when that cannot be done.

use std::time::Duration;

use testbed::{
    app::{BenchMode, BenchServer, EchoServer},
    mesh::{eventually, metric, Mesh, WorkloadSpec},
    Cluster, ClusterSpec,
};

const PROBE: &str = env!("CARGO_BIN_EXE_tb-probe");

/// node-a: client, local-server; node-b: server. node-a's tunnel runs with
/// `--same-node-splice mode`.
async fn mesh(mode: &str) -> Mesh {
    let cluster = Cluster::new(
        &ClusterSpec::new()
            .node("node-a", ["client", "local-server"])
            .node("node-b", ["server"]),
    )
    .unwrap();
    let workloads = [
        WorkloadSpec::new("client", "demo", "client"),
        WorkloadSpec::new("local-server", "demo", "server"),
        WorkloadSpec::new("server", "demo", "server"),
    ];
    let mut mesh = Mesh::start(cluster, &workloads, &["demo"]).await.unwrap();
    mesh.stop_tunnel("node-a").await.unwrap();
    mesh.tunnel_args.insert(
        "node-a".into(),
        vec!["--same-node-splice".into(), mode.into()],
    );
    mesh.start_tunnel("node-a").await.unwrap();
    mesh
}

fn probe(mesh: &Mesh, args: &[&str]) -> String {
    mesh.output("client", PROBE, args)
}

async fn same_node(mesh: &Mesh, result: &str) -> f64 {
    metric(
        &mesh.metrics("node-a").await,
        "ztunnel_same_node_connections_total",
        &[&format!("result=\"{result}\"")],
    )
}

/// The byte counters of node-a for connections to the local server, by reporter:
/// (received, sent).
async fn bytes(mesh: &Mesh, reporter: &str) -> (f64, f64) {
    let page = mesh.metrics("node-a").await;
    let labels = [
        &format!("reporter=\"{reporter}\"") as &str,
        "source_workload=\"client\"",
        "destination_workload=\"local-server\"",
    ];
    (
        metric(&page, "istio_tcp_received_bytes_total", &labels),
        metric(&page, "istio_tcp_sent_bytes_total", &labels),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_same_node_connection_is_spliced_and_carries_every_byte_both_ways() {
    let mesh = mesh("kernel").await;
    let echo = EchoServer::start(mesh.cluster.pod("local-server"), 8080).unwrap();
    let target = mesh.addr("local-server", 8080);

    // Echo after the client's half-close: both directions and both FINs. (Not
    // at once: a socket that received FIN cannot join a sockhash.)
    let out = probe(&mesh, &["slow", &target, "300", "near"]);
    assert!(out.contains("reply=local-server:near"), "{out}");
    assert_eq!(same_node(&mesh, "spliced").await, 1.0);
    // Counted as HBONE would: both reports, from the sockets' counters: 4 bytes
    // in, "local-server:near" (17) out.
    eventually(
        Duration::from_secs(15),
        "the byte counts of both reports",
        || async {
            bytes(&mesh, "source").await == (4.0, 17.0)
                && bytes(&mesh, "destination").await == (4.0, 17.0)
        },
    )
    .await;
    let log = mesh.log("node-a");
    assert!(
        log.contains("bytes_received=4 bytes_sent=17"),
        "the access log counts the spliced bytes: {log}"
    );

    // In the kernel: no byte through the tunnel's user space.
    let carried = metric(
        &mesh.metrics("node-a").await,
        "ztunnel_same_node_carried_bytes_total",
        &[],
    );
    assert_eq!(carried, 0.0, "bytes carried in user space");
    // Delivered from the client's address, and never through HBONE.
    let peers = echo.stop().unwrap();
    assert!(peers
        .iter()
        .all(|p| p.ip() == mesh.cluster.pod("client").ip));
    assert!(
        !mesh.log("node-a").contains("HBONE connection accepted"),
        "same-node traffic took HBONE"
    );
}

/// 8 MB each way, the client's FIN right behind its last byte and the reply only
/// after it: each FIN arrives on its own (an empty skb) while bytes are in
/// flight the other way. (Redirecting an empty skb once made the kernel mark
/// the peer socket EPIPE, which ended the connection before the reply.)
#[tokio::test(flavor = "multi_thread")]
async fn large_spliced_transfers_deliver_every_byte_both_ways() {
    let mesh = mesh("kernel").await;
    let _echo = EchoServer::start(mesh.cluster.pod("local-server"), 8080).unwrap();
    let target = mesh.addr("local-server", 8080);
    // 8 MB each way, the reply only after the client's half-close.
    for round in 1..=3u32 {
        let out = probe(&mesh, &["bulk", &target, "8000000"]);
        assert!(
            out.contains("ok sent=8000000 received=8000000"),
            "{out}\n{}",
            mesh.log("node-a")
        );
        let n = f64::from(round);
        // Spliced, unless the client sent everything and half-closed before
        // the tunnel decided (a loaded machine, large buffers): then relayed.
        let joined = same_node(&mesh, "spliced").await;
        assert_eq!(joined + same_node(&mesh, "not_established").await, n);
        assert!(joined >= 1.0);
        eventually(Duration::from_secs(15), "the bulk byte counts", || async {
            bytes(&mesh, "source").await == (n * 8_000_000.0, n * 8_000_013.0)
        })
        .await;
    }
}

/// Attack: a client resets in the middle of a large spliced echo (its reply
/// backed up in the kernel). The tunnel ends both sides and reports it with an
/// error and no more bytes than the client sent, and the next spliced
/// connections carry every byte.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_reset_mid_transfer_ends_the_splice_and_the_tunnel_keeps_splicing() {
    let mesh = mesh("kernel").await;
    let _echo = BenchServer::start(
        mesh.cluster.pod("local-server"),
        8081,
        BenchMode::Echo,
        None,
    )
    .unwrap();
    let _bulk = EchoServer::start(mesh.cluster.pod("local-server"), 8080).unwrap();
    for round in 1..=3u32 {
        let spliced = same_node(&mesh, "spliced").await;
        let out = probe(
            &mesh,
            &["reset", &mesh.addr("local-server", 8081), "16000000"],
        );
        let sent: f64 = out
            .trim()
            .strip_prefix("sent=")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{out}"));
        assert!(sent > 0.0, "{out}");
        // Ended, with an error, counting at most what the client sent.
        let reports = |log: String| -> Vec<String> {
            log.lines()
                .filter(|l| l.contains("reporter=\"source\"") && l.contains(":8081 "))
                .map(str::to_string)
                .collect()
        };
        eventually(
            Duration::from_secs(15),
            "the reset connection reported",
            || async { reports(mesh.log("node-a")).len() == round as usize },
        )
        .await;
        let line = reports(mesh.log("node-a")).pop().unwrap();
        assert_eq!(same_node(&mesh, "spliced").await, spliced + 1.0, "{line}");
        assert!(
            !line.contains("error=\"\""),
            "the reset is an error: {line}"
        );
        let received: f64 = line
            .split("bytes_received=")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap();
        assert!(
            received <= sent,
            "counted {received} of {sent} sent: {line}"
        );

        // Another client's transfer, after the reset: spliced, whole.
        let out = probe(
            &mesh,
            &["bulk", &mesh.addr("local-server", 8080), "2000000"],
        );
        assert!(out.contains("ok sent=2000000 received=2000000"), "{out}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_policy_change_closes_a_spliced_connection() {
    let mesh = mesh("kernel").await;
    let _echo = EchoServer::start(mesh.cluster.pod("local-server"), 8080).unwrap();
    let mut slow = mesh
        .cluster
        .pod("client")
        .command(PROBE)
        .unwrap()
        .args(["slow", &mesh.addr("local-server", 8080), "6000", "doomed"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(slow.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line.trim(), "connected");
    eventually(
        Duration::from_secs(15),
        "the connection spliced",
        || async { same_node(&mesh, "spliced").await == 1.0 },
    )
    .await;
    mesh.deny_all_and_wait_for_a_live_connection_closed("node-a")
        .await;
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut stdout, &mut rest);
    let _ = slow.wait();
    assert!(
        !rest.contains("local-server:doomed"),
        "the denied connection carried on: {rest}"
    );
    // Closed with the bytes it carried: "doomed", counted from the socket.
    eventually(
        Duration::from_secs(15),
        "the closed connection counted",
        || async { bytes(&mesh, "source").await.0 == 6.0 },
    )
    .await;
    // A new connection is refused (by the HBONE path's decision, as for any client).
    let out = probe(&mesh, &["connect", &mesh.addr("local-server", 8080), "x"]);
    assert!(!out.contains("reply="), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_the_kernel_splice_same_node_connections_are_relayed_in_user_space() {
    let mesh = mesh("user").await;
    let _echo = EchoServer::start(mesh.cluster.pod("local-server"), 8080).unwrap();
    let target = mesh.addr("local-server", 8080);
    let out = probe(&mesh, &["bulk", &target, "2000000"]);
    assert!(out.contains("ok sent=2000000 received=2000000"), "{out}");
    assert_eq!(same_node(&mesh, "spliced").await, 0.0);
    assert_eq!(same_node(&mesh, "disabled").await, 1.0);
    eventually(Duration::from_secs(15), "the byte counts", || async {
        bytes(&mesh, "source").await == (2_000_000.0, 2_000_013.0)
            && bytes(&mesh, "destination").await == (2_000_000.0, 2_000_013.0)
    })
    .await;
}

/// The splice maps and program are the process's own: gone when it exits.
#[tokio::test(flavor = "multi_thread")]
async fn the_splice_map_goes_with_the_tunnel() {
    let mut mesh = mesh("kernel").await;
    let pid = mesh.tunnel_pid("node-a").unwrap();
    let ids = splice_map_ids(pid);
    assert_eq!(ids.len(), 1, "one splice sockhash in the tunnel");
    mesh.stop_tunnel("node-a").await.unwrap();
    eventually(Duration::from_secs(10), "the splice map freed", || async {
        !map_exists(ids[0])
    })
    .await;
}

/// BPF_MAP_TYPE_SOCKHASH with the splice map's size, among `pid`'s descriptors.
fn splice_map_ids(pid: u32) -> Vec<u32> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap() {
        let Ok(info) = std::fs::read_to_string(entry.unwrap().path()) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<u32>().ok())
        };
        if field("map_type:") == Some(18) && field("max_entries:") == Some(65_536) {
            ids.extend(field("map_id:"));
        }
    }
    ids.sort();
    ids.dedup();
    ids
}

/// Whether a BPF map with this id exists (BPF_MAP_GET_FD_BY_ID).
#[allow(unsafe_code)]
fn map_exists(id: u32) -> bool {
    const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
    let mut attr = [0u32; 4];
    attr[0] = id;
    // SAFETY: attr is a zeroed bpf_attr prefix large enough for this command.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_GET_FD_BY_ID,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd >= 0 {
        // SAFETY: a descriptor just returned to us.
        unsafe { libc::close(fd as libc::c_int) };
        return true;
    }
    false
}
