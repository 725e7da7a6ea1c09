//! The gateway process: listeners, accept loops, the connection limit and
//! shutdown.

use crate::allowlist::{Live, LoadError, Reloader};
use crate::audit::{self, AuditLog};
use crate::balance::{Place, Workers};
use crate::config::{Config, Mode, VerifyDst};
use crate::dns::Resolver;
use crate::drain::{Signals, Stop};
use crate::guard::Guard;
use crate::limit::{Full, Limits};
use crate::net::listener;
use crate::policy::{Policies, Policy};
use crate::proxy::{self, Context};
use crate::telemetry::{Exporter, Metrics};
use crate::verdict::Proto;
use std::io;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tracing::Instrument;

/// Pause after an accept error such as EMFILE, so a descriptor shortage
/// does not spin the accept loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At most one warning per this interval for repeated refusals.
const WARN_EVERY: Duration = Duration::from_secs(5);
/// How long the audit records of finished connections may take to reach
/// stdout at exit.
const AUDIT_FLUSH: Duration = Duration::from_secs(2);
/// How long the workers may take to drop their live connections at exit.
const CUT_WAIT: Duration = Duration::from_secs(2);
/// Refusals at a connection limit sent at once, at most. Each holds its
/// socket for up to [`proxy::refuse_full`]'s linger; past this many, a
/// refused connection is reset, so a flood cannot turn refusals into the
/// exhaustion the limit prevents.
const REFUSING: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot serve the admin endpoint on {addr}: {source}")]
    Admin { addr: SocketAddr, source: io::Error },
    #[error("cannot install signal handlers: {0}")]
    Signals(io::Error),
    #[error("--verify-dst: cannot read the system's resolver configuration: {0}")]
    Resolver(hickory_resolver::ResolveError),
    #[error("cannot read the host's own addresses: {0}")]
    Interfaces(io::Error),
    #[error("cannot start a connection worker: {0}")]
    Worker(io::Error),
    #[error("cannot start the audit log writer: {0}")]
    Audit(io::Error),
    #[error("--audit-file {}: {source}", path.display())]
    AuditFile {
        path: std::path::PathBuf,
        source: io::Error,
    },
    #[error("no listener could be bound")]
    NoListener,
    #[error("{0}")]
    List(#[from] LoadError),
}

/// Runs the gateway until SIGTERM (drain) or SIGINT (now).
pub async fn run(config: Config) -> Result<(), ServerError> {
    let mut signals = Signals::install().map_err(ServerError::Signals)?;
    let mut all = Vec::with_capacity(config.policies.len());
    let mut reloaders = Vec::with_capacity(config.policies.len());
    for policy in &config.policies {
        let live = Arc::new(Live::empty());
        let span = tracing::info_span!("policy", name = %policy.name);
        let reloader = Reloader::start(policy.reload.clone(), live.clone())
            .instrument(span.clone())
            .await?;
        reloaders.push((reloader, span));
        all.push(Policy {
            name: policy.name.clone(),
            source: policy.reload.source.clone(),
            live,
        });
    }
    let policies = Arc::new(Policies::new(config.sources.clone(), all));
    let (exporter, metrics) = Exporter::new(&policies);
    let dropped = metrics.audit_dropped();
    let audit = match &config.audit_file {
        Some(path) => {
            AuditLog::spawn_file(path, audit::QUEUE_RECORDS, dropped).map_err(|source| {
                ServerError::AuditFile {
                    path: path.clone(),
                    source,
                }
            })?
        }
        None => AuditLog::spawn(io::stdout(), audit::QUEUE_RECORDS, dropped)
            .map_err(ServerError::Audit)?,
    };
    // SIGUSR1 (logrotate's postrotate) reopens the audit file.
    if let Some(mut reopen) = signals.reopen.take() {
        let audit = audit.clone();
        tokio::spawn(async move {
            while reopen.recv().await.is_some() {
                audit.reopen();
            }
        });
    }
    let listeners = bind_all(&config, worker_count())?;
    let serving = Arc::new(AtomicBool::new(false));
    // A GWLB target is ready only while its tunnel is: GWLB's health check
    // then takes a target whose tunnel died out of service.
    let tunnel_up = config.gwlb_ready.map(|at| {
        let up = Arc::new(AtomicBool::new(false));
        tokio::spawn(crate::admin::follow_readiness(at, up.clone()));
        up
    });
    let ready = {
        let (policies, serving) = (policies.clone(), serving.clone());
        Arc::new(move || {
            let tunnel = tunnel_up
                .as_ref()
                .is_none_or(|up| up.load(Ordering::Acquire));
            match (
                policies.all_loaded(),
                serving.load(Ordering::Acquire),
                tunnel,
            ) {
                (false, _, _) => Err("a policy has no allowlist loaded"),
                (_, false, _) => Err("listeners not serving"),
                (_, _, false) => Err("the GWLB tunnel is not serving"),
                (true, true, true) => Ok(()),
            }
        })
    };
    let admin = config.metrics_listen;
    crate::admin::spawn(admin, ready, exporter).map_err(|source| ServerError::Admin {
        addr: admin,
        source,
    })?;

    let guard = Arc::new(Guard::from_host().map_err(ServerError::Interfaces)?);
    crate::guard::follow_host(&guard).map_err(ServerError::Interfaces)?;
    let ctx = Arc::new(Context {
        policies: policies.clone(),
        limits: config.limits,
        flow: config.limits.flow_clock(),
        audit: audit.clone(),
        audit_open: config.audit_open,
        mode: config.mode,
        verify: config.verify_dst,
        resolver: match config.verify_dst {
            VerifyDst::Off => None,
            VerifyDst::Pin | VerifyDst::Dns => {
                Some(Resolver::from_system(metrics.clone()).map_err(ServerError::Resolver)?)
            }
        },
        guard: guard.clone(),
        metrics: metrics.clone(),
    });
    announce_mode(config.mode, &metrics);
    announce_verify(config.verify_dst);
    let limits = Limits::new(config.max_connections, config.max_connections_per_source);
    let refusing = Arc::new(Semaphore::new(REFUSING));
    let (stop_tx, stop_rx) = watch::channel(Phase::Serving);
    let (ended_tx, ended_rx) = std::sync::mpsc::channel();
    let workers = listeners.len();
    // Every worker's runtime first: each may hand connections to the others.
    let runtimes = (0..workers)
        .map(|_| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        })
        .collect::<io::Result<Vec<_>>>()
        .map_err(ServerError::Worker)?;
    let shared = Arc::new(Shared {
        ctx: ctx.clone(),
        limits: limits.clone(),
        refusing: refusing.clone(),
        workers: Workers::new(workers),
        handles: runtimes.iter().map(|r| r.handle().clone()).collect(),
    });
    for (worker, (runtime, listeners)) in runtimes.into_iter().zip(listeners).enumerate() {
        let (stop, ended) = (stop_rx.clone(), ended_tx.clone());
        spawn_worker(worker, runtime, listeners, shared.clone(), stop, ended)
            .map_err(ServerError::Worker)?;
    }
    serving.store(true, Ordering::Release);
    // SIGHUP reloads every policy's list; each reloader polls on its own.
    let (reload_tx, reload_rx) = watch::channel(());
    if let Some(mut hangup) = signals.hangup.take() {
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading the allowlists");
                reload_tx.send_replace(());
            }
        });
    }
    for (reloader, span) in reloaders {
        tokio::spawn(reloader.run(reload_rx.clone()).instrument(span));
    }
    for policy in policies.iter() {
        tracing::info!(
            policy = %policy.name,
            loaded = policy.live.is_loaded(),
            entries = policy.live.current().list.len(),
            "policy in force"
        );
    }
    tracing::info!(policies = config.policies.len(), "portcullis serving");

    let stop = signals.next().await;
    serving.store(false, Ordering::Release);
    stop_tx.send_replace(Phase::Draining);
    if stop == Stop::Drain {
        tracing::info!(live = limits.live(), timeout = ?config.drain_timeout, "SIGTERM: draining");
        tokio::select! {
            _ = tokio::time::timeout(config.drain_timeout, limits.all_ended()) => {}
            _ = signals.next() => tracing::info!("second signal: stopping now"),
        }
    } else {
        tracing::info!("SIGINT: stopping now");
    }
    let live = limits.live();
    if live > 0 {
        tracing::info!(live, "cutting the connections still open");
    }
    // Each worker drops its runtime, and with it every live connection,
    // which writes its record as it goes.
    stop_tx.send_replace(Phase::Cut);
    let cut = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + CUT_WAIT;
        (0..workers).all(|_| {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            ended_rx.recv_timeout(left).is_ok()
        })
    });
    if !matches!(cut.await, Ok(true)) {
        tracing::warn!(
            "a worker did not stop within {CUT_WAIT:?}; its connections' records may be missing"
        );
    }
    flush(audit).await;
    Ok(())
}

/// Where the gateway is in its life; the workers watch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Serving,
    /// Stop accepting; live connections go on.
    Draining,
    /// Drop every live connection (each writes its record) and end.
    Cut,
}

/// What every worker shares.
struct Shared {
    ctx: Arc<Context>,
    limits: Arc<Limits>,
    /// Refusals at a limit being sent at once, at most [`REFUSING`].
    refusing: Arc<Semaphore>,
    /// How many connections each worker serves, to place new ones.
    workers: Arc<Workers>,
    /// Each worker's runtime, to hand a connection over to it.
    handles: Box<[tokio::runtime::Handle]>,
}

fn announce_verify(verify: VerifyDst) {
    if verify == VerifyDst::Off {
        tracing::warn!(
            "--verify-dst off: any client can send bytes to any address on the proxied ports by naming an allowed host (curl --resolve allowed.example:443:ANY-ADDRESS); use pin, the default"
        );
    }
}

/// Logs and exports the mode, and in monitor mode with an end, the switch
/// to enforce mode when it comes (connections check the time themselves).
fn announce_mode(mode: Mode, metrics: &Metrics) {
    let now = SystemTime::now();
    metrics.set_enforcing(mode.enforcing_at(now));
    match mode {
        Mode::Enforce => {}
        Mode::Monitor { until: None } => {
            tracing::warn!("monitor mode: nothing is refused for policy, with no end date");
        }
        Mode::Monitor { until: Some(end) } => match end.duration_since(now) {
            Err(_) => tracing::warn!("monitor-until is in the past: enforcing"),
            Ok(left) => {
                tracing::warn!(
                    until = %humantime::format_rfc3339_seconds(end),
                    "monitor mode: nothing is refused for policy until then"
                );
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(left).await;
                    metrics.set_enforcing(true);
                    tracing::warn!("monitor mode has ended: enforcing");
                });
            }
        },
    }
}

/// Writes out the audit records of the connections that have ended.
async fn flush(audit: AuditLog) {
    let flushed = tokio::task::spawn_blocking(move || audit.flush(AUDIT_FLUSH)).await;
    if !matches!(flushed, Ok(true)) {
        tracing::warn!("audit log not flushed within {AUDIT_FLUSH:?}");
    }
}

/// Every listener, bound once per worker: `[worker][listener]`.
fn bind_all(
    config: &Config,
    workers: usize,
) -> Result<Vec<Vec<(StdListener, Proto)>>, ServerError> {
    let mut bound: Vec<Vec<_>> = (0..workers).map(|_| Vec::new()).collect();
    let addrs = config.tls_listen.iter().map(|a| (*a, Proto::Tls));
    for (addr, proto) in addrs.chain(config.http_listen.iter().map(|a| (*a, Proto::Http))) {
        match listener::bind_group(addr, workers) {
            Ok(Some(group)) => {
                tracing::info!(%addr, proto = proto.as_str(), workers, "listening");
                for (worker, l) in group.into_iter().enumerate() {
                    bound[worker].push((l, proto));
                }
            }
            Ok(None) => tracing::warn!(%addr, "this host has no IPv6; not listening there"),
            Err(source) => return Err(ServerError::Bind { addr, source }),
        }
    }
    if bound[0].is_empty() {
        return Err(ServerError::NoListener);
    }
    Ok(bound)
}

/// How many connection workers: one per CPU this process may use.
fn worker_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Starts one connection worker: a thread with a single-threaded runtime
/// that accepts on its own listeners and serves connections to the end.
/// A connection stays on the worker the kernel gave it to (SO_REUSEPORT
/// spreads them), unless that worker serves clearly more than another
/// ([`crate::balance`]): it is handed over once, when accepted, and never
/// moves again, so there is no work stealing and no wake-up across
/// threads on the data path. The listeners close when draining begins;
/// connections are served until they end or the cut, when the runtime is
/// dropped with them and the worker says so on `ended`.
fn spawn_worker(
    worker: usize,
    runtime: tokio::runtime::Runtime,
    listeners: Vec<(StdListener, Proto)>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<Phase>,
    ended: std::sync::mpsc::Sender<()>,
) -> io::Result<()> {
    let listeners = {
        let _entered = runtime.enter();
        listeners
            .into_iter()
            .map(|(l, proto)| Ok((TcpListener::from_std(l)?, proto)))
            .collect::<io::Result<Vec<_>>>()?
    };
    std::thread::Builder::new()
        .name(format!("portcullis-worker-{worker}"))
        .spawn(move || {
            runtime.block_on(async move {
                for (listener, proto) in listeners {
                    let stop = stop.clone();
                    tokio::spawn(accept_loop(worker, listener, proto, shared.clone(), stop));
                }
                tokio::spawn(keep_a_timer_near());
                let _ = stop.wait_for(|phase| *phase == Phase::Cut).await;
            });
            // Every task still here is a live connection: dropping it
            // writes its record (see `proxy::serve`).
            drop(runtime);
            let _ = ended.send(());
        })?;
    Ok(())
}

/// How often a worker's own timer fires; see [`keep_a_timer_near`].
/// Shorter than the per-connection timeouts (seconds, by default).
const NEAR_TIMER: Duration = Duration::from_millis(500);

/// Keeps a timer at most [`NEAR_TIMER`] away in the worker's timer wheel.
///
/// tokio's timer driver wakes its own thread (an eventfd write, and an
/// epoll_wait that returns at once) whenever a timer is set earlier than
/// the earliest one it went to sleep on. A connection's hello and connect
/// timeouts are set while its worker is running, not sleeping, so that
/// wake-up is wasted; measured at 0.15 to 0.3 a connection under the
/// connection-rate workload, where the earliest timer was often a flow's
/// idle timeout minutes away. With this timer in the wheel, every
/// connection timer is later than the earliest, and sets no wake-up. It
/// costs two wake-ups a second per idle worker.
async fn keep_a_timer_near() {
    let mut tick = tokio::time::interval(NEAR_TIMER);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

async fn accept_loop(
    worker: usize,
    listener: TcpListener,
    proto: Proto,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<Phase>,
) {
    let mut refused = Throttled::default();
    let mut accept_errors = Throttled::default();
    // One wait for the stop signal across every accept, rather than a
    // new one registered and dropped per connection.
    let stopped = stop.wait_for(|phase| *phase != Phase::Serving);
    tokio::pin!(stopped);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = &mut stopped => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let slot = match shared.limits.try_admit(peer.ip()) {
                    Ok(slot) => slot,
                    Err(full) => {
                        // Refused at once rather than left queued; live
                        // connections are unaffected.
                        shared.ctx.metrics.limit_rejection(full);
                        refused.warn(|| match full {
                            Full::Total => {
                                "connection limit reached; refusing new connections".to_string()
                            }
                            Full::Source => format!(
                                "client {} holds its --max-connections-per-source; refusing its new connections",
                                peer.ip()
                            ),
                        });
                        refuse_full(stream, proto, full, &shared.refusing);
                        continue;
                    }
                };
                let place = shared.workers.place(worker);
                if place.worker() == worker {
                    let ctx = shared.ctx.clone();
                    tokio::spawn(serve_placed(stream, peer, proto, ctx, slot, place));
                } else {
                    hand_over(stream, peer, proto, &shared, slot, place);
                }
            }
            Err(e) => {
                shared.ctx.metrics.accept_error();
                accept_errors.warn(|| format!("accept failed: {e}"));
                if is_resource_shortage(&e) {
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    }
}

/// Serves a connection on the worker that holds its `place`, which it
/// keeps until it ends.
///
/// The connection's future is made and boxed here, before the task, so
/// the task holds a pointer and the place: tokio moves a task's future by
/// value several times as it spawns and finishes it, and a connection's
/// state is about 1 KiB to copy. Written out rather than as an async
/// block, which would keep room for the place twice.
fn serve_placed(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    proto: Proto,
    ctx: Arc<Context>,
    slot: crate::limit::Slot,
    place: Place,
) -> Placed<impl Future<Output = ()> + Send + 'static> {
    Placed {
        serving: Box::pin(proxy::serve(stream, peer, proto, ctx, slot)),
        _place: place,
    }
}

/// A connection's future and its place on its worker, given back when the
/// future is dropped: when it ends, or at the cut.
struct Placed<F> {
    serving: std::pin::Pin<Box<F>>,
    _place: Place,
}

impl<F: Future> Future for Placed<F> {
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        self.get_mut().serving.as_mut().poll(cx)
    }
}

/// Serves a connection accepted here on the worker that holds its
/// `place`: the socket leaves this worker's event loop for that one's,
/// and its task is spawned there. A socket that cannot move is closed and
/// counted as an accept error, as one that tokio fails to register at
/// accept is.
fn hand_over(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    proto: Proto,
    shared: &Shared,
    slot: crate::limit::Slot,
    place: Place,
) {
    let there = &shared.handles[place.worker()];
    let moved = stream.into_std().and_then(|stream| {
        // Registered with the other worker's event loop from this thread,
        // which tokio allows.
        let _there = there.enter();
        tokio::net::TcpStream::from_std(stream)
    });
    match moved {
        Ok(stream) => {
            let ctx = shared.ctx.clone();
            there.spawn(serve_placed(stream, peer, proto, ctx, slot, place));
        }
        Err(e) => {
            shared.ctx.metrics.accept_error();
            tracing::warn!("cannot hand a connection over to another worker: {e}");
        }
    }
}

/// Tells a connection refused at a limit why, if a refusal slot is free;
/// otherwise resets it.
fn refuse_full(stream: tokio::net::TcpStream, proto: Proto, full: Full, refusing: &Arc<Semaphore>) {
    match refusing.clone().try_acquire_owned() {
        Ok(permit) => {
            tokio::spawn(async move {
                proxy::refuse_full(&stream, proto, full).await;
                drop(permit);
            });
        }
        Err(_) => proxy::reset(&stream),
    }
}

fn is_resource_shortage(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Logs a repeated event at most once per [`WARN_EVERY`], with a count.
#[derive(Default)]
struct Throttled {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttled {
    /// `what` is only made when the warning is written: in a flood, most
    /// events are counted, not formatted.
    fn warn<T: std::fmt::Display>(&mut self, what: impl FnOnce() -> T) {
        let now = Instant::now();
        if self.last.is_some_and(|t| now - t < WARN_EVERY) {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(suppressed = self.suppressed, "{}", what());
        self.last = Some(now);
        self.suppressed = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::forward::tests::pair;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A connection's task lives as long as the connection: what it holds
    /// beside the boxed connection is the memory of every idle one.
    #[tokio::test]
    async fn a_placed_connections_task_holds_a_pointer_and_its_place() {
        let (_client, accepted) = pair().await;
        let peer = accepted.peer_addr().unwrap();
        let slot = Limits::new(10, 10).try_admit(peer.ip()).unwrap();
        let place = Workers::new(1).place(0);
        let ctx = Arc::new(Context::for_tests());
        let task = serve_placed(accepted, peer, Proto::Tls, ctx, slot, place);
        let size = std::mem::size_of_val(&task);
        assert!(size <= 24, "a placed connection's task takes {size} bytes");
    }

    /// A connection accepted by one worker and placed on another is served
    /// there to its end, holding its place on that worker meanwhile.
    #[test]
    fn a_connection_handed_over_is_served_by_the_other_worker() {
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        };
        let (here, there) = (runtime(), runtime());
        let shared = Arc::new(Shared {
            ctx: Arc::new(Context::for_tests()),
            limits: Limits::new(10, 10),
            refusing: Arc::new(Semaphore::new(1)),
            workers: Workers::new(2),
            handles: [here.handle().clone(), there.handle().clone()].into(),
        });
        // The other worker runs on a thread of its own until told to stop.
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let other = std::thread::spawn(move || there.block_on(stopped));

        here.block_on(async {
            let (mut client, accepted) = pair().await;
            let peer = accepted.peer_addr().unwrap();
            // Worker 0 serves one connection already, so the next place is
            // on worker 1.
            let busy = shared.workers.place(0);
            let place = shared.workers.place(0);
            assert_eq!(place.worker(), 1);
            drop(busy);
            let slot = shared.limits.try_admit(peer.ip()).unwrap();
            hand_over(accepted, peer, Proto::Tls, &shared, slot, place);

            // Not redirected, so refused as a loop: an alert comes back,
            // sent by the other worker.
            let mut alert = [0u8; 7];
            let read = tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut alert));
            read.await.expect("an answer in time").unwrap();
            assert_eq!(alert[0], 0x15, "a TLS alert record");
            assert_eq!(shared.workers.live(), vec![0, 1]);
            assert_eq!(shared.limits.live(), 1);
            // The refusal lingers until the client closes; then the
            // connection gives back its place and its slot.
            client.shutdown().await.unwrap();
            drop(client);
            let ended = async {
                while shared.workers.live() != vec![0, 0] || shared.limits.live() != 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            };
            tokio::time::timeout(Duration::from_secs(5), ended)
                .await
                .expect("the connection ends on the other worker");
        });
        stop.send(()).unwrap();
        other.join().unwrap().unwrap();
    }
}
