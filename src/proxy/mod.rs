//! One connection: original destination → detect the name → decide →
//! refuse, or connect upstream and forward.

mod http;
mod inbound;
mod tls;

use crate::audit::{self, AuditLog};
use crate::config::{Limits, Mode, VerifyDst};
use crate::decide::{Decision, Facts, Step, decide};
use crate::dns::{LookupError, Resolver};
use crate::guard::Guard;
use crate::name::HostName;
use crate::net::forward::{Transferred, read_some, shutdown_write, write_all};
use crate::net::orig_dst::{OrigDst, is_loop, original_dst};
use crate::policy::{Policies, PolicyId};
use crate::telemetry;
use crate::verdict::{ErrorKind, Proto, Reason, Verdict};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// How long a refused client gets to read our refusal before the socket
/// closes, and how much of what it still sends we read meanwhile.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;

/// What every connection shares.
pub struct Context {
    pub policies: Arc<Policies>,
    pub limits: Limits,
    pub audit: AuditLog,
    pub mode: Mode,
    pub verify: VerifyDst,
    /// Looks admitted names up; `None` only with `--verify-dst off`.
    pub resolver: Option<Resolver>,
    /// Destinations never contacted.
    pub guard: Arc<Guard>,
}

/// What a port knows when it asks [`Context::admit`].
pub struct Ask<'a> {
    pub policy: PolicyId,
    pub name: Result<&'a HostName, Reason>,
    pub below_tls_floor: bool,
    pub dst: OrigDst,
    /// A later HTTP request: the upstream already connected to.
    pub connected: Option<SocketAddr>,
}

/// An admission as the ports use it: the rule already counted.
pub struct Admitted {
    pub upstream: SocketAddr,
    pub rule: Option<Arc<str>>,
    pub would_deny: Option<Reason>,
}

impl Context {
    /// Whether policy refusals are carried out now (see [`Mode`]).
    fn enforcing(&self) -> bool {
        self.mode.enforcing_at(SystemTime::now())
    }

    /// The one decision of both ports ([`decide`]), with the I/O it needs:
    /// the list in force and, for a listed name, its addresses. A rule's
    /// hit is counted only once it admits.
    async fn admit(&self, ask: Ask<'_>) -> Result<Admitted, Reason> {
        let enforcing = self.enforcing();
        let pick = fastrand::usize(..);
        let step = |addresses: Option<Result<&crate::dns::Addresses, LookupError>>| {
            // The list snapshot is never held across a lookup.
            let list = self.policies.in_force(ask.policy);
            decide(&Facts {
                name: ask.name,
                below_tls_floor: ask.below_tls_floor,
                list: list.as_deref().map(|l| &**l),
                dst: ask.dst.0,
                connected: ask.connected,
                verify: self.verify,
                enforcing,
                addresses,
                guard: &self.guard,
                now: std::time::Instant::now(),
                pick,
            })
        };
        let decision = match step(None) {
            Step::Done(decision) => decision,
            Step::Resolve => {
                let (Ok(name), Some(resolver)) = (ask.name, &self.resolver) else {
                    return Err(Reason::Unresolvable);
                };
                // Boxed: a lookup's state would otherwise size every
                // connection's task, answered from the cache or not.
                let addresses = Box::pin(resolver.resolve(name)).await;
                match step(Some(addresses.as_deref().map_err(|e| *e))) {
                    Step::Done(decision) => decision,
                    Step::Resolve => Decision::Refuse(Reason::Unresolvable),
                }
            }
        };
        match decision {
            Decision::Refuse(reason) => Err(reason),
            Decision::Admit(a) => Ok(Admitted {
                upstream: a.upstream,
                rule: a.rule.map(|r| r.admitted()),
                would_deny: a.would_deny,
            }),
        }
    }
}

/// The facts of one connection, reported once when it ends.
#[derive(Debug)]
pub struct Record {
    pub src: SocketAddr,
    /// Chosen by `src`: whose list decides.
    pub policy: PolicyId,
    pub dst: Option<OrigDst>,
    /// Where the gateway connected: `dst`, or the name's own address it
    /// was pinned to instead.
    pub upstream: Option<SocketAddr>,
    pub proto: Proto,
    pub name: Option<HostName>,
    pub rule: Option<Arc<str>>,
    /// In monitor mode: why enforce mode would have refused this.
    pub would_deny: Option<Reason>,
    pub ech: bool,
    pub verdict: Verdict,
    pub moved: Transferred,
    pub accepted: Instant,
    /// From accept until the hello or first request head was complete.
    pub hello: Option<Duration>,
    /// How long the upstream connect took, if it succeeded.
    pub connect: Option<Duration>,
    /// From accept until the verdict was final (a refusal's linger is not
    /// included).
    pub duration: Duration,
    /// A refusal was sent: let the client read it before closing.
    pub refused: bool,
}

impl Record {
    /// A connection just accepted from `src` on the `proto` listener,
    /// decided by `policy`.
    pub fn new(src: SocketAddr, policy: PolicyId, proto: Proto) -> Record {
        Record {
            src,
            policy,
            dst: None,
            upstream: None,
            proto,
            name: None,
            rule: None,
            would_deny: None,
            ech: false,
            verdict: Verdict::Error(ErrorKind::Io),
            moved: Transferred::default(),
            accepted: Instant::now(),
            hello: None,
            connect: None,
            duration: Duration::ZERO,
            refused: false,
        }
    }
}

/// Serves one accepted connection to the end and reports it.
pub async fn serve(client: TcpStream, src: SocketAddr, proto: Proto, ctx: &Context) -> Record {
    let _active = telemetry::Active::start(proto);
    let mut rec = Record::new(src, ctx.policies.policy_of(src.ip()), proto);
    let dst = destination(&client);
    rec.dst = dst.as_ref().ok().map(|(dst, _)| *dst);
    rec.verdict = match dst {
        Ok((dst, local)) if !is_loop(dst, local) => match proto {
            Proto::Tls => tls::serve(&client, dst, ctx, &mut rec).await,
            // Boxed: its future is several times the TLS one, and every
            // connection's task would otherwise be sized for it.
            Proto::Http => Box::pin(http::serve(&client, dst, ctx, &mut rec)).await,
        },
        _ => {
            rec.refused = match proto {
                Proto::Tls => tls::refuse(&client, Reason::Loop).await,
                Proto::Http => http::refuse(&client, Reason::Loop).await,
            };
            Verdict::Deny(Reason::Loop)
        }
    };
    rec.duration = rec.accepted.elapsed();
    report(&rec, ctx);
    if rec.refused {
        linger(&client).await;
    }
    rec
}

/// The original destination and our own address; an error means the
/// connection was not redirected (no conntrack NAT entry), which is
/// refused as a loop.
fn destination(client: &TcpStream) -> io::Result<(OrigDst, SocketAddr)> {
    let local = client.local_addr()?;
    Ok((original_dst(client, local)?, local))
}

/// The one place a connection is accounted for: its audit record and
/// its metrics.
fn report(rec: &Record, ctx: &Context) {
    telemetry::connection_ended(rec);
    let policy = ctx.policies.get(rec.policy).name.as_str();
    ctx.audit
        .record(audit::line(rec, policy, SystemTime::now()));
}

/// Opens the upstream connection.
async fn connect(
    upstream: SocketAddr,
    timeout: Duration,
    rec: &mut Record,
) -> Result<TcpStream, ErrorKind> {
    let start = Instant::now();
    rec.upstream = Some(upstream);
    match tokio::time::timeout_at(start + timeout, TcpStream::connect(upstream)).await {
        Ok(Ok(stream)) => {
            rec.connect = Some(start.elapsed());
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

/// Sends a refusal and half closes; whether it was sent. The caller then
/// reports the connection and [`linger`]s.
async fn refuse_with(client: &TcpStream, message: &[u8]) -> bool {
    let send = async {
        write_all(client, message).await?;
        shutdown_write(client)
    };
    matches!(tokio::time::timeout(LINGER, send).await, Ok(Ok(())))
}

/// After a refusal, drains what the client still sends for a moment, so
/// the kernel does not answer unread data with a reset that would destroy
/// the refusal before the client read it.
async fn linger(client: &TcpStream) {
    let drain = async {
        // On the heap: an array here would make every connection's task
        // 4 KiB larger, refused or not.
        let mut buf = vec![0u8; 4096];
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
#[cfg(test)]
mod tests {
    use super::*;

    /// A connection's task is allocated whole when it is accepted and
    /// lives as long as the connection, so its size is the memory of an
    /// idle connection. Rare, large states (a DNS lookup, a bulk flow's
    /// loops) are boxed to keep it small; this catches one that is not.
    #[tokio::test]
    async fn a_connections_task_stays_small() {
        let ctx = Context {
            policies: Arc::new(crate::policy::Policies::single(
                crate::allowlist::Source::File("/nonexistent".into()),
                Arc::new(crate::allowlist::Live::empty()),
            )),
            limits: Limits::default(),
            audit: AuditLog::spawn(io::sink(), 1).unwrap(),
            mode: Mode::Enforce,
            verify: VerifyDst::Pin,
            resolver: None,
            guard: Arc::new(Guard::with_addresses([])),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, peer) = listener.accept().await.unwrap();
        let task = serve(accepted, peer, Proto::Tls, &ctx);
        let size = std::mem::size_of_val(&task);
        assert!(size <= 2048, "a connection's task takes {size} bytes");
    }
}
