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
use crate::limit::Source;
use crate::name::HostName;
use crate::net::forward::{
    Activity, Counters, Expired, FlowClock, Supervised, read_some, shutdown_write, supervise,
    write_all,
};
use crate::net::orig_dst::{OrigDst, is_loop, original_dst};
use crate::policy::{Policies, PolicyId};
use crate::record::{Fact, Record};
use crate::telemetry::Metrics;
use crate::verdict::{ErrorKind, Proto, Reason, Verdict};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
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
    /// A forwarding flow's timers ([`Limits::flow_clock`]): one copy that
    /// every flow refers to rather than one in each connection's task.
    pub flow: FlowClock,
    pub audit: AuditLog,
    /// Write an `open` record for each admitted connection.
    pub audit_open: bool,
    pub mode: Mode,
    pub verify: VerifyDst,
    /// Looks admitted names up; `None` only with `--verify-dst off`.
    pub resolver: Option<Resolver>,
    /// Destinations never contacted.
    pub guard: Arc<Guard>,
    pub metrics: Metrics,
}

/// What a port knows when it asks [`Context::admit`].
pub struct Ask<'a> {
    pub policy: PolicyId,
    /// Whose lookups a new name counts against.
    pub client: Source,
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
                let addresses = Box::pin(resolver.resolve(name, ask.client)).await;
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

/// How a handler's connection ended, as it returns it.
pub(crate) struct Outcome {
    verdict: Verdict,
    /// A refusal was sent: let the client read it before closing.
    refusal_sent: bool,
}

impl Outcome {
    fn ended(verdict: Verdict) -> Outcome {
        Outcome {
            verdict,
            refusal_sent: false,
        }
    }

    fn refused(reason: Reason, sent: bool) -> Outcome {
        Outcome {
            verdict: Verdict::Deny(reason),
            refusal_sent: sent,
        }
    }

    /// An error the client was told of (an HTTP 502 or 504).
    fn failed_and_told(kind: ErrorKind, sent: bool) -> Outcome {
        Outcome {
            verdict: Verdict::Error(kind),
            refusal_sent: sent,
        }
    }
}

impl From<Verdict> for Outcome {
    fn from(verdict: Verdict) -> Outcome {
        Outcome::ended(verdict)
    }
}

/// One connection as its handler sees it: the record its facts go into,
/// and the bytes moved, counted as they move.
///
/// The record sits behind a lock because three parties share it within
/// the connection's one task: the handler, the interim reports made while
/// it forwards, and [`Ending`], which reports a connection that is cut
/// short. The lock is never contended (one task, and a guard cannot be
/// held across an await: it is not `Send`), so taking it is one atomic
/// operation.
pub(crate) struct Conn {
    rec: Mutex<Record>,
    moved: Counters,
}

impl Conn {
    fn record(&self) -> MutexGuard<'_, Record> {
        // A panic elsewhere cannot leave a record half written in a way
        // that matters more than losing it.
        self.rec
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Notes what the handler just learnt.
    fn learn(&self, fact: Fact) {
        self.record().note(fact);
    }

    fn accepted(&self) -> Instant {
        self.record().accepted
    }

    fn policy(&self) -> PolicyId {
        self.record().policy
    }

    fn client(&self) -> Source {
        Source::of(self.record().src.ip())
    }

    /// HTTP: a new request head was read. The request the record
    /// described so far, if any, gets a `request` record of its own (its
    /// name, and the bytes moved since it began), and the record
    /// describes the new one from now on. So each byte is in exactly one
    /// record, under the name it was sent for, and a refused request
    /// never carries an allowed one's bytes.
    fn begin_request(&self, ctx: &Context) {
        let moved = self.moved.snapshot();
        let mut rec = self.record();
        if rec.request > 0 {
            rec.close(Verdict::Allow, moved, Instant::now());
            ctx.metrics.request_ended(&rec);
            let policy = ctx.policies.get(rec.policy).name.as_str();
            ctx.audit.record(audit::line(
                &rec,
                audit::Kind::Request,
                policy,
                SystemTime::now(),
            ));
        }
        rec.next_request(moved);
    }

    /// Writes an `open` or `interim` record: the connection as it stands.
    fn report_progress(&self, kind: audit::Kind, ctx: &Context) {
        let mut now = self.record().clone();
        now.close(Verdict::Allow, self.moved.snapshot(), Instant::now());
        let policy = ctx.policies.get(now.policy).name.as_str();
        ctx.audit
            .record(audit::line(&now, kind, policy, SystemTime::now()));
    }

    /// Forwards `work` under this connection's timers, with an interim
    /// record at each tick. A plain function: another async layer would
    /// add its own state to every connection's task.
    fn supervised<'a, F: Future>(
        &'a self,
        work: std::pin::Pin<&'a mut F>,
        activity: &'a Activity,
        ctx: &'a Context,
    ) -> Supervised<'a, F, impl FnMut() + 'a> {
        let tick = move || self.report_progress(audit::Kind::Interim, ctx);
        supervise(work, activity, &ctx.flow, tick)
    }
}

impl From<Expired> for ErrorKind {
    fn from(expired: Expired) -> ErrorKind {
        match expired {
            Expired::Idle => ErrorKind::Idle,
            Expired::HalfClosed => ErrorKind::HalfClosed,
        }
    }
}

/// Writes a connection's `end` record exactly once: when the handler
/// returns its verdict, or, if the connection's task is dropped first (the
/// worker's runtime shutting down at the end of a drain, on SIGINT or on a
/// second SIGTERM), on drop, as cut by shutdown with what it moved so far.
struct Ending<'a> {
    conn: &'a Conn,
    ctx: &'a Context,
    reported: bool,
}

impl Ending<'_> {
    /// Reports the connection with `verdict`.
    fn report(&mut self, verdict: Verdict) {
        self.reported = true;
        let mut rec = self.conn.record();
        rec.close(verdict, self.conn.moved.snapshot(), Instant::now());
        report(&rec, self.ctx);
    }
}

impl Drop for Ending<'_> {
    fn drop(&mut self) {
        if !self.reported {
            self.report(Verdict::Error(ErrorKind::Shutdown));
        }
    }
}

/// Serves one accepted connection to the end and reports it, holding its
/// place under the connection limits (`slot`) until then.
///
/// This future is the connection's task, and every value in it that lives
/// across an await point stays in the task for the connection's whole
/// life, idle or not. So it owns what it is given (an async block around
/// it would keep copies of the socket and the address beside it), the
/// client's address goes into the record before the future is made, and
/// the phases before the flow are boxed futures of their own.
pub fn serve(
    client: TcpStream,
    src: SocketAddr,
    proto: Proto,
    ctx: Arc<Context>,
    slot: crate::limit::Slot,
) -> impl Future<Output = ()> + Send {
    let conn = Conn {
        rec: Mutex::new(Record::new(src, ctx.policies.policy_of(src.ip()), proto)),
        moved: Counters::default(),
    };
    async move {
        let _slot = slot;
        let ctx = &*ctx;
        let _active = ctx.metrics.active(proto);
        let mut ending = Ending {
            conn: &conn,
            ctx,
            reported: false,
        };
        let outcome = handle(&client, proto, ctx, &conn).await;
        ending.report(outcome.verdict);
        if outcome.refusal_sent {
            linger(&client).await;
        }
    }
}

async fn handle(client: &TcpStream, proto: Proto, ctx: &Context, conn: &Conn) -> Outcome {
    // The listener is bound to one family (IPv6 ones are v6-only), so the
    // client's address says which original destination to ask for.
    let dst = original_dst(client, conn.record().src);
    conn.learn(Fact::Destination(dst.as_ref().ok().copied()));
    // An error means the connection was not redirected (no conntrack
    // entry): refused as a loop too.
    let dst = match dst {
        Ok(dst) if !is_loop(dst, |ip| ctx.guard.is_own(ip)) => dst,
        _ => {
            let sent = match proto {
                Proto::Tls => tls::refuse(client, Reason::Loop).await,
                Proto::Http => http::refuse(client, Reason::Loop).await,
            };
            return Outcome::refused(Reason::Loop, sent);
        }
    };
    match proto {
        // Boxed: the hello, the decision and the connect take more room
        // than the forwarding after them.
        Proto::Tls => {
            let opened = Box::pin(tls::open_upstream(client, dst, ctx, conn)).await;
            match opened {
                Ok(upstream) => tls::forward(client, upstream, ctx, conn).await,
                Err(outcome) => outcome,
            }
        }
        // Boxed: its future is several times the TLS one, and every
        // connection's task would otherwise be sized for it.
        Proto::Http => Box::pin(http::serve(client, dst, ctx, conn)).await,
    }
}

/// The one place a connection's end is accounted for: its audit record
/// and its metrics.
fn report(rec: &Record, ctx: &Context) {
    ctx.metrics.connection_ended(rec);
    let policy = ctx.policies.get(rec.policy).name.as_str();
    ctx.audit.record(audit::line(
        rec,
        audit::Kind::End,
        policy,
        SystemTime::now(),
    ));
}

/// Why an upstream connection is not there to forward to.
enum NotConnected {
    Failed(ErrorKind),
    /// It reached the gateway itself: an address the host took a moment
    /// before, between the kernel's event and the guard's reading it.
    /// Closed before a byte of the client's went in.
    Gateway,
}

/// Opens the upstream connection; with `--audit-open`, reports it open.
async fn connect(
    upstream: SocketAddr,
    ctx: &Context,
    conn: &Conn,
) -> Result<TcpStream, NotConnected> {
    let start = Instant::now();
    conn.learn(Fact::Upstream(upstream));
    let timeout = ctx.limits.connect_timeout;
    match tokio::time::timeout_at(start + timeout, TcpStream::connect(upstream)).await {
        // A connection to one of the host's own addresses leaves from that
        // address: one getsockname closes the guard's last window.
        Ok(Ok(stream)) if stream.local_addr().is_ok_and(|l| l.ip() == upstream.ip()) => {
            reset(&stream);
            Err(NotConnected::Gateway)
        }
        Ok(Ok(stream)) => {
            conn.learn(Fact::Connected {
                took: start.elapsed(),
            });
            let _ = stream.set_nodelay(true);
            if ctx.audit_open {
                conn.report_progress(audit::Kind::Open, ctx);
            }
            Ok(stream)
        }
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            Err(NotConnected::Failed(ErrorKind::ConnectRefused))
        }
        Ok(Err(_)) => Err(NotConnected::Failed(ErrorKind::Connect)),
        Err(_) => Err(NotConnected::Failed(ErrorKind::ConnectTimeout)),
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

/// Refuses a connection that a connection limit turned away before a byte
/// of it was read: a TLS `internal_error` alert or an HTTP 503, then the
/// usual linger so that the client reads it.
pub async fn refuse_full(client: &TcpStream, proto: Proto, full: crate::limit::Full) {
    use crate::detect::tls::{AlertDescription, fatal_alert};
    let sent = match proto {
        Proto::Tls => refuse_with(client, &fatal_alert(AlertDescription::InternalError)).await,
        Proto::Http => refuse_with(client, &http::full(full)).await,
    };
    if sent {
        linger(client).await;
    }
}

/// Makes the socket close with a reset: as a NAT would pass on a failed
/// connect, or for a refusal there is no room to send.
pub fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}
#[cfg(test)]
impl Context {
    /// A context with no list loaded (every name is refused), defaults
    /// otherwise, and nowhere for its audit records to go.
    pub(crate) fn for_tests() -> Context {
        Context {
            policies: Arc::new(crate::policy::Policies::single(
                crate::allowlist::Source::File("/nonexistent".into()),
                Arc::new(crate::allowlist::Live::empty()),
            )),
            limits: Limits::default(),
            flow: Limits::default().flow_clock(),
            audit: AuditLog::spawn(io::sink(), 1, metrics::Counter::noop())
                .expect("an audit writer thread"),
            audit_open: false,
            mode: Mode::Enforce,
            verify: VerifyDst::Pin,
            resolver: None,
            guard: Arc::new(Guard::with_addresses([])),
            metrics: Metrics::detached(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection's task is allocated whole when it is accepted and
    /// lives as long as the connection, so its size is the memory of an
    /// idle connection. States that end before the flow does (the hello,
    /// the decision and the connect) or that only some flows reach (a DNS
    /// lookup, a bulk flow's loops) are boxed to keep it small; this
    /// catches one that is not.
    #[tokio::test]
    async fn a_connections_task_stays_small() {
        let ctx = Context::for_tests();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, peer) = listener.accept().await.unwrap();
        let slot = crate::limit::Limits::new(10, 10)
            .try_admit(peer.ip())
            .unwrap();
        let task = serve(accepted, peer, Proto::Tls, Arc::new(ctx), slot);
        let size = std::mem::size_of_val(&task);
        assert!(size <= 1024, "a connection's task takes {size} bytes");
    }
}
