//! `cargo xtask bench redirect`: what enrolling costs, and what the redirection adds
//! to a connect(). Figures that compare are measured in the same run and reported
//! as ratios; absolute times are for orientation only on a shared machine.
//!
//! - Enrollment: 1,000 pods (network namespaces with their own cgroups) enrolled
//!   into one tunnel, each timed; then unenrolled.
//! - connect(): from a process in an enrolled pod (captured: to the tunnel's listener
//!   in the pod) versus one in an unenrolled pod (to a listener on the pod's own
//!   address), both loopback handshakes, so the difference is the eBPF programs.
//!   Rounds alternate between the two pods.

use std::{
    fs::{self, File},
    io,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use testbed::{Cluster, ClusterSpec};
use ztunnel::redirect::{PodNetwork, RedirectConfig, Redirector};

const PODS: usize = 1_000;
const ROUNDS: usize = 5;
const CONNECTS_PER_ROUND: usize = 2_000;

fn main() -> Result<()> {
    raise_fd_limit()?;
    let cluster = Cluster::new(&ClusterSpec::new().node("node", ["enrolled", "plain"]))?;
    let node = cluster.node("node");
    let mut redirector = Redirector::start(RedirectConfig {
        pin_dir: node.bpffs.join("ztunnel"),
        pod_cgroup_root: node.pod_cgroup_root.clone(),
    })?;

    enrollment(&mut redirector, &node.pod_cgroup_root)?;
    connect_latency(&cluster, &mut redirector)?;
    drop(redirector);
    cluster.cleanup()
}

fn enrollment(redirector: &mut Redirector, cgroup_root: &Path) -> Result<()> {
    let mut namespaces = Vec::with_capacity(PODS);
    for i in 0..PODS {
        let cgroup = cgroup_root.join(format!("bench-{i}"));
        fs::create_dir(&cgroup)?;
        namespaces.push((new_netns()?, cgroup));
    }
    let mut enroll_times = Vec::with_capacity(PODS);
    let mut enrolled = Vec::with_capacity(PODS);
    let started = Instant::now();
    for (i, (netns, cgroup)) in namespaces.iter().enumerate() {
        let pod = PodNetwork {
            netns: PathBuf::from(format!("/proc/self/fd/{}", netns.as_raw_fd())),
            cgroup: cgroup.clone(),
            ip: Ipv4Addr::new(10, 200, (i / 250) as u8, (i % 250 + 1) as u8),
            allow_plaintext_udp: false,
            dns_capture: true,
        };
        let t = Instant::now();
        let listeners = redirector.enroll(&pod)?;
        enroll_times.push(t.elapsed());
        enrolled.push((pod.ip, listeners));
    }
    let enroll_total = started.elapsed();
    let pinned = redirector.enrolled_pods()?.len();

    let started = Instant::now();
    let mut unenroll_times = Vec::with_capacity(PODS);
    for (ip, listeners) in enrolled {
        let t = Instant::now();
        redirector.unenroll(listeners.netns_cookie, ip)?;
        unenroll_times.push(t.elapsed());
    }
    let unenroll_total = started.elapsed();

    println!(
        "redirect/enroll   {PODS} pods: total {enroll_total:.2?}, {}",
        summary(&mut enroll_times)
    );
    println!(
        "redirect/unenroll {PODS} pods: total {unenroll_total:.2?}, {}",
        summary(&mut unenroll_times)
    );
    println!("redirect/enroll   pods in the enrolled map at the peak: {pinned}");
    Ok(())
}

fn connect_latency(cluster: &Cluster, redirector: &mut Redirector) -> Result<()> {
    let (enrolled, plain) = (cluster.pod("enrolled"), cluster.pod("plain"));
    let listeners = redirector.enroll(&PodNetwork {
        netns: enrolled.netns_path(),
        cgroup: enrolled.cgroup.clone(),
        ip: enrolled.ip,
        allow_plaintext_udp: false,
        dns_capture: true,
    })?;
    let tunnel = listeners.outbound.try_clone()?;
    tunnel.set_nonblocking(false)?;
    let tunnel_accepted = spawn_acceptor(tunnel);
    let plain_ip = plain.ip;
    let app = plain.in_netns(move || TcpListener::bind((plain_ip, 9000)))??;
    let app_accepted = spawn_acceptor(app);

    // Back to our own cgroup whatever happens: the cluster's cleanup kills every
    // process left in its cgroups.
    let _home = Home(current_cgroup()?);
    let mut captured = Vec::new();
    let mut direct = Vec::new();
    for _ in 0..ROUNDS {
        // The whole process joins the pod's cgroup (cgroup programs see the process'
        // cgroup); the measuring thread enters the pod's network namespace.
        join_cgroup(&enrolled.cgroup)?;
        // Any address outside the pod is captured (its own address is not).
        let target = SocketAddr::new(std::net::Ipv4Addr::new(10, 255, 0, 1).into(), 9000);
        captured.extend(enrolled.in_netns(move || time_connects(target))??);
        join_cgroup(&plain.cgroup)?;
        let target = SocketAddr::new(plain.ip.into(), 9000);
        direct.extend(plain.in_netns(move || time_connects(target))??);
    }
    join_cgroup(&_home.0)?;
    // Every enrolled connect() went to the tunnel (nothing answers 10.255.0.1),
    // every unenrolled one to the app.
    let expected = ROUNDS * CONNECTS_PER_ROUND;
    wait_for(
        || tunnel_accepted.load(Ordering::Relaxed) == expected,
        "tunnel accepts",
    )?;
    wait_for(
        || app_accepted.load(Ordering::Relaxed) == expected,
        "app accepts",
    )?;

    let (c, d) = (median(&mut captured), median(&mut direct));
    println!(
        "redirect/connect  enrolled median {c:.1?}, unenrolled median {d:.1?}: ratio {:.2} ({ROUNDS} rounds x {CONNECTS_PER_ROUND} connects each)",
        c.as_secs_f64() / d.as_secs_f64()
    );
    drop(listeners);
    Ok(())
}

fn time_connects(target: SocketAddr) -> io::Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(CONNECTS_PER_ROUND);
    for _ in 0..CONNECTS_PER_ROUND {
        let t = Instant::now();
        let stream = TcpStream::connect(target)?;
        times.push(t.elapsed());
        set_linger_zero(&stream)?;
    }
    Ok(times)
}

/// Close with RST: 20,000 connections would otherwise leave as many TIME_WAITs.
fn set_linger_zero(stream: &TcpStream) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a correctly sized option value.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Accepts and drops connections on a thread; returns the running count.
fn spawn_acceptor(listener: TcpListener) -> Arc<AtomicUsize> {
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    thread::spawn(move || {
        while let Ok((stream, _)) = listener.accept() {
            counter.fetch_add(1, Ordering::Relaxed);
            drop(stream);
        }
    });
    count
}

fn wait_for(done: impl Fn() -> bool, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        anyhow::ensure!(Instant::now() < deadline, "{what}: count never reached");
        thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// A new network namespace with loopback up, held open by the returned file.
fn new_netns() -> Result<File> {
    thread::spawn(|| -> Result<File> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
        loopback_up()?;
        Ok(File::open("/proc/thread-self/ns/net")?)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
}

fn loopback_up() -> io::Result<()> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
    // SAFETY: ifreq is plain data; the ioctls read and write it in place.
    unsafe {
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) != 0 {
            return Err(io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &req) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn current_cgroup() -> Result<PathBuf> {
    let text = fs::read_to_string("/proc/self/cgroup")?;
    let path = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .context("no cgroup v2 entry in /proc/self/cgroup")?;
    Ok(testbed::host::cgroup2_root()?.join(path.trim_start_matches('/')))
}

/// Joins the cgroup it holds when dropped.
struct Home(PathBuf);

impl Drop for Home {
    fn drop(&mut self) {
        let _ = join_cgroup(&self.0);
    }
}

fn join_cgroup(cgroup: &Path) -> Result<()> {
    fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
        .with_context(|| format!("joining {}", cgroup.display()))
}

fn raise_fd_limit() -> Result<()> {
    // Four sockets and a namespace per pod.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(())
}

fn median(times: &mut [Duration]) -> Duration {
    times.sort_unstable();
    times[times.len() / 2]
}

fn summary(times: &mut [Duration]) -> String {
    times.sort_unstable();
    let pct = |p: f64| times[((times.len() - 1) as f64 * p) as usize];
    let mean = times.iter().sum::<Duration>() / times.len() as u32;
    format!(
        "per pod mean {mean:.2?}, p50 {:.2?}, p99 {:.2?}, max {:.2?}",
        pct(0.5),
        pct(0.99),
        times[times.len() - 1]
    )
}
