//! A small network client for tests to run inside pods (as a process, so that it is
//! in the pod's cgroup). Prints what it saw as `key=value` lines.
//!
//!   tb-probe connect <ip:port> <message>   send, read the reply to EOF
//!   tb-probe dns <ip:port> <query>         one datagram with sendto, print the reply
//!   tb-probe udp <ip:port> <message>       the same on a connected UDP socket
//!   tb-probe bulk <ip:port> <bytes>         send that many bytes, half-close, check
//!                                          the echo (`<name>:<payload>`) comes back whole
//!   tb-probe parallel <ip:port> <n> <msg>  n connections at once, each one exchange
//!                                          (also prints each one's time to its end)
//!   tb-probe dnsflood <ip:port> <n> <name> n DNS queries (A) from one socket, no waiting;
//!                                          `{i}` in the name becomes the query's number
//!   tb-probe dnsquery <ip:port> <name>     one DNS query (A): id=, code=, a= (the addresses)
//!   tb-probe dnsbench <ip:port> <n> <name> <c>  n DNS queries (A), c sockets each asking in
//!                                          turn (`{i}` as above): rate, p50, p99, failed
//!   tb-probe load <ip:port> <ms> <msg>     exchanges with an echo for a while, going
//!                                          on through failures: ok=, failed=
//!   tb-probe connect-from <ip> <ip:port> <msg>  like connect, from a chosen source
//!   tb-probe slow <ip:port> <ms> <msg>     connect, send, wait, then half-close and read
//!   tb-probe stall <ip:port> <msg>         send (e.g. part of a request), then nothing:
//!                                          what came back and when the peer closed
//!   tb-probe late <ip:port> <ms> <msg>     connect, wait, then send and read to the end
//!   tb-probe greeting <ip:port> <ms>       connect, send nothing: reply= (what the server
//!                                          sends first, until it closes or for ms)
//!   tb-probe reset <ip:port> <bytes>       send up to that many bytes (what the peer takes
//!                                          within a second, reading nothing), then reset: sent=
//! Measurements (against testbed::app::BenchServer):
//!   tb-probe throughput <ip:port> <bytes> [n]  send to a sink (over n connections at
//!                                          once, bytes in all); print bits per second
//!   tb-probe rr <ip:port> <count> <cpu>    1-byte round trips to an echo, pinned to a CPU
//!                                          (`any`: not pinned)
//!   tb-probe conns <ip:port> <ms>          connect/exchange/close for a while: rate
//!   tb-probe idle <ip:port> <n>            hold n idle connections until stdin closes
//!   tb-probe h2 <ip:port> <METHOD> <path>  one HTTP/2 request (prior knowledge)
//!   tb-probe upgrade <ip:port> <path> <message>  HTTP/1.1 Upgrade: websocket, then message and its echo
//!   tb-probe h2many <ip:port> <n> <path>   one GET, then n at once, on one HTTP/2 connection
//!   tb-probe grpc <ip:port> unary|stream <message> <count> <code>  a call of testbed::l7's Echo
//!   tb-probe httpload <ip:port> <n>        n keep-alive GETs on one connection: rate, p50, p99
//!   tb-probe httpbench <ip:port> h1|h2 <c> <n>  n GETs (or for `<ms>ms`), c at a time (HTTP/1.1:
//!                                          c keep-alive connections; HTTP/2: c streams on one):
//!                                          rate, p50, p99
//!   tb-probe httprate <ip:port> h1|h2 <c> <rate> <ms>  GETs due at a fixed rate (open loop)
//!                                          for ms, on c connections or streams: rate, p50, p99
//!   tb-probe http <ip:port> <METHOD> <path> [Name:value]...  one HTTP/1.1 request
//!   tb-probe httpstop <ip:port> <path>  a GET whose response is left unread: the head
//!                                          read (status=), then the connection closed
//!   tb-probe h2raw <ip:port> preface|headers|request  HTTP/2 frames by hand: the preface
//!                                          alone, a GET's header block never finished, or
//!                                          one whole GET; then frames= (type:stream),
//!                                          goaway= (its code, or none), goaway_ms=, closed_ms=
//!   tb-probe post <ip:port> h1|h2 <path> <bytes>  a POST of that many bytes (testbed::l7::pattern)
//!                                          with its content-length: status=, body=
//!   tb-probe h2upload <ip:port> <path>     an HTTP/2 POST whose body stalls after 4 of
//!                                          its 100 bytes: status=, ms=
//!   tb-probe hold-cluster <spec.yaml>      build a cluster, print its prefix, wait
use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream, UdpSocket},
    process::ExitCode,
    time::{Duration, Instant},
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["connect", addr, message] => connect(addr, message),
        ["dns", addr, query] => dns(addr, query),
        ["udp", addr, message] => udp(addr, message),
        ["bulk", addr, bytes] => bulk(addr, bytes),
        ["parallel", addr, n, message] => parallel(addr, n, message),
        ["dnsflood", addr, n, name] => dns_flood(addr, n, name),
        ["dnsquery", addr, name] => dns_query(addr, name),
        ["dnsbench", addr, n, name, concurrency] => dns_bench(addr, n, name, concurrency),
        ["load", addr, millis, message] => load(addr, millis, message),
        ["connect-from", source, addr, message] => connect_from(source, addr, message),
        ["slow", addr, millis, message] => slow(addr, millis, message),
        ["stall", addr, message] => stall(addr, message),
        ["late", addr, millis, message] => late(addr, millis, message),
        ["greeting", addr, millis] => greeting(addr, millis),
        ["reset", addr, bytes] => reset(addr, bytes),
        ["throughput", addr, bytes] => throughput(addr, bytes, "1"),
        ["throughput", addr, bytes, streams] => throughput(addr, bytes, streams),
        ["rr", addr, count, cpu] => round_trips(addr, count, cpu),
        ["conns", addr, millis] => connections(addr, millis),
        ["idle", addr, n] => idle(addr, n),
        ["httpload", addr, n] => http_load(addr, n),
        ["httpbench", addr, version, concurrency, n] => http_bench(addr, version, concurrency, n),
        ["httprate", addr, version, concurrency, rate, millis] => {
            http_rate(addr, version, concurrency, rate, millis)
        }
        ["h2", addr, method, path] => h2(addr, method, path),
        ["h2many", addr, n, path] => h2_many(addr, n, path),
        ["upgrade", addr, path, message] => upgrade(addr, path, message),
        ["grpc", addr, call, message, count, code] => grpc(addr, call, message, count, code),
        ["http", addr, method, path, headers @ ..] => http(addr, method, path, headers),
        ["httpstop", addr, path] => http_stop(addr, path),
        ["h2raw", addr, mode] => h2_raw(addr, mode),
        ["h2upload", addr, path] => h2_upload(addr, path),
        ["post", addr, version, path, bytes] => post(addr, version, path, bytes),
        ["expect100", addr, path, bytes] => expect_100(addr, path, bytes),
        ["hold-cluster", spec] => hold_cluster(spec),
        _ => Err(anyhow::anyhow!(
            "usage: tb-probe connect <ip:port> <message> | dns <ip:port> <query> | hold-cluster <spec.yaml>"
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("error={e:#}");
            ExitCode::FAILURE
        }
    }
}

fn connect(addr: &str, message: &str) -> anyhow::Result<()> {
    let addr: SocketAddr = addr.parse()?;
    // Short: tests also check that a dropped SYN never connects.
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    println!("peer={}", stream.peer_addr()?);
    println!("local={}", stream.local_addr()?);
    stream.write_all(message.as_bytes())?;
    stream.shutdown(Shutdown::Write)?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    println!("reply={reply}");
    Ok(())
}

fn udp(addr: &str, message: &str) -> anyhow::Result<()> {
    let addr: SocketAddr = addr.parse()?;
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(Duration::from_secs(5)))?;
    socket.connect(addr)?;
    socket.send(message.as_bytes())?;
    let mut buf = [0u8; 1500];
    let n = socket.recv(&mut buf)?;
    println!("reply={}", String::from_utf8_lossy(&buf[..n]));
    Ok(())
}

fn dns(addr: &str, query: &str) -> anyhow::Result<()> {
    let addr: SocketAddr = addr.parse()?;
    let socket = match addr {
        SocketAddr::V4(_) => UdpSocket::bind("0.0.0.0:0")?,
        SocketAddr::V6(_) => UdpSocket::bind("[::]:0")?,
    };
    socket.set_read_timeout(Some(Duration::from_secs(5)))?;
    socket.send_to(query.as_bytes(), addr)?;
    let mut buf = [0u8; 1500];
    let (n, from) = socket.recv_from(&mut buf)?;
    println!("from={from}");
    println!("reply={}", String::from_utf8_lossy(&buf[..n]));
    Ok(())
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

fn bulk(addr: &str, bytes: &str) -> anyhow::Result<()> {
    let addr: SocketAddr = addr.parse()?;
    let data = payload(bytes.parse()?);
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut reader = stream.try_clone()?;
    // Read while writing: the echo only starts at EOF, but a large reply must not
    // wait on a full send buffer either.
    let reading = std::thread::spawn(move || {
        let mut reply = Vec::new();
        reader.read_to_end(&mut reply).map(|_| reply)
    });
    stream.write_all(&data)?;
    stream.shutdown(Shutdown::Write)?;
    let reply = reading
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    let colon = reply
        .iter()
        .position(|b| *b == b':')
        .ok_or_else(|| anyhow::anyhow!("no reply"))?;
    anyhow::ensure!(
        reply[colon + 1..] == data[..],
        "reply differs: {} bytes back for {} sent",
        reply.len() - colon - 1,
        data.len()
    );
    println!(
        "ok sent={} received={}",
        data.len(),
        reply.len() - colon - 1
    );
    Ok(())
}

/// Writes without reading the reply until the bytes are sent or the peer stops
/// taking them, then closes with SO_LINGER 0: a reset mid-transfer.
fn reset(addr: &str, bytes: &str) -> anyhow::Result<()> {
    let addr: SocketAddr = addr.parse()?;
    let data = payload(bytes.parse()?);
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_write_timeout(Some(Duration::from_secs(1)))?;
    let mut sent = 0;
    while sent < data.len() {
        match stream.write(&data[sent..]) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    nix::sys::socket::setsockopt(&stream, nix::sys::socket::sockopt::Linger, &linger)?;
    drop(stream);
    println!("sent={sent}");
    Ok(())
}

fn parallel(addr: &str, n: &str, message: &str) -> anyhow::Result<()> {
    let addr: SocketAddr = addr.parse()?;
    let n: usize = n.parse()?;
    let started = std::time::Instant::now();
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let message = format!("{message}-{i}");
            std::thread::spawn(move || -> anyhow::Result<bool> {
                let _print_elapsed = Elapsed(started);
                let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
                stream.set_read_timeout(Some(Duration::from_secs(20)))?;
                stream.write_all(message.as_bytes())?;
                stream.shutdown(Shutdown::Write)?;
                let mut reply = String::new();
                stream.read_to_string(&mut reply)?;
                Ok(reply.ends_with(&format!(":{message}")))
            })
        })
        .collect();
    let mut good = 0;
    for thread in threads {
        match thread.join() {
            Ok(Ok(true)) => good += 1,
            Ok(Ok(false)) => println!("error=a reply did not match"),
            Ok(Err(e)) => println!("error={e:#}"),
            Err(_) => println!("error=a thread panicked"),
        }
    }
    println!("ok={good}");
    Ok(())
}

/// Prints the time since the start when dropped (however the connection ended).
struct Elapsed(std::time::Instant);

impl Drop for Elapsed {
    fn drop(&mut self) {
        println!("elapsed_ms={}", self.0.elapsed().as_millis());
    }
}

fn load(addr: &str, millis: &str, message: &str) -> anyhow::Result<()> {
    let addr: SocketAddr = addr.parse()?;
    let until = std::time::Instant::now() + Duration::from_millis(millis.parse()?);
    let exchange = || -> anyhow::Result<bool> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        stream.write_all(message.as_bytes())?;
        stream.shutdown(Shutdown::Write)?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply)?;
        Ok(reply.ends_with(&format!(":{message}")))
    };
    let (mut ok, mut failed) = (0, 0);
    while std::time::Instant::now() < until {
        match exchange() {
            Ok(true) => ok += 1,
            _ => {
                failed += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    println!("ok={ok} failed={failed}");
    Ok(())
}

fn dns_flood(addr: &str, n: &str, name: &str) -> anyhow::Result<()> {
    let addr: SocketAddr = addr.parse()?;
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    let mut sent = 0;
    for i in 0..n.parse::<usize>()? {
        let query = testbed::dns::query(&name.replace("{i}", &i.to_string()), "A", i as u16)?;
        if socket.send_to(&query, addr).is_ok() {
            sent += 1;
        }
    }
    println!("sent={sent}");
    Ok(())
}

/// Asks once (waiting up to 5 s for the answer with the query's ID).
fn ask(socket: &UdpSocket, addr: SocketAddr, name: &str, id: u16) -> anyhow::Result<String> {
    socket.send_to(&testbed::dns::query(name, "A", id)?, addr)?;
    let mut buf = [0u8; 4096];
    loop {
        let n = socket.recv(&mut buf)?;
        let (got, code, ips) = testbed::dns::parse_answer(&buf[..n])?;
        if got == id {
            let ips: Vec<String> = ips.iter().map(|ip| ip.to_string()).collect();
            return Ok(format!("code={}\na={}", u16::from(code), ips.join(",")));
        }
    }
}

fn dns_query(addr: &str, name: &str) -> anyhow::Result<()> {
    let addr: SocketAddr = addr.parse()?;
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(Duration::from_secs(5)))?;
    println!("{}", ask(&socket, addr, name, fastrand_id())?);
    Ok(())
}

fn fastrand_id() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    (nanos ^ std::process::id()) as u16
}

fn dns_bench(addr: &str, n: &str, name: &str, concurrency: &str) -> anyhow::Result<()> {
    let addr: SocketAddr = addr.parse()?;
    let n: usize = n.parse()?;
    let concurrency: usize = concurrency.parse()?;
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (next, name) = (next.clone(), name.to_owned());
            std::thread::spawn(move || -> anyhow::Result<(Vec<Duration>, usize)> {
                let socket = UdpSocket::bind("0.0.0.0:0")?;
                socket.set_read_timeout(Some(Duration::from_secs(2)))?;
                let (mut times, mut failed) = (Vec::new(), 0);
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= n {
                        return Ok((times, failed));
                    }
                    let t = Instant::now();
                    match ask(
                        &socket,
                        addr,
                        &name.replace("{i}", &i.to_string()),
                        i as u16,
                    ) {
                        Ok(answer) if answer.starts_with("code=0\n") => times.push(t.elapsed()),
                        _ => failed += 1,
                    }
                }
            })
        })
        .collect();
    let (mut times, mut failed) = (Vec::new(), 0);
    for worker in workers {
        let (t, f) = worker
            .join()
            .map_err(|_| anyhow::anyhow!("a worker panicked"))??;
        times.extend(t);
        failed += f;
    }
    let elapsed = started.elapsed();
    times.sort();
    let pct =
        |p: f64| times.get(((times.len() as f64 * p) as usize).min(times.len().saturating_sub(1)));
    println!("answered={} failed={failed}", times.len());
    println!("rate={:.0}", times.len() as f64 / elapsed.as_secs_f64());
    if let (Some(p50), Some(p99)) = (pct(0.5), pct(0.99)) {
        println!("p50_us={} p99_us={}", p50.as_micros(), p99.as_micros());
    }
    Ok(())
}

fn slow(addr: &str, millis: &str, message: &str) -> anyhow::Result<()> {
    let addr: SocketAddr = addr.parse()?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.write_all(message.as_bytes())?;
    println!("connected");
    std::thread::sleep(Duration::from_millis(millis.parse()?));
    stream.shutdown(Shutdown::Write)?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    println!("reply={reply}");
    Ok(())
}

/// Sends `message` (`\r\n` escapes allowed), keeps the connection open without
/// sending more, and reads until the peer closes (or 30 s pass): prints `reply=`
/// and `closed_ms=`.
fn stall(addr: &str, message: &str) -> anyhow::Result<()> {
    let addr: SocketAddr = addr.parse()?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let started = Instant::now();
    stream.write_all(message.replace("\\r\\n", "\r\n").as_bytes())?;
    let mut reply = Vec::new();
    // A reset counts as the close; our read timeout does not.
    if let Err(e) = stream.read_to_end(&mut reply) {
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            anyhow::bail!("still open after 30 s");
        }
    }
    println!(
        "reply={}",
        String::from_utf8_lossy(&reply).replace("\r\n", " ")
    );
    println!("closed_ms={}", started.elapsed().as_millis());
    Ok(())
}

/// Connects, stays silent for `millis`, then sends `message` (`\r\n` escapes
/// allowed) and prints `reply=` (read until the peer closes).
fn late(addr: &str, millis: &str, message: &str) -> anyhow::Result<()> {
    let addr: SocketAddr = addr.parse()?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    std::thread::sleep(Duration::from_millis(millis.parse()?));
    stream.write_all(message.replace("\\r\\n", "\r\n").as_bytes())?;
    print_reply(&mut stream);
    Ok(())
}

/// Connects and says nothing: prints `reply=`, what the server sends first
/// (until it closes, or for at most `millis`).
fn greeting(addr: &str, millis: &str) -> anyhow::Result<()> {
    let addr: SocketAddr = addr.parse()?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_millis(millis.parse()?)))?;
    print_reply(&mut stream);
    Ok(())
}

/// Prints `reply=`: what the peer sends until it closes (or the read times out),
/// line breaks as spaces.
fn print_reply(stream: &mut TcpStream) {
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    println!(
        "reply={}",
        String::from_utf8_lossy(&reply).replace("\r\n", " ")
    );
}

fn throughput(addr: &str, bytes: &str, streams: &str) -> anyhow::Result<()> {
    let addr: SocketAddr = addr.parse()?;
    let total: u64 = bytes.parse()?;
    let streams: u64 = streams.parse()?;
    anyhow::ensure!(streams > 0, "at least one stream");
    let started = std::time::Instant::now();
    let senders: Vec<_> = (0..streams)
        .map(|_| std::thread::spawn(move || send_to_sink(addr, total / streams)))
        .collect();
    for sender in senders {
        sender
            .join()
            .map_err(|_| anyhow::anyhow!("a sender panicked"))??;
    }
    let elapsed = started.elapsed();
    println!(
        "bits_per_second={:.0}",
        (total / streams * streams) as f64 * 8.0 / elapsed.as_secs_f64()
    );
    Ok(())
}

/// Sends `total` bytes to a sink on one connection and checks its count.
fn send_to_sink(addr: SocketAddr, total: u64) -> anyhow::Result<()> {
    let chunk = vec![0x5au8; 256 * 1024];
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    let mut sent = 0u64;
    while sent < total {
        let n = chunk.len().min((total - sent) as usize);
        stream.write_all(&chunk[..n])?;
        sent += n as u64;
    }
    stream.shutdown(Shutdown::Write)?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    anyhow::ensure!(
        reply.trim() == total.to_string(),
        "the sink counted {reply:?}, sent {total}"
    );
    Ok(())
}

fn round_trips(addr: &str, count: &str, cpu: &str) -> anyhow::Result<()> {
    if cpu != "any" {
        testbed::app::pin_current_thread(cpu.parse()?)?;
    }
    let addr: SocketAddr = addr.parse()?;
    let count: usize = count.parse()?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_nodelay(true)?;
    let mut times = Vec::with_capacity(count);
    let mut byte = [0u8; 1];
    for i in 0..count + 100 {
        let t = std::time::Instant::now();
        stream.write_all(b"x")?;
        stream.read_exact(&mut byte)?;
        if i >= 100 {
            times.push(t.elapsed()); // after a warm-up
        }
    }
    times.sort_unstable();
    println!("median_ns={}", times[times.len() / 2].as_nanos());
    println!("p99_ns={}", times[times.len() * 99 / 100].as_nanos());
    Ok(())
}

fn connections(addr: &str, millis: &str) -> anyhow::Result<()> {
    let addr: SocketAddr = addr.parse()?;
    let until = std::time::Instant::now() + Duration::from_millis(millis.parse()?);
    let started = std::time::Instant::now();
    let mut n = 0u64;
    let mut byte = [0u8; 1];
    while std::time::Instant::now() < until {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.write_all(b"x")?;
        stream.read_exact(&mut byte)?;
        n += 1;
    }
    println!(
        "per_second={:.0}",
        n as f64 / started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn idle(addr: &str, n: &str) -> anyhow::Result<()> {
    let addr: SocketAddr = addr.parse()?;
    let mut streams = Vec::new();
    let mut byte = [0u8; 1];
    for _ in 0..n.parse::<usize>()? {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        // One exchange: the connection is established end to end, then idle.
        stream.write_all(b"x")?;
        stream.read_exact(&mut byte)?;
        streams.push(stream);
    }
    println!("open={}", streams.len());
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    Ok(())
}

fn http(addr: &str, method: &str, path: &str, headers: &[&str]) -> anyhow::Result<()> {
    let target: SocketAddr = addr.parse()?;
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: 0\r\nconnection: close\r\n"
    );
    for header in headers {
        request.push_str(&format!("{header}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response.split_whitespace().nth(1).unwrap_or("none");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or("");
    println!("status={status}");
    println!("body={body}");
    Ok(())
}

/// A GET whose response is left unread: reads the head and the first body
/// bytes, then closes the connection with the rest unread.
fn http_stop(addr: &str, path: &str) -> anyhow::Result<()> {
    let target: SocketAddr = addr.parse()?;
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    let mut response = Vec::new();
    let mut chunk = [0u8; 4096];
    while !response.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk)?;
        anyhow::ensure!(n > 0, "closed before the response's head");
        response.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&response);
    println!(
        "status={}",
        head.split_whitespace().nth(1).unwrap_or("none")
    );
    Ok(())
}

fn http_load(addr: &str, n: &str) -> anyhow::Result<()> {
    use std::io::BufRead;
    let target: SocketAddr = addr.parse()?;
    let n: usize = n.parse()?;
    let stream = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = std::io::BufReader::new(stream);
    let request = format!("GET /public/load HTTP/1.1\r\nhost: {addr}\r\n\r\n");
    let mut times = Vec::with_capacity(n);
    let started = std::time::Instant::now();
    for _ in 0..n {
        let t = std::time::Instant::now();
        writer.write_all(request.as_bytes())?;
        let mut status = String::new();
        reader.read_line(&mut status)?;
        anyhow::ensure!(status.contains(" 200 "), "status {status:?}");
        let mut length = 0;
        loop {
            let mut header = String::new();
            reader.read_line(&mut header)?;
            if header == "\r\n" {
                break;
            }
            if let Some(v) = header.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse()?;
            }
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body)?;
        times.push(t.elapsed());
    }
    let elapsed = started.elapsed();
    times.sort_unstable();
    println!("per_second={:.0}", n as f64 / elapsed.as_secs_f64());
    println!("p50_us={}", times[n / 2].as_micros());
    println!("p99_us={}", times[n * 99 / 100].as_micros());
    Ok(())
}

type Empty = http_body_util::Empty<bytes::Bytes>;

/// One client's connection for `httpbench`.
enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Empty>),
    H2(hyper::client::conn::http2::SendRequest<Empty>),
}

impl Sender {
    async fn connect(addr: &str, version: &str) -> anyhow::Result<Self> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let io = hyper_util::rt::TokioIo::new(tcp);
        Ok(match version {
            "h1" => {
                let (sender, connection) = hyper::client::conn::http1::handshake(io).await?;
                tokio::spawn(connection);
                Self::H1(sender)
            }
            "h2" => {
                let (sender, connection) =
                    hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                        .await?;
                tokio::spawn(connection);
                Self::H2(sender)
            }
            other => anyhow::bail!("unknown version {other:?}: h1 or h2"),
        })
    }

    /// A GET of /public/load, its body read whole.
    async fn get(&mut self, addr: &str) -> anyhow::Result<()> {
        use http_body_util::BodyExt;
        let response = match self {
            Self::H1(sender) => {
                let request = http::Request::get("/public/load")
                    .header(http::header::HOST, addr)
                    .body(Empty::new())?;
                sender.ready().await?;
                sender.send_request(request).await?
            }
            Self::H2(sender) => {
                let request =
                    http::Request::get(format!("http://{addr}/public/load")).body(Empty::new())?;
                sender.send_request(request).await?
            }
        };
        anyhow::ensure!(
            response.status().is_success(),
            "status {}",
            response.status()
        );
        response.into_body().collect().await?;
        Ok(())
    }
}

/// How long a bench runs: `<n>` requests, or `<ms>ms` of time.
#[derive(Clone, Copy)]
enum Run {
    Requests(usize),
    For(Duration),
}

impl Run {
    fn parse(text: &str) -> anyhow::Result<Self> {
        Ok(match text.strip_suffix("ms") {
            Some(ms) => Self::For(Duration::from_millis(ms.parse()?)),
            None => Self::Requests(text.parse()?),
        })
    }
}

/// GETs on each new connection before a bench counts.
const WARMUP: usize = 10;

/// `c` senders with their connections open and warm: HTTP/1.1 one keep-alive
/// connection each, HTTP/2 one connection's sender cloned. Prints how many GETs
/// warmed them (`warmup=`: not in the figures, but in a proxy's CPU time).
async fn warm_senders(
    addr: &str,
    version: &str,
    concurrency: usize,
) -> anyhow::Result<Vec<Sender>> {
    // Warm-up: each connection's first requests (pools, caches) are not
    // counted. Each is used as soon as it is open: the waypoint takes a
    // connection silent for 500 ms for a server-first protocol.
    let mut senders = Vec::new();
    let connections = if version == "h2" { 1 } else { concurrency };
    for _ in 0..connections {
        let mut sender = Sender::connect(addr, version).await?;
        for _ in 0..WARMUP {
            sender.get(addr).await?;
        }
        senders.push(sender);
    }
    println!("warmup={}", connections * WARMUP);
    if let Some(Sender::H2(sender)) = senders.first() {
        let sender = sender.clone();
        senders.extend((1..concurrency).map(|_| Sender::H2(sender.clone())));
    }
    Ok(senders)
}

/// Prints the rate and the latency percentiles of `times`.
fn print_latencies(count: usize, elapsed: Duration, mut times: Vec<Duration>) {
    times.sort_unstable();
    let n = times.len();
    println!("requests={count}");
    println!("per_second={:.0}", count as f64 / elapsed.as_secs_f64());
    println!("p50_us={}", times[n / 2].as_micros());
    println!("p99_us={}", times[n * 99 / 100].as_micros());
}

/// Closed loop: each of `c` clients sends its next GET when the last is done.
fn http_bench(addr: &str, version: &str, concurrency: &str, n: &str) -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let concurrency: usize = concurrency.parse()?;
    let run = Run::parse(n)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let senders = warm_senders(addr, version, concurrency).await?;
        let claimed = AtomicUsize::new(0);
        let started = Instant::now();
        let more = |claimed: &AtomicUsize| match run {
            Run::Requests(n) => claimed.fetch_add(1, Ordering::Relaxed) < n,
            Run::For(duration) => started.elapsed() < duration,
        };
        let workers = senders.into_iter().map(|mut sender| {
            let (claimed, more) = (&claimed, &more);
            async move {
                let mut times = Vec::new();
                while more(claimed) {
                    let t = Instant::now();
                    sender.get(addr).await?;
                    times.push(t.elapsed());
                }
                anyhow::Ok(times)
            }
        });
        let mut times = Vec::new();
        for worker in futures_util::future::join_all(workers).await {
            times.extend(worker?);
        }
        print_latencies(times.len(), started.elapsed(), times);
        Ok(())
    })
}

/// Open loop: GETs due at a fixed rate for `ms`, evenly spaced, whatever the
/// answers do, on `c` connections (HTTP/1.1; a GET waits for a free one) or `c`
/// streams of one (HTTP/2). Each GET's time counts from when it was due. A thread
/// of its own paces them (tokio's timer is 1 ms coarse: it would send bursts).
/// Prints the rate achieved and p50/p99.
fn http_rate(
    addr: &str,
    version: &str,
    concurrency: &str,
    rate: &str,
    millis: &str,
) -> anyhow::Result<()> {
    use std::sync::{Arc, Mutex};
    let concurrency: usize = concurrency.parse()?;
    let (rate, millis): (f64, u64) = (rate.parse()?, millis.parse()?);
    anyhow::ensure!(rate > 0.0, "the rate must be more than 0");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let addr: Arc<str> = addr.into();
        let free = Arc::new(Mutex::new(warm_senders(&addr, version, concurrency).await?));
        let permits = Arc::new(tokio::sync::Semaphore::new(concurrency));
        let (pace, mut due) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        let (interval, duration) = (
            Duration::from_secs_f64(1.0 / rate),
            Duration::from_millis(millis),
        );
        let started = Instant::now();
        let pacer = std::thread::spawn(move || {
            let mut next = started;
            while next < started + duration {
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                if pace.send(next).is_err() {
                    return;
                }
                next += interval;
            }
        });
        let mut gets = tokio::task::JoinSet::new();
        while let Some(due) = due.recv().await {
            let (free, permits, addr) = (free.clone(), permits.clone(), addr.clone());
            gets.spawn(async move {
                let _permit = permits.acquire_owned().await?;
                let mut sender = free.lock().unwrap().pop().expect("one per permit");
                let result = sender.get(&addr).await;
                free.lock().unwrap().push(sender);
                result.map(|()| due.elapsed())
            });
        }
        let _ = pacer.join();
        let mut times = Vec::new();
        while let Some(done) = gets.join_next().await {
            times.push(done??);
        }
        print_latencies(times.len(), started.elapsed(), times);
        Ok(())
    })
}

fn h2(addr: &str, method: &str, path: &str) -> anyhow::Result<()> {
    use http_body_util::BodyExt;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let (mut sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await?;
        tokio::spawn(connection);
        let request = http::Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        println!("status={}", status.as_u16());
        println!("body={}", String::from_utf8_lossy(&body));
        Ok(())
    })
}

/// Speaks HTTP/2 by hand (see the usage), then reads what comes until the peer
/// closes or 30 s pass.
fn h2_raw(addr: &str, mode: &str) -> anyhow::Result<()> {
    use testbed::l7::raw_h2;
    use tokio::io::AsyncWriteExt;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await?;
        let mut sent = raw_h2::start();
        match mode {
            "preface" => {}
            "headers" => sent.extend(raw_h2::get(1, addr, "/never", false)),
            "request" => sent.extend(raw_h2::get(1, addr, "/once", true)),
            // HTTP/2 rapid reset (CVE-2023-44487): streams opened and cancelled
            // at once, each costing the server work and none counting against
            // its concurrent stream limit.
            "rapidreset" => sent.extend(raw_h2::rapid_reset(addr, 1000)),
            // Rapid reset paced to slip past a server's count of streams reset
            // before it took them up: each stream is cancelled only once 100
            // more are open, while its answer is still on the way (the
            // endpoint is asked to wait 10 s).
            "slowreset" => {
                tcp.write_all(&sent).await?;
                sent.clear();
                for stream in (1..4000u32).step_by(2) {
                    let mut pair = raw_h2::get(stream, addr, "/reset?delay=10000", true);
                    if stream > 200 {
                        let cancel = raw_h2::CANCEL.to_be_bytes();
                        pair.extend(raw_h2::frame(raw_h2::RST_STREAM, 0, stream - 200, &cancel));
                    }
                    if let Err(e) = tcp.write_all(&pair).await {
                        println!("write_error={e}");
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            // CONTINUATION flood (CVE-2024-27316): a header block that never
            // ends, in frames of valid literal headers.
            "continuation" => {
                sent.extend(raw_h2::get(1, addr, "/flood", false));
                let mut block = Vec::new();
                for _ in 0..9 {
                    block.extend([0x00, 7]); // literal without indexing, new name
                    block.extend(b"x-flood");
                    block.push(100);
                    block.extend([b'a'; 100]);
                }
                for _ in 0..1000 {
                    sent.extend(raw_h2::frame(raw_h2::CONTINUATION, 0, 1, &block));
                }
            }
            _ => anyhow::bail!(
                "mode: preface, headers, request, rapidreset, slowreset or continuation"
            ),
        }
        // A server may close before taking it all (a flood): say so, and read
        // what it sent.
        if let Err(e) = tcp.write_all(&sent).await {
            println!("write_error={e}");
        }
        // In the middle of a header block a client may send nothing else.
        let answer = mode != "headers";
        let seen = raw_h2::read_until_closed(&mut tcp, Duration::from_secs(30), answer).await;
        println!("frames={}", seen.frames.join(","));
        println!(
            "goaway={}",
            seen.goaway.map_or("none".to_owned(), |c| c.to_string())
        );
        if let Some(after) = seen.goaway_after {
            println!("goaway_ms={}", after.as_millis());
        }
        match seen.closed_after {
            Some(after) => println!("closed_ms={}", after.as_millis()),
            None => anyhow::bail!("still open after 30 s"),
        }
        Ok(())
    })
}

/// A POST of `bytes` bytes of testbed::l7::pattern over HTTP/1.1 or HTTP/2 (prior
/// knowledge), with its content-length.
fn post(addr: &str, version: &str, path: &str, bytes: &str) -> anyhow::Result<()> {
    use http_body_util::BodyExt;
    let body = bytes::Bytes::from(testbed::l7::pattern(bytes.parse()?));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let io = hyper_util::rt::TokioIo::new(tokio::net::TcpStream::connect(addr).await?);
        let request = http::Request::post(format!("http://{addr}{path}"))
            .header("content-length", body.len())
            .body(http_body_util::Full::new(body))?;
        let response = match version {
            "h1" => {
                let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
                tokio::spawn(connection);
                let (mut parts, body) = request.into_parts();
                parts.uri = path.parse()?;
                parts.headers.insert("host", addr.parse()?);
                sender
                    .send_request(http::Request::from_parts(parts, body))
                    .await?
            }
            "h2" => {
                let (mut sender, connection) =
                    hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                        .await?;
                tokio::spawn(connection);
                sender.send_request(request).await?
            }
            _ => anyhow::bail!("h1 or h2"),
        };
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        println!("status={}", status.as_u16());
        println!("body={}", String::from_utf8_lossy(&body));
        Ok(())
    })
}

/// An HTTP/1.1 upload of `bytes` announced with `Expect: 100-continue`: sends
/// its headers, waits (up to 10 s) for the answer to them and sends the body
/// only after a `100 Continue`. Prints `interim=` (the first status line: the
/// 100, or the final answer to an upload refused unread), then `reply=` (what
/// follows, until the peer closes: the request asks it to).
fn expect_100(addr: &str, path: &str, bytes: &str) -> anyhow::Result<()> {
    let body = testbed::l7::pattern(bytes.parse()?);
    let addr: SocketAddr = addr.parse()?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nhost: web\r\ncontent-length: {}\r\nexpect: 100-continue\r\nconnection: close\r\n\r\n",
        body.len()
    )?;
    // The first response head, byte by byte: nothing after it is read yet.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            Ok(_) => anyhow::bail!("closed before any answer to the headers"),
            Err(e) => anyhow::bail!("no answer to the headers within 10 s: {e}"),
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status_line = head.lines().next().unwrap_or_default();
    println!("interim={status_line}");
    if status_line.split(' ').nth(1) == Some("100") {
        stream.write_all(&body)?;
    }
    print_reply(&mut stream);
    Ok(())
}

/// An HTTP/2 POST announcing 100 bytes that sends 4, then nothing (the
/// connection stays open): prints the status and how long it took to come.
fn h2_upload(addr: &str, path: &str) -> anyhow::Result<()> {
    use futures_util::StreamExt;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let (mut sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await?;
        tokio::spawn(connection);
        let half = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(
            hyper::body::Frame::data(bytes::Bytes::from_static(b"half")),
        )])
        .chain(futures_util::stream::pending());
        let request = http::Request::post(format!("http://{addr}{path}"))
            .header("content-length", "100")
            .body(http_body_util::StreamBody::new(half))?;
        let started = Instant::now();
        let response = tokio::time::timeout(Duration::from_secs(30), sender.send_request(request))
            .await
            .map_err(|_| anyhow::anyhow!("no response in 30 s"))??;
        println!("status={}", response.status().as_u16());
        println!("ms={}", started.elapsed().as_millis());
        Ok(())
    })
}

/// Asks to switch to WebSocket; prints the status line (`status=`) and, once
/// switched, what the server answers `message` with (`reply=`).
fn upgrade(addr: &str, path: &str, message: &str) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 {
            break;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let status = head.split_whitespace().nth(1).unwrap_or("");
    println!("status={status}");
    if status == "101" {
        stream.write_all(message.as_bytes())?;
        let mut reply = vec![0u8; 4096];
        let n = stream.read(&mut reply)?;
        println!("reply={}", String::from_utf8_lossy(&reply[..n]));
    }
    Ok(())
}

/// One HTTP/2 connection: a GET of `path` alone (its latency), then `n` at once.
/// Prints single_ms, total_ms, ok (2xx answers) and each distinct body's count.
fn h2_many(addr: &str, n: &str, path: &str) -> anyhow::Result<()> {
    use http_body_util::BodyExt;
    let n: usize = n.parse()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let (sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await?;
        tokio::spawn(connection);
        let get = |mut sender: hyper::client::conn::http2::SendRequest<_>| async move {
            let request = http::Request::get(format!("http://{addr}{path}"))
                .body(http_body_util::Empty::<bytes::Bytes>::new())?;
            let response = sender.send_request(request).await?;
            let ok = response.status().is_success();
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::Ok((ok, String::from_utf8_lossy(&body).into_owned()))
        };
        let start = Instant::now();
        let first = get(sender.clone()).await;
        println!("single_ms={}", start.elapsed().as_millis());
        let start = Instant::now();
        let all = futures_util::future::join_all((0..n).map(|_| get(sender.clone()))).await;
        println!("total_ms={}", start.elapsed().as_millis());
        let mut bodies = std::collections::BTreeMap::<String, usize>::new();
        let mut ok = 0;
        for result in std::iter::once(first).chain(all) {
            match result {
                Ok((good, body)) => {
                    ok += usize::from(good);
                    *bodies.entry(body).or_default() += 1;
                }
                Err(e) => println!("error={e:#}"),
            }
        }
        println!("ok={ok}");
        for (body, count) in bodies {
            println!("body={body} count={count}");
        }
        Ok(())
    })
}

/// A call of the test Echo service: `unary` or `stream` (`count` replies), asking
/// for status `code`. Prints each reply (`reply=<pod>:<message>:<index>`), then
/// `status=<gRPC code>` and `message=<its message>`.
fn grpc(addr: &str, call: &str, message: &str, count: &str, code: &str) -> anyhow::Result<()> {
    use testbed::l7::echo::EchoRequest;
    let request = EchoRequest {
        message: message.into(),
        count: count.parse()?,
        code: code.parse()?,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut client = testbed::l7::client(addr.parse()?).await?;
        let print = |r: &testbed::l7::echo::EchoReply| {
            println!("reply={}:{}:{}", r.pod, r.message, r.index)
        };
        let status = match call {
            "unary" => match client.unary(request).await {
                Ok(reply) => {
                    print(reply.get_ref());
                    tonic::Status::ok("")
                }
                Err(status) => status,
            },
            "stream" => match client.stream(request).await {
                Ok(replies) => {
                    let mut replies = replies.into_inner();
                    loop {
                        match replies.message().await {
                            Ok(Some(reply)) => print(&reply),
                            Ok(None) => break tonic::Status::ok(""),
                            Err(status) => break status,
                        }
                    }
                }
                Err(status) => status,
            },
            other => anyhow::bail!("unknown call {other:?}: unary or stream"),
        };
        println!("status={}", status.code() as i32);
        println!("message={}", status.message());
        Ok(())
    })
}

fn connect_from(source: &str, addr: &str, message: &str) -> anyhow::Result<()> {
    let source: std::net::IpAddr = source.parse()?;
    let addr: SocketAddr = addr.parse()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        let mut stream =
            tokio::time::timeout(Duration::from_secs(5), socket.connect(addr)).await??;
        println!("peer={}", stream.peer_addr()?);
        stream.write_all(message.as_bytes()).await?;
        stream.shutdown().await?;
        let mut reply = String::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut reply)).await??;
        println!("reply={reply}");
        Ok(())
    })
}

fn hold_cluster(spec: &str) -> anyhow::Result<()> {
    let spec = testbed::ClusterSpec::from_file(spec.as_ref())?;
    let cluster = testbed::Cluster::new(&spec)?;
    println!("prefix={}", cluster.prefix());
    loop {
        std::thread::park();
    }
}
