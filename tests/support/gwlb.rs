//! A stand-in for AWS's Gateway Load Balancer, for the tests: in the
//! client's namespace, a tun device takes the client's packets (its
//! default routes point there), each goes to a target as GWLB sends it
//! (GENEVE on UDP 6081 with the ENI, attachment and flow cookie options),
//! and what a target sends back is checked (its flow's options) and
//! handed to the client. The client's own interface takes nothing else,
//! so nothing reaches the client around the tunnel.

use super::netns::Netns;
use portcullis_gwlb::geneve::{self, Family, Header, Options};
use portcullis_gwlb::packet;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::{SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

pub const ENI: u64 = 0x0e1e_0000_0000_0001;
pub const ATTACHMENT: u64 = 0x0a77_0000_0000_0002;

/// What the stand-in has seen.
#[derive(Debug, Default)]
pub struct Seen {
    /// Packets sent to the target.
    pub sent: AtomicUsize,
    /// Packets the target sent back with its flow's options.
    pub answered: AtomicUsize,
    /// Packets the target sent back with options of no flow of ours.
    pub wrong: AtomicUsize,
    /// The largest datagram the target sent back (UDP payload).
    pub largest: AtomicUsize,
    /// Client packets too large for GWLB to carry (GWLB drops them).
    pub too_big: AtomicUsize,
}

pub struct StandIn {
    pub seen: Arc<Seen>,
    cookies: Cookies,
}

/// Each flow's cookie, and the salt new cookies are made with.
type Cookies = Arc<Mutex<(HashMap<packet::FlowKey, u32>, u64)>>;

impl StandIn {
    /// Starts in `ns` (the clients' namespace), sending to `target` from
    /// `local` (an address of `ns`), both on port 6081.
    pub fn start(ns: &Netns, local: SocketAddrV4, target: SocketAddrV4) -> StandIn {
        let seen = Arc::new(Seen::default());
        let cookies: Cookies = Arc::default();
        let flows = cookies.clone();
        let path = format!("/var/run/netns/{}", ns.name);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let counts = seen.clone();
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("open netns");
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let device = tun_rs::DeviceBuilder::new()
                .name("lb0")
                // The clients' subnet's MTU: what they may send is
                // the gateway's to keep within GWLB's.
                .mtu(9001)
                .build_sync()
                .expect("the stand-in's tun device");
            let device = Arc::new(device);
            let udp = UdpSocket::bind(local).expect("bind the stand-in");
            let cookies = flows;
            let back = (
                device.clone(),
                udp.try_clone().unwrap(),
                cookies.clone(),
                counts.clone(),
            );
            std::thread::spawn(move || answers(back.0, back.1, back.2, back.3));
            ready_tx.send(()).unwrap();
            let mut buf = vec![0u8; 65_536];
            let mut out = Vec::new();
            loop {
                let Ok(n) = device.recv(&mut buf) else { return };
                let inner = &buf[..n];
                let Ok(key) = packet::from_client(inner) else {
                    continue;
                };
                let family = if inner[0] >> 4 == 6 {
                    Family::V6
                } else {
                    Family::V4
                };
                let cookie = {
                    let mut cookies = cookies.lock().unwrap();
                    let salt = cookies.1;
                    *cookies
                        .0
                        .entry(key)
                        .or_insert_with(|| cookie_of(&key, salt))
                };
                let header = Header::gwlb(
                    Options {
                        eni: ENI,
                        attachment: ATTACHMENT,
                        cookie,
                    },
                    family,
                );
                geneve::encapsulate(&header, family, inner, &mut out);
                if 28 + out.len() > geneve::GWLB_MTU {
                    counts.too_big.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
                if udp.send_to(&out, target).is_ok() {
                    counts.sent.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        ready_rx.recv().expect("the stand-in started");
        ns.ip(&["route", "replace", "default", "dev", "lb0"]);
        ns.ip(&["-6", "route", "replace", "default", "dev", "lb0"]);
        // The client's interface carries GENEVE only: an answer that went
        // around the tunnel would be lost, and the test would say so.
        for (cmd, icmp) in [("iptables", "icmp"), ("ip6tables", "ipv6-icmp")] {
            for rule in [
                vec![
                    "-A", "INPUT", "-i", "eth0", "-p", "udp", "--dport", "6081", "-j", "ACCEPT",
                ],
                vec!["-A", "INPUT", "-i", "eth0", "-p", icmp, "-j", "ACCEPT"],
                vec!["-A", "INPUT", "-i", "eth0", "-j", "DROP"],
            ] {
                let mut all = vec![cmd, "-w"];
                all.extend(rule);
                ns.exec(&all);
            }
        }
        StandIn { seen, cookies }
    }

    /// Forgets every flow: the next packet of a 5-tuple starts a new flow
    /// with a new cookie, as GWLB does when a 5-tuple is reused.
    pub fn new_flows(&self) {
        let mut cookies = self.cookies.lock().unwrap();
        cookies.0.clear();
        cookies.1 += 1;
    }
}

/// GWLB's cookie for a new flow: anything, so long as it is the flow's.
fn cookie_of(key: &packet::FlowKey, salt: u64) -> u32 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    salt.hash(&mut h);
    h.finish() as u32
}

/// The target's datagrams: checked, then their packets to the client.
fn answers(device: Arc<tun_rs::SyncDevice>, udp: UdpSocket, cookies: Cookies, seen: Arc<Seen>) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok(n) = udp.recv(&mut buf) else { return };
        seen.largest.fetch_max(n, Ordering::SeqCst);
        let Ok(decoded) = geneve::decode(&buf[..n]) else {
            seen.wrong.fetch_add(1, Ordering::SeqCst);
            continue;
        };
        let ours = packet::to_client(decoded.packet)
            .ok()
            .and_then(|key| cookies.lock().unwrap().0.get(&key).copied());
        let o = decoded.options;
        if ours != Some(o.cookie) || o.eni != ENI || o.attachment != ATTACHMENT {
            seen.wrong.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        seen.answered.fetch_add(1, Ordering::SeqCst);
        let _ = device.send(decoded.packet);
    }
}
