//! The tunnel's I/O: GWLB's datagrams in, their inner packets into the
//! host's stack through a tun device (where iptables redirects them to the
//! proxy like any routed packet), and every packet the host sends back
//! toward those clients out again behind its flow's header.
//!
//! ```text
//! GWLB ─UDP 6081─▶ decode ─▶ flow table (learn) ─▶ tun ─▶ host stack ─▶ proxy
//! GWLB ◀─raw IPv4─ encapsulate ◀─ flow table (answer) ◀─ tun ◀─ fwmark route ◀─ host
//! ```
//!
//! A packet comes back into the tun by policy routing: the iptables rules
//! (`GWLB=1`) mark every connection that arrives on the device and restore
//! that mark on the host's own packets, and this module routes the mark
//! into the device. Upstream connections are the proxy's own, unmarked,
//! and leave by the host's ordinary routes.

use crate::flows::{FlowTable, Outer};
use crate::geneve::{self, Family, GWLB_MTU, OVERHEAD};
use crate::packet;
use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrIn, recvmsg, setsockopt, sockopt};
use socket2::{Domain, Protocol, Socket, Type};
use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// The largest inner packet: what GWLB carries less what it adds. The
/// device's MTU, so the host never sends a larger one back.
pub const INNER_MTU: usize = GWLB_MTU - OVERHEAD;
/// The mark the iptables rules put on tunnelled connections, and the
/// routing table that sends marked packets into the device.
pub const MARK: u32 = 0x6081;
pub const TABLE: u32 = 6081;
/// How often idle flows are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// At most one log line per reason this often.
const LOG_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Config {
    /// Where GWLB's datagrams arrive: UDP 6081 on every address.
    pub listen: SocketAddrV4,
    /// The tun device's name.
    pub device: String,
    /// The device's own addresses: iptables `REDIRECT` needs one of each
    /// family on the interface a packet arrives on.
    pub device_v4: (Ipv4Addr, u8),
    pub device_v6: (Ipv6Addr, u8),
    pub max_flows: usize,
}

#[derive(Debug, Error)]
pub enum TunnelError {
    #[error("cannot make the tun device {0}: {1}")]
    Device(String, io::Error),
    #[error("cannot route marked packets into {0}: {1}")]
    Route(String, String),
    #[error("cannot listen on udp {0}: {1}")]
    Listen(SocketAddrV4, io::Error),
    #[error("cannot open a raw socket to answer GWLB: {0}")]
    Raw(io::Error),
    #[error("the tun device failed: {0}")]
    DeviceIo(io::Error),
    #[error("the GENEVE socket failed: {0}")]
    SocketIo(io::Error),
}

/// Why a packet was not carried; a closed set, a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// A datagram that is not GWLB's GENEVE.
    NotGeneve,
    /// An inner packet that names no flow (malformed, a later fragment,
    /// another protocol).
    NoFlow,
    /// A packet toward a client whose flow never came from GWLB.
    UnknownFlow,
    /// A new flow while the table is full.
    TableFull,
    /// Larger than GWLB carries.
    TooBig,
    /// The device or the socket would not take it.
    SendFailed,
}

impl Dropped {
    pub const ALL: [Dropped; 6] = [
        Dropped::NotGeneve,
        Dropped::NoFlow,
        Dropped::UnknownFlow,
        Dropped::TableFull,
        Dropped::TooBig,
        Dropped::SendFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Dropped::NotGeneve => "not_geneve",
            Dropped::NoFlow => "no_flow",
            Dropped::UnknownFlow => "unknown_flow",
            Dropped::TableFull => "table_full",
            Dropped::TooBig => "too_big",
            Dropped::SendFailed => "send_failed",
        }
    }
}

/// Packets and bytes one way.
#[derive(Debug, Default)]
pub struct Counts {
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
}

impl Counts {
    fn add(&self, bytes: usize) {
        self.packets.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

/// What the tunnel has done, read by its metrics.
#[derive(Debug, Default)]
pub struct Stats {
    /// Datagrams from GWLB (their whole UDP payload).
    pub from_gwlb: Counts,
    /// Datagrams back to GWLB (their whole UDP payload).
    pub to_gwlb: Counts,
    /// By [`Dropped::ALL`]'s order.
    pub dropped: [AtomicU64; Dropped::ALL.len()],
    /// Flows in the table.
    pub flows: AtomicU64,
    /// Set once the device, the routes and both sockets are up.
    pub serving: std::sync::atomic::AtomicBool,
}

/// Drops, counted, and logged at most once per [`LOG_EVERY`] per reason.
struct Drops<'a> {
    stats: &'a Stats,
    logged: Mutex<[Option<Instant>; Dropped::ALL.len()]>,
}

impl Drops<'_> {
    fn count(&self, why: Dropped) -> usize {
        let at = Dropped::ALL.iter().position(|d| *d == why).unwrap_or(0);
        self.stats.dropped[at].fetch_add(1, Ordering::Relaxed);
        at
    }

    fn note(&self, why: Dropped, detail: impl FnOnce() -> String) {
        let at = self.count(why);
        let now = Instant::now();
        let mut logged = lock(&self.logged);
        if logged[at].is_none_or(|t| now.duration_since(t) >= LOG_EVERY) {
            logged[at] = Some(now);
            drop(logged);
            tracing::warn!(reason = why.as_str(), "gwlb: packet dropped: {}", detail());
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every state of these tables is a usable one.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs the tunnel until one of its parts fails.
pub async fn run(config: &Config, stats: Arc<Stats>) -> Result<(), TunnelError> {
    let device = tun_rs::DeviceBuilder::new()
        .name(config.device.clone())
        .ipv4(config.device_v4.0, config.device_v4.1, None)
        .ipv6(config.device_v6.0, config.device_v6.1)
        .mtu(INNER_MTU as u16)
        .build_async()
        .map_err(|e| TunnelError::Device(config.device.clone(), e))?;
    route_back(&config.device).map_err(|e| TunnelError::Route(config.device.clone(), e))?;
    let udp = listen(config.listen).map_err(|e| TunnelError::Listen(config.listen, e))?;
    let raw = raw_socket().map_err(TunnelError::Raw)?;
    let table = Mutex::new(FlowTable::new(config.max_flows));
    let drops = Drops {
        stats: &stats,
        logged: Mutex::new([None; Dropped::ALL.len()]),
    };
    stats.serving.store(true, Ordering::Release);
    tracing::info!(
        device = %config.device,
        listen = %config.listen,
        "gwlb: tunnel serving"
    );
    let result = tokio::select! {
        r = ingress(&udp, &device, &table, &stats, &drops) => r,
        r = egress(&device, &raw, &table, &stats, &drops) => r,
        () = sweep(&table, &stats) => Ok(()),
    };
    stats.serving.store(false, Ordering::Release);
    result
}

/// GWLB → host: decode, learn the flow, hand the inner packet to the stack.
async fn ingress(
    udp: &UdpSocket,
    device: &tun_rs::AsyncDevice,
    table: &Mutex<FlowTable>,
    stats: &Stats,
    drops: &Drops<'_>,
) -> Result<(), TunnelError> {
    let mut buf = vec![0u8; 65_536];
    let port = udp.local_addr().map_or(geneve::PORT, |a| a.port());
    loop {
        let (n, gwlb, local) = udp
            .async_io(Interest::READABLE, || recv_from_to(udp, &mut buf))
            .await
            .map_err(TunnelError::SocketIo)?;
        stats.from_gwlb.add(n);
        let decoded = match geneve::decode(&buf[..n]) {
            Ok(decoded) => decoded,
            Err(e) => {
                drops.note(Dropped::NotGeneve, || format!("from {gwlb}: {e}"));
                continue;
            }
        };
        let key = match packet::from_client(decoded.packet) {
            Ok(key) => key,
            Err(e) => {
                drops.note(Dropped::NoFlow, || format!("from {gwlb}: {e}"));
                continue;
            }
        };
        let outer = Outer {
            gwlb,
            local: SocketAddrV4::new(local, port),
        };
        let learnt = {
            let mut table = lock(table);
            let learnt = table.learn(key, decoded.header, outer, Instant::now());
            stats.flows.store(table.len() as u64, Ordering::Relaxed);
            learnt
        };
        if learnt.is_err() {
            drops.note(Dropped::TableFull, || format!("new flow {key:?}"));
            continue;
        }
        if let Err(e) = device.send(decoded.packet).await {
            drops.note(Dropped::SendFailed, || format!("into the device: {e}"));
        }
    }
}

/// Host → GWLB: every packet the stack routes into the device, behind its
/// flow's header, or nowhere.
async fn egress(
    device: &tun_rs::AsyncDevice,
    raw: &UdpSocket,
    table: &Mutex<FlowTable>,
    stats: &Stats,
    drops: &Drops<'_>,
) -> Result<(), TunnelError> {
    let mut buf = vec![0u8; 65_536];
    let (mut geneve_buf, mut frame) = (Vec::with_capacity(GWLB_MTU), Vec::with_capacity(GWLB_MTU));
    loop {
        let n = device.recv(&mut buf).await.map_err(TunnelError::DeviceIo)?;
        let packet = &buf[..n];
        let key = match packet::to_client(packet) {
            Ok(key) => key,
            // The device's own link chatter: counted, not worth a line.
            Err(packet::PacketError::Local) => {
                drops.count(Dropped::NoFlow);
                continue;
            }
            Err(e) => {
                drops.note(Dropped::NoFlow, || format!("toward a client: {e}"));
                continue;
            }
        };
        let Some(flow) = lock(table).answer(&key, Instant::now()) else {
            drops.note(Dropped::UnknownFlow, || {
                format!("{key:?} never came from GWLB")
            });
            continue;
        };
        let family = if packet[0] >> 4 == 6 {
            Family::V6
        } else {
            Family::V4
        };
        geneve::encapsulate(&flow.header, family, packet, &mut geneve_buf);
        let outer = match geneve::outer_header(flow.outer.local, flow.outer.gwlb, geneve_buf.len())
        {
            Some(outer) if 28 + geneve_buf.len() <= GWLB_MTU => outer,
            _ => {
                drops.note(Dropped::TooBig, || format!("{n} bytes toward {key:?}"));
                continue;
            }
        };
        frame.clear();
        frame.extend_from_slice(&outer);
        frame.extend_from_slice(&geneve_buf);
        // A raw socket takes no port: the UDP header is in the frame.
        let to = SocketAddrV4::new(*flow.outer.gwlb.ip(), 0);
        match raw.send_to(&frame, to).await {
            Ok(_) => stats.to_gwlb.add(geneve_buf.len()),
            Err(e) => drops.note(Dropped::SendFailed, || {
                format!("to {}: {e}", flow.outer.gwlb)
            }),
        }
    }
}

async fn sweep(table: &Mutex<FlowTable>, stats: &Stats) {
    let mut every = tokio::time::interval(SWEEP_EVERY);
    loop {
        every.tick().await;
        let mut table = lock(table);
        table.sweep(Instant::now());
        stats.flows.store(table.len() as u64, Ordering::Relaxed);
    }
}

/// The UDP socket GWLB sends to, told each datagram's destination address
/// (the one to answer from).
fn listen(at: SocketAddrV4) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    // Bursts from GWLB arrive faster than one task reads them.
    let _ = socket.set_recv_buffer_size(8 << 20);
    socket.bind(&at.into())?;
    setsockopt(&socket, sockopt::Ipv4PacketInfo, &true)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket.into())
}

/// One datagram: its length, its sender, and the address it was sent to.
fn recv_from_to(udp: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, SocketAddrV4, Ipv4Addr)> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut control = nix::cmsg_space!(libc::in_pktinfo);
    let msg = recvmsg::<SockaddrIn>(
        udp.as_raw_fd(),
        &mut iov,
        Some(&mut control),
        MsgFlags::MSG_DONTWAIT,
    )?;
    let from = msg
        .address
        .ok_or_else(|| io::Error::other("a datagram without a sender"))?;
    let mut to = None;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::Ipv4PacketInfo(info) = c {
            to = Some(Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr)));
        }
    }
    let to = to.ok_or_else(|| io::Error::other("a datagram without its destination"))?;
    Ok((msg.bytes, SocketAddrV4::new(from.ip(), from.port()), to))
}

/// A raw IPv4 socket: the answers go from GWLB's own UDP port, which no
/// socket of ours is bound to. Held as tokio's `UdpSocket`, which only
/// needs a datagram descriptor to wait on and `sendto` (safe, where
/// registering a bare descriptor is not).
fn raw_socket() -> io::Result<UdpSocket> {
    let socket = Socket::new(
        Domain::IPV4,
        Type::RAW,
        Some(Protocol::from(libc::IPPROTO_RAW)),
    )?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket.into())
}

/// Sends marked packets (the host's packets of tunnelled connections)
/// into `device`, for both families, and lets the device take packets
/// from addresses the host routes elsewhere: reverse-path filtering off
/// on it, or loose where the host is strict everywhere. Idempotent.
fn route_back(device: &str) -> Result<(), String> {
    let mark = format!("{MARK:#x}");
    let table = TABLE.to_string();
    for family in ["-4", "-6"] {
        // An earlier run's rule, if any, then exactly one.
        while ip(&[family, "rule", "del", "fwmark", &mark, "lookup", &table]).is_ok() {}
        ip(&[
            family, "rule", "add", "fwmark", &mark, "lookup", &table, "priority", "6081",
        ])?;
        ip(&[
            family, "route", "replace", "default", "dev", device, "table", &table,
        ])?;
        // Should the device go (the tunnel stopped), marked packets meet
        // this instead of the main table's routes: an answer to a GWLB
        // client never leaves around the load balancer.
        ip(&[
            family,
            "route",
            "replace",
            "unreachable",
            "default",
            "metric",
            "4294967295",
            "table",
            &table,
        ])?;
    }
    let all = std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/rp_filter").unwrap_or_default();
    let mode = if all.trim() == "0" { "0" } else { "2" };
    let path = format!("/proc/sys/net/ipv4/conf/{device}/rp_filter");
    std::fs::write(&path, mode).map_err(|e| format!("{path}: {e}"))
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
