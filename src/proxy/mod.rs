//! One connection: original destination → detect the name → decide →
//! refuse, or connect upstream and forward.

mod http;
mod inbound;
mod tls;

use crate::allowlist::Live;
use crate::config::Limits;
use crate::name::HostName;
use crate::net::forward::{Transferred, read_some, shutdown_write, write_all};
use crate::net::orig_dst::{OrigDst, is_loop, original_dst};
use crate::verdict::{ErrorKind, Proto, Reason, Verdict};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// How long a refused client gets to read our refusal before the socket
/// closes, and how much of what it still sends we read meanwhile.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;

/// What every connection shares.
pub struct Context {
    pub list: Arc<Live>,
    pub limits: Limits,
}

impl Context {
    /// The entry that allows `name`, as written in the list.
    fn check(&self, name: &HostName) -> Result<String, Reason> {
        if !self.list.is_loaded() {
            return Err(Reason::NoList);
        }
        let list = self.list.current();
        list.lookup(name.as_str())
            .map(|e| e.to_string())
            .ok_or(Reason::NotListed)
    }
}

/// The facts of one connection, reported once when it ends.
#[derive(Debug)]
pub struct Record {
    pub src: SocketAddr,
    pub dst: Option<OrigDst>,
    pub proto: Proto,
    pub name: Option<HostName>,
    pub rule: Option<String>,
    pub ech: bool,
    pub verdict: Verdict,
    pub moved: Transferred,
    pub duration: Duration,
}

/// Serves one accepted connection to the end and reports it.
pub async fn serve(client: TcpStream, src: SocketAddr, proto: Proto, ctx: &Context) -> Record {
    let start = Instant::now();
    let mut rec = Record {
        src,
        dst: None,
        proto,
        name: None,
        rule: None,
        ech: false,
        verdict: Verdict::Error(ErrorKind::Io),
        moved: Transferred::default(),
        duration: Duration::ZERO,
    };
    let dst = destination(&client);
    rec.dst = dst.as_ref().ok().copied();
    rec.verdict = match dst {
        Ok(dst) if !is_loop(dst, client.local_addr().unwrap_or(dst.0)) => match proto {
            Proto::Tls => tls::serve(&client, dst, ctx, &mut rec).await,
            Proto::Http => http::serve(&client, dst, ctx, &mut rec).await,
        },
        _ => {
            match proto {
                Proto::Tls => tls::refuse(&client, Reason::Loop).await,
                Proto::Http => http::refuse(&client, Reason::Loop).await,
            }
            Verdict::Deny(Reason::Loop)
        }
    };
    rec.duration = start.elapsed();
    report(&rec);
    rec
}

/// The original destination; an error means the connection was not
/// redirected (no conntrack NAT entry), which is refused as a loop.
fn destination(client: &TcpStream) -> io::Result<OrigDst> {
    original_dst(client, client.local_addr()?)
}

/// One line per connection. The observability work turns this into the
/// JSON audit log and metrics; it stays the only place that reports.
fn report(rec: &Record) {
    let reason = match rec.verdict {
        Verdict::Allow => "",
        Verdict::Deny(r) => r.as_str(),
        Verdict::Error(e) => e.as_str(),
    };
    tracing::info!(
        target: "portcullis::connection",
        src = %rec.src,
        dst = rec.dst.map(|d| d.to_string()).unwrap_or_default(),
        proto = rec.proto.as_str(),
        name = rec.name.as_ref().map(HostName::as_str).unwrap_or(""),
        verdict = rec.verdict.as_str(),
        reason,
        rule = rec.rule.as_deref().unwrap_or(""),
        ech = rec.ech,
        bytes_up = rec.moved.up,
        bytes_down = rec.moved.down,
        duration_ms = u64::try_from(rec.duration.as_millis()).unwrap_or(u64::MAX),
        "connection closed"
    );
}

/// Opens the upstream connection to the original destination.
async fn connect(dst: OrigDst, timeout: Duration) -> Result<TcpStream, ErrorKind> {
    match tokio::time::timeout(timeout, TcpStream::connect(dst.0)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            Err(ErrorKind::ConnectRefused)
        }
        Ok(Err(_)) => Err(ErrorKind::Connect),
        Err(_) => Err(ErrorKind::ConnectTimeout),
    }
}

/// Sends a refusal, then closes so that the client can still read it: half
/// close, then drain what the client sends for a moment, so the kernel does
/// not answer unread data with a reset that would destroy the refusal.
async fn refuse_with(client: &TcpStream, message: &[u8]) {
    let send = async {
        write_all(client, message).await?;
        shutdown_write(client)
    };
    if !matches!(tokio::time::timeout(LINGER, send).await, Ok(Ok(()))) {
        return;
    }
    let drain = async {
        let mut buf = [0u8; 4096];
        let mut drained = 0;
        while drained < LINGER_BYTES {
            match read_some(client, &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// Closes with a reset, as a NAT would pass on a failed connect.
fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}
