//! Load generator and instant upstream for the macro-benchmark
//! (benches/netns/run.sh). Blocking sockets and one thread per stream:
//! simple, and far from being the bottleneck at these concurrencies.
//!
//! ```text
//! loadgen serve ADDR...            upstream; what it does depends on the address dialled:
//!                                  .10 answer 1 KiB and close, .11 greet then
//!                                  sink, .12 source, .13 plain HTTP/1.1 kept
//!                                  alive, 256 KiB per response
//! loadgen bulk DOWN|UP ADDR STREAMS SECONDS NAME
//! loadgen rate ADDR CLIENTS SECONDS NAME
//! loadgen idle ADDR COUNT SECONDS NAME
//! loadgen idle-http ADDR COUNT SECONDS NAME   each: one GET, the whole answer, then idle
//! loadgen relay ADDR               the reference "gateway": see [`relay`]
//! ```
//!
//! Every client first sends a real ClientHello (curl's, renamed to NAME),
//! as a TLS client would; the gateways under test only peek at it. Results
//! are one line of `key=value` pairs on stdout for run.sh to collect.
#![forbid(unsafe_code)]

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use portcullis_core::hello;

const CURL_HELLO: &[u8] = include_bytes!("../testdata/clienthellos/curl-7.88-openssl-3.0.bin");
const ANSWER: [u8; 1024] = [0x5a; 1024];
/// What the sink sends after the hello, standing in for a ServerHello.
const GREETING: [u8; 64] = [0x16; 64];
const CHUNK: usize = 256 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Threads serving the answering address: more than the rate workload's
/// 64 clients, so none waits for a free one.
const ANSWER_THREADS: usize = 128;

fn main() {
    // `cargo bench` adds `--bench`; it means nothing here.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        [] => return, // `cargo test --benches` runs every bench target once
        ["serve", addrs @ ..] if !addrs.is_empty() => serve(addrs),
        ["bulk", way, addr, streams, seconds, name] => bulk(
            way,
            addr.parse().unwrap(),
            num(streams),
            secs(seconds),
            name,
        ),
        ["rate", addr, clients, seconds, name] => {
            rate(addr.parse().unwrap(), num(clients), secs(seconds), name)
        }
        ["relay", addr] => relay(addr.parse().unwrap()),
        ["idle", addr, count, seconds, name] => {
            idle(addr.parse().unwrap(), num(count), secs(seconds), name)
        }
        ["idle-http", addr, count, seconds, name] => {
            idle_http(addr.parse().unwrap(), num(count), secs(seconds), name)
        }
        _ => {
            eprintln!("usage: see the top of benches/loadgen.rs");
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("loadgen: {e}");
        std::process::exit(1);
    }
}

fn num(s: &str) -> usize {
    s.parse().expect("a number")
}

fn secs(s: &str) -> Duration {
    Duration::from_secs_f64(s.parse().expect("seconds"))
}

/// Reads one TLS record's worth of hello: the 5-byte header and its payload.
fn read_hello(s: &mut TcpStream) -> io::Result<()> {
    let mut header = [0u8; 5];
    s.read_exact(&mut header)?;
    let mut payload = vec![0u8; usize::from(u16::from_be_bytes([header[3], header[4]]))];
    s.read_exact(&mut payload)
}

/// What an upstream address does, by its last octet (IPv4) or group
/// (IPv6): 10 answers, 11 sinks, 12 sources, 13 serves HTTP (`::10`, …).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Answer,
    Sink,
    Source,
    Web,
}

impl Role {
    fn of(addr: SocketAddr) -> Option<Role> {
        let last = match addr {
            SocketAddr::V4(a) => u16::from(a.ip().octets()[3]),
            SocketAddr::V6(a) => a.ip().segments()[7],
        };
        match last {
            10 | 0x10 => Some(Role::Answer),
            11 | 0x11 => Some(Role::Sink),
            12 | 0x12 => Some(Role::Source),
            13 | 0x13 => Some(Role::Web),
            _ => None,
        }
    }

    fn serve(self, s: TcpStream) -> io::Result<()> {
        s.set_nodelay(true)?;
        match self {
            Role::Answer => answer(s),
            Role::Sink => sink(s),
            Role::Source => source(s),
            Role::Web => web(s),
        }
    }
}

fn serve(addrs: &[&str]) -> io::Result<()> {
    let mut threads = Vec::new();
    for addr in addrs {
        let addr: SocketAddr = addr.parse().map_err(io::Error::other)?;
        let role = Role::of(addr)
            .ok_or_else(|| io::Error::other(format!("{addr}: no role for this address")))?;
        let listener = TcpListener::bind(addr)?;
        if role == Role::Answer {
            // Short connections at a high rate: a standing pool, each thread
            // serving one connection at a time, so the rate workload measures
            // the gateway rather than the cost of starting a thread per
            // connection here.
            for _ in 0..ANSWER_THREADS {
                let listener = listener.try_clone()?;
                threads.push(std::thread::spawn(move || {
                    for stream in listener.incoming().flatten() {
                        let _ = role.serve(stream);
                    }
                }));
            }
            continue;
        }
        threads.push(std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || role.serve(stream));
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn answer(mut s: TcpStream) -> io::Result<()> {
    // A pool thread must not wait forever on a peer that went silent.
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    read_hello(&mut s)?;
    s.write_all(&ANSWER)?;
    s.shutdown(Shutdown::Write)?;
    let _ = s.read(&mut [0u8; 64]);
    Ok(())
}

fn sink(mut s: TcpStream) -> io::Result<()> {
    read_hello(&mut s)?;
    // A TLS server speaks after the hello, and clients wait for it before
    // sending data; peeking proxies rely on that.
    s.write_all(&GREETING)?;
    let mut buf = vec![0u8; CHUNK];
    while s.read(&mut buf)? > 0 {}
    Ok(())
}

fn source(mut s: TcpStream) -> io::Result<()> {
    read_hello(&mut s)?;
    let buf = vec![0xa5u8; CHUNK];
    loop {
        s.write_all(&buf)?;
    }
}

/// A body large enough that a proxy's buffers grow to their largest.
const WEB_BODY: usize = 256 * 1024;

/// Answers every request of a kept-alive connection with [`WEB_BODY`]
/// bytes, until the client closes.
fn web(mut s: TcpStream) -> io::Result<()> {
    let body = vec![0x77u8; WEB_BODY];
    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {WEB_BODY}\r\n\r\n");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.drain(..end + 4);
            s.write_all(head.as_bytes())?;
            s.write_all(&body)?;
            continue;
        }
        match s.read(&mut chunk)? {
            0 => return Ok(()),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Holds COUNT kept-alive HTTP connections, each after one GET answered
/// in full, for SECONDS.
fn idle_http(addr: SocketAddr, count: usize, time: Duration, name: &str) -> io::Result<()> {
    let mut held = Vec::with_capacity(count);
    for _ in 0..count {
        let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        write!(s, "GET / HTTP/1.1\r\nHost: {name}\r\n\r\n")?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut head = Vec::new();
        // The head, and how much of the body came with it.
        let (body_start, mut got) = loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Err(io::Error::other("closed before the answer"));
            }
            head.extend_from_slice(&buf[..n]);
            if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                break (end + 4, head.len() - end - 4);
            }
        };
        if !head[..body_start].starts_with(b"HTTP/1.1 200") {
            return Err(io::Error::other("not a 200"));
        }
        while got < WEB_BODY {
            match s.read(&mut buf)? {
                0 => return Err(io::Error::other("closed mid-answer")),
                n => got += n,
            }
        }
        held.push(s);
    }
    println!("held={}", held.len());
    io::stdout().flush()?;
    std::thread::sleep(time);
    Ok(())
}

fn connect(addr: SocketAddr, name: &str) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    s.write_all(&hello::with_server_name(CURL_HELLO, name))?;
    Ok(s)
}

/// STREAMS connections moving data one way for SECONDS: MiB/s in all.
fn bulk(way: &str, addr: SocketAddr, streams: usize, time: Duration, name: &str) -> io::Result<()> {
    let moved = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    let down = way == "down";
    for _ in 0..streams {
        let mut s = connect(addr, name)?;
        if !down {
            s.read_exact(&mut [0u8; GREETING.len()])?;
        }
        let (moved, stop) = (moved.clone(), stop.clone());
        workers.push(std::thread::spawn(move || -> io::Result<()> {
            let mut buf = vec![0x3cu8; CHUNK];
            while !stop.load(Ordering::Relaxed) {
                let n = if down {
                    s.read(&mut buf)?
                } else {
                    s.write(&buf)?
                };
                if n == 0 {
                    return Err(io::Error::other("the gateway closed the stream"));
                }
                moved.fetch_add(n as u64, Ordering::Relaxed);
            }
            Ok(())
        }));
    }
    // Let the streams ramp up before measuring.
    std::thread::sleep(Duration::from_millis(500));
    let (start, before) = (Instant::now(), moved.load(Ordering::Relaxed));
    std::thread::sleep(time);
    let bytes = moved.load(Ordering::Relaxed) - before;
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join()
            .map_err(|_| io::Error::other("a stream panicked"))??;
    }
    println!(
        "bytes={bytes} seconds={elapsed:.3} mib_per_s={:.1}",
        bytes as f64 / elapsed / (1024.0 * 1024.0)
    );
    Ok(())
}

/// CLIENTS loops of connect, hello, read the 1 KiB answer, close: the
/// connection rate and the time to first byte after sending the hello.
fn rate(addr: SocketAddr, clients: usize, time: Duration, name: &str) -> io::Result<()> {
    let deadline = Instant::now() + time;
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let name = name.to_string();
            std::thread::spawn(move || -> io::Result<Vec<Duration>> {
                let mut first_bytes = Vec::new();
                while Instant::now() < deadline {
                    let start = Instant::now();
                    let mut s = connect(addr, &name)?;
                    let mut answer = [0u8; 1024];
                    s.read_exact(&mut answer[..1])?;
                    first_bytes.push(start.elapsed());
                    s.read_exact(&mut answer[1..])?;
                }
                Ok(first_bytes)
            })
        })
        .collect();
    let mut all = Vec::new();
    for w in workers {
        all.extend(
            w.join()
                .map_err(|_| io::Error::other("a client panicked"))??,
        );
    }
    all.sort();
    let pct =
        |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)].as_secs_f64() * 1e3;
    println!(
        "connections={} conn_per_s={:.0} ttfb_p50_ms={:.3} ttfb_p99_ms={:.3}",
        all.len(),
        all.len() as f64 / time.as_secs_f64(),
        pct(0.50),
        pct(0.99)
    );
    Ok(())
}

/// COUNT established connections held open (hello sent, answer unread)
/// for SECONDS, so run.sh can read the gateway's memory meanwhile.
fn idle(addr: SocketAddr, count: usize, time: Duration, name: &str) -> io::Result<()> {
    let held: Vec<TcpStream> = (0..count)
        .map(|_| connect(addr, name))
        .collect::<io::Result<_>>()?;
    println!("held={}", held.len());
    io::stdout().flush()?;
    std::thread::sleep(time);
    Ok(())
}

/// The least any gateway that terminates TCP must do, as a reference for
/// the stream workloads: accept on ADDR (behind the same iptables
/// redirect), connect to the original destination and splice both ways
/// through 1 MiB pipes, a blocking thread per direction (IPv4, as the
/// benchmark's traffic is). No hello is read, nothing is decided or
/// logged: what it reaches is what a proxy reaches on this machine once
/// everything but moving the bytes is taken away, as the kernel's own
/// forwarding is the limit for routing.
fn relay(addr: SocketAddr) -> io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    for client in listener.incoming().flatten() {
        std::thread::spawn(move || -> io::Result<()> {
            let dst =
                nix::sys::socket::getsockopt(&client, nix::sys::socket::sockopt::OriginalDst)?;
            let dst = SocketAddr::from((
                u32::from_be(dst.sin_addr.s_addr).to_be_bytes(),
                u16::from_be(dst.sin_port),
            ));
            let upstream = TcpStream::connect_timeout(&dst, IO_TIMEOUT)?;
            let (client2, upstream2) = (client.try_clone()?, upstream.try_clone()?);
            let up = std::thread::spawn(move || splice_until_end(&client2, &upstream2));
            let down = splice_until_end(&upstream, &client);
            let _ = up.join();
            down
        });
    }
    Ok(())
}

/// Moves `src` to `dst` through a pipe until end of stream, then passes the
/// half-close on.
fn splice_until_end(src: &TcpStream, dst: &TcpStream) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
    const PIPE: usize = 1 << 20;
    let (pipe_out, pipe_in) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let _ = fcntl(&pipe_in, FcntlArg::F_SETPIPE_SZ(PIPE as i32));
    loop {
        let mut left = splice(src, None, &pipe_in, None, PIPE, SpliceFFlags::SPLICE_F_MOVE)?;
        if left == 0 {
            return dst.shutdown(Shutdown::Write);
        }
        while left > 0 {
            left -= splice(
                &pipe_out,
                None,
                dst,
                None,
                left,
                SpliceFFlags::SPLICE_F_MOVE,
            )?;
        }
    }
}
