//! A small authoritative DNS server for the tests, on hickory's message
//! types: real DNS over UDP and TCP on real sockets in the test's
//! namespaces. It serves A, AAAA and CNAME records, NXDOMAIN for names it
//! does not know, wildcard names (`*.zone`), and can rotate one address per
//! answer with a short TTL, the way S3 and large CDNs answer, or never
//! answer a name at all. An answer too large for UDP is truncated there
//! (TC) and served whole over TCP, as real servers do. One server can
//! listen in several namespaces (the gateway's upstream side and the
//! client's loopback), sharing its records and its rotation, so a client
//! and the gateway ask the same server; it can be stopped mid-test.

use super::netns::Netns;
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinEncodable};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// What a name answers.
#[derive(Debug, Clone)]
pub enum Answer {
    /// These addresses, all in every answer, with this TTL.
    All(Vec<IpAddr>, u32),
    /// One address of the family asked for per answer, the next each time.
    Rotate(Vec<IpAddr>, u32),
    /// An alias for another name.
    Alias(String),
    /// No answer at all, ever: the query is dropped.
    Silent,
}

/// The largest UDP answer sent whole; a larger one is truncated (TC set,
/// no records) so that the asker retries over TCP.
const UDP_ANSWER_MAX: usize = 1232;

#[derive(Default)]
struct Zone {
    names: HashMap<String, Answer>,
    /// Answers given per name and record type, for rotation.
    turns: HashMap<(String, RecordType), usize>,
    /// Queries received per name.
    asked: HashMap<String, usize>,
}

pub struct DnsServer {
    zone: Arc<Mutex<Zone>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    queries: Arc<AtomicUsize>,
    tcp_queries: Arc<AtomicUsize>,
}

impl DnsServer {
    /// Serves on UDP `addr` in each `(namespace, addr)`.
    pub fn start(at: &[(&Netns, SocketAddr)]) -> DnsServer {
        let zone = Arc::new(Mutex::new(Zone::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let queries = Arc::new(AtomicUsize::new(0));
        let tcp_queries = Arc::new(AtomicUsize::new(0));
        let mut threads = Vec::new();
        for (ns, addr) in at {
            let addr = *addr;
            let (socket, listener) = ns.enter(move || {
                let udp = UdpSocket::bind(addr).expect("bind the DNS server");
                let tcp = TcpListener::bind(addr).expect("bind the DNS server's TCP");
                (udp, tcp)
            });
            socket
                .set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            let (udp_zone, udp_stop, udp_queries) = (zone.clone(), stop.clone(), queries.clone());
            threads.push(std::thread::spawn(move || {
                let (zone, stop, queries) = (udp_zone, udp_stop, udp_queries);
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::SeqCst) {
                    let Ok((n, peer)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    queries.fetch_add(1, Ordering::SeqCst);
                    if let Some(reply) = answer(&zone, &buf[..n]) {
                        let _ = socket.send_to(&truncated_for_udp(reply), peer);
                    }
                }
            }));
            listener.set_nonblocking(true).unwrap();
            let (zone, stop) = (zone.clone(), stop.clone());
            let counts = [queries.clone(), tcp_queries.clone()];
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let Ok((conn, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    };
                    let (zone, stop, counts) = (zone.clone(), stop.clone(), counts.clone());
                    std::thread::spawn(move || serve_tcp(conn, &zone, &stop, &counts));
                }
            }));
        }
        DnsServer {
            zone,
            stop,
            threads,
            queries,
            tcp_queries,
        }
    }

    /// Sets what `name` answers.
    pub fn set(&self, name: &str, answer: Answer) {
        let mut zone = self.zone.lock().unwrap();
        zone.names.insert(name.to_ascii_lowercase(), answer);
    }

    /// Queries received for `name`, of any type.
    pub fn asked(&self, name: &str) -> usize {
        let zone = self.zone.lock().unwrap();
        zone.asked.get(name).copied().unwrap_or(0)
    }

    /// Queries received in all.
    pub fn queries(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }

    /// Queries received over TCP (answers too large for UDP).
    pub fn tcp_queries(&self) -> usize {
        self.tcp_queries.load(Ordering::SeqCst)
    }

    /// Stops answering; sockets close, queries go unanswered.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Answers length-prefixed queries on one TCP connection until it closes.
/// `counts`: all queries, and those over TCP.
fn serve_tcp(
    mut conn: TcpStream,
    zone: &Mutex<Zone>,
    stop: &AtomicBool,
    counts: &[Arc<AtomicUsize>; 2],
) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    while !stop.load(Ordering::SeqCst) {
        let mut len = [0u8; 2];
        if conn.read_exact(&mut len).is_err() {
            return;
        }
        let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if conn.read_exact(&mut query).is_err() {
            return;
        }
        for count in counts {
            count.fetch_add(1, Ordering::SeqCst);
        }
        let Some(reply) = answer(zone, &query) else {
            continue;
        };
        let Ok(n) = u16::try_from(reply.len()) else {
            return;
        };
        if conn.write_all(&n.to_be_bytes()).is_err() || conn.write_all(&reply).is_err() {
            return;
        }
    }
}

/// `reply` as UDP may carry it: whole, or with no records and TC set.
fn truncated_for_udp(reply: Vec<u8>) -> Vec<u8> {
    if reply.len() <= UDP_ANSWER_MAX {
        return reply;
    }
    let Ok(full) = Message::from_bytes(&reply) else {
        return reply;
    };
    let mut cut = Message::new();
    cut.set_id(full.id())
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_authoritative(true)
        .set_recursion_desired(full.recursion_desired())
        .set_recursion_available(true)
        .set_truncated(true)
        .add_queries(full.queries().iter().cloned());
    cut.to_bytes().unwrap_or(reply)
}

/// What `name` answers: its own records, or the nearest wildcard's.
fn find(zone: &Zone, name: &str) -> Option<Answer> {
    if let Some(found) = zone.names.get(name) {
        return Some(found.clone());
    }
    let mut rest = name;
    while let Some((_, parent)) = rest.split_once('.') {
        if let Some(found) = zone.names.get(&format!("*.{parent}")) {
            return Some(found.clone());
        }
        rest = parent;
    }
    None
}

fn answer(zone: &Mutex<Zone>, query: &[u8]) -> Option<Vec<u8>> {
    let request = Message::from_bytes(query).ok()?;
    let question = request.queries().first()?.clone();
    let mut reply = Message::new();
    reply
        .set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_authoritative(true)
        .set_recursion_desired(request.recursion_desired())
        .set_recursion_available(true)
        .add_query(question.clone());
    let qtype = question.query_type();
    let mut name = question
        .name()
        .to_ascii()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let mut zone = zone.lock().unwrap();
    *zone.asked.entry(name.clone()).or_default() += 1;
    // A CNAME chain is answered whole, as a recursive resolver does.
    for _ in 0..8 {
        let Some(found) = find(&zone, &name) else {
            reply.set_response_code(ResponseCode::NXDomain);
            break;
        };
        let owner = Name::from_ascii(format!("{name}.")).ok()?;
        let of_type = |ips: &[IpAddr]| -> Vec<IpAddr> {
            ips.iter()
                .copied()
                .filter(|ip| match qtype {
                    RecordType::A => ip.is_ipv4(),
                    RecordType::AAAA => ip.is_ipv6(),
                    _ => false,
                })
                .collect()
        };
        let (ips, ttl) = match found {
            Answer::Alias(target) => {
                let target_name = Name::from_ascii(format!("{target}.")).ok()?;
                reply.add_answer(Record::from_rdata(
                    owner,
                    300,
                    RData::CNAME(CNAME(target_name)),
                ));
                name = target.to_ascii_lowercase();
                continue;
            }
            Answer::Silent => return None,
            Answer::All(ips, ttl) => (of_type(&ips), ttl),
            Answer::Rotate(ips, ttl) => {
                let ips = of_type(&ips);
                let turn = zone.turns.entry((name.clone(), qtype)).or_default();
                let one = ips.get(*turn % ips.len().max(1)).copied();
                *turn += 1;
                (one.into_iter().collect(), ttl)
            }
        };
        for ip in ips {
            let rdata = match ip {
                IpAddr::V4(v4) => RData::A(A(v4)),
                IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
            };
            reply.add_answer(Record::from_rdata(owner.clone(), ttl, rdata));
        }
        break;
    }
    reply.to_bytes().ok()
}

/// Asks `server` for `name`'s A (or AAAA) records from inside `ns`, as a
/// client's stub resolver would; the addresses answered.
pub fn lookup(ns: &Netns, server: SocketAddr, name: &str, v6: bool) -> Vec<IpAddr> {
    let name = name.to_string();
    ns.enter(move || {
        let mut query = Message::new();
        query
            .set_id(next_id())
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true)
            .add_query(hickory_proto::op::Query::query(
                Name::from_ascii(format!("{name}.")).unwrap(),
                if v6 { RecordType::AAAA } else { RecordType::A },
            ));
        let socket = UdpSocket::bind(if server.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        })
        .unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        socket.send_to(&query.to_bytes().unwrap(), server).unwrap();
        let mut buf = [0u8; 1500];
        let Ok(n) = socket.recv(&mut buf) else {
            return Vec::new();
        };
        let reply = Message::from_bytes(&buf[..n]).unwrap();
        reply
            .answers()
            .iter()
            .filter_map(|r| match r.data() {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            })
            .collect()
    })
}

fn next_id() -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed) as u16
}
