//! Moving bytes between two sockets.
//!
//! The fast path is splice(2): socket → pipe → socket, so payload never
//! enters user space. A direction starts out copying and moves to splice
//! once it carries bulk data. tokio tells us when a socket is ready;
//! splice runs non-blocking. The pipe is always drained completely before
//! the next wait on the socket, so an EAGAIN that tokio sees from the read
//! side can only mean the socket has nothing for us, never that the pipe
//! is full. Where splice is
//! unavailable (EINVAL on some socket types and kernels) a plain copy
//! takes over.

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// Requested pipe capacity: large enough that one splice moves a burst.
const PIPE_SIZE: usize = 1 << 20;
/// Buffer for the copy fallback.
const COPY_BUF: usize = 64 * 1024;
/// Reads up to this size are copied through user space (see [`forward`]).
const SMALL_READ: usize = 16 * 1024;

/// When either direction of a connection last moved a byte, and whether
/// one side has closed already.
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    one_side_closed: AtomicBool,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            one_side_closed: AtomicBool::new(false),
        }
    }
}

impl Activity {
    pub fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// One side has sent its FIN: from now on the flow is half closed.
    pub fn one_side_closed(&self) {
        self.one_side_closed.store(true, Ordering::Relaxed);
        self.touch();
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// When the flow expires unless something moves first.
    fn expiry(&self, clock: &FlowClock) -> Instant {
        let quiet = if self.one_side_closed.load(Ordering::Relaxed) {
            clock.half_closed.min(clock.idle)
        } else {
            clock.idle
        };
        self.last() + quiet
    }
}

/// The timers of a flow that is forwarding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowClock {
    /// Nothing moved either way for this long: the flow is closed.
    pub idle: Duration,
    /// Once one side has closed, nothing moved for this long: closed
    /// (HAProxy's `client-fin` / `server-fin`).
    pub half_closed: Duration,
    /// How often a long flow is reported while it runs; `None`: never.
    pub every: Option<Duration>,
}

/// Why [`supervise`] ended a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// Nothing moved for [`FlowClock::idle`].
    Idle,
    /// One side closed, then nothing moved for [`FlowClock::half_closed`].
    HalfClosed,
}

pin_project_lite::pin_project! {
    /// Drives a flow's forwarding to its end unless it expires by its
    /// clock, calling `tick` every [`FlowClock::every`] meanwhile; made by
    /// [`supervise`].
    ///
    /// One timer serves all three clocks. It is moved earlier only when
    /// the flow half closes or a tick is due, never for each byte: a busy
    /// flow's timer fires once per idle period, finds that bytes moved, and
    /// re-arms. Written out rather than as an `async fn`, and holding the
    /// flow by reference, because it is part of every connection's task.
    pub struct Supervised<'a, F, T> {
        work: Pin<&'a mut F>,
        activity: &'a Activity,
        clock: &'a FlowClock,
        next_tick: Option<Instant>,
        tick: T,
        #[pin]
        timer: Sleep,
    }
}

/// Supervises `work`, pinned by the caller, by `clock`.
pub fn supervise<'a, F: Future, T: FnMut()>(
    work: Pin<&'a mut F>,
    activity: &'a Activity,
    clock: &'a FlowClock,
    tick: T,
) -> Supervised<'a, F, T> {
    let next_tick = clock.every.map(|every| Instant::now() + every);
    Supervised {
        work,
        activity,
        clock,
        next_tick,
        tick,
        timer: tokio::time::sleep_until(due(activity, clock, next_tick)),
    }
}

/// When the supervisor must look next: the flow's expiry or its next tick.
fn due(activity: &Activity, clock: &FlowClock, next_tick: Option<Instant>) -> Instant {
    let expiry = activity.expiry(clock);
    next_tick.map_or(expiry, |t| t.min(expiry))
}

impl<F: Future, T: FnMut()> Future for Supervised<'_, F, T> {
    type Output = Result<F::Output, Expired>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Poll::Ready(out) = this.work.as_mut().poll(cx) {
            return Poll::Ready(Ok(out));
        }
        loop {
            let target = due(this.activity, this.clock, *this.next_tick);
            if target < this.timer.deadline() {
                this.timer.as_mut().reset(target);
            }
            if this.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = Instant::now();
            if let (Some(at), Some(every)) = (*this.next_tick, this.clock.every)
                && at <= now
            {
                (this.tick)();
                *this.next_tick = Some(now + every);
            }
            if this.activity.expiry(this.clock) <= now {
                let half = this.activity.one_side_closed.load(Ordering::Relaxed);
                return Poll::Ready(Err(if half {
                    Expired::HalfClosed
                } else {
                    Expired::Idle
                }));
            }
            // Bytes moved since the timer was set: wait for the new expiry.
            let next = due(this.activity, this.clock, *this.next_tick);
            this.timer.as_mut().reset(next);
        }
    }
}

/// Bytes moved so far each way, counted as they move.
#[derive(Debug, Default)]
pub struct Counters {
    /// Client → upstream.
    pub up: AtomicU64,
    /// Upstream → client.
    pub down: AtomicU64,
}

impl Counters {
    pub fn snapshot(&self) -> Transferred {
        Transferred {
            up: self.up.load(Ordering::Relaxed),
            down: self.down.load(Ordering::Relaxed),
        }
    }
}

/// Bytes moved each way.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    /// Client → upstream.
    pub up: u64,
    /// Upstream → client.
    pub down: u64,
}

/// Forwards both directions until both have ended, propagating each
/// half-close, or until either fails; made by [`forward_both`]. Run it
/// under [`supervise`] for its timeouts.
///
/// Written out rather than as an `async fn` (as [`Supervised`] is): it is
/// part of every connection's task for the connection's whole life, and
/// the two directions' generated states took 768 bytes where these two
/// [`Leg`]s take a few dozen.
pub struct ForwardBoth<'a> {
    client: &'a TcpStream,
    upstream: &'a TcpStream,
    activity: &'a Activity,
    moved: &'a Counters,
    up: Leg<'a>,
    down: Leg<'a>,
}

/// Forwards between `client` and `upstream`, counting into `moved`.
pub fn forward_both<'a>(
    client: &'a TcpStream,
    upstream: &'a TcpStream,
    activity: &'a Activity,
    moved: &'a Counters,
) -> ForwardBoth<'a> {
    ForwardBoth {
        client,
        upstream,
        activity,
        moved,
        up: Leg::default(),
        down: Leg::default(),
    }
}

impl Future for ForwardBoth<'_> {
    type Output = io::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let activity = this.activity;
        let legs = [
            (&mut this.up, this.client, this.upstream, &this.moved.up),
            (&mut this.down, this.upstream, this.client, &this.moved.down),
        ];
        let mut open = 0;
        let mut just_ended = None;
        for (leg, src, dst, count) in legs {
            if leg.is_ended() {
                continue;
            }
            match leg.poll(cx, src, dst, activity, count) {
                // An error in either direction ends both: the connection
                // is broken.
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => just_ended = Some(dst),
                Poll::Pending => open += 1,
            }
        }
        // A clean end of one direction leaves the other flowing: the
        // first to end passes its half-close on. When the second ends,
        // both sockets are about to be closed, and close sends that FIN
        // anyway: one system call fewer.
        if open == 0 {
            return Poll::Ready(Ok(()));
        }
        if let Some(dst) = just_ended {
            activity.one_side_closed();
            shutdown_write(dst)?;
        }
        Poll::Pending
    }
}

/// Forwards `src` → `dst` until `src` reaches end of stream, then shuts
/// down `dst`'s write side so the peer sees the half-close. Adds the bytes
/// moved to `count` as they move.
pub async fn forward(
    src: &TcpStream,
    dst: &TcpStream,
    activity: &Activity,
    count: &AtomicU64,
) -> io::Result<()> {
    let mut leg = Leg::default();
    std::future::poll_fn(|cx| leg.poll(cx, src, dst, activity, count)).await?;
    activity.one_side_closed();
    shutdown_write(dst)
}

/// Where one direction of a flow stands.
///
/// Small exchanges (a handshake, a request, a short answer) are copied:
/// a pipe costs four system calls to make and close, more than the copy
/// saves. The first read that fills a whole [`SMALL_READ`] shows a bulk
/// flow, which moves to splice for the rest of its life. An idle
/// connection therefore holds no pipe: two descriptors, not six.
#[derive(Default)]
enum Leg<'a> {
    /// Copying through the worker's scratch buffer: waiting for a read.
    #[default]
    Copying,
    /// The last read was `last` bytes, and `unsent` is what `dst` has not
    /// taken of it yet; they are counted once all are sent. `last_of_all`:
    /// `src` has nothing after them but its end of stream.
    Sending {
        unsent: Vec<u8>,
        last: usize,
        last_of_all: bool,
    },
    /// A bulk flow in its loop, boxed: its state is larger, and only a
    /// flow that carries bulk data pays for it.
    Bulk(Pin<Box<dyn Future<Output = io::Result<()>> + Send + 'a>>),
    /// `src` has reached end of stream.
    Ended,
}

impl<'a> Leg<'a> {
    fn is_ended(&self) -> bool {
        matches!(self, Leg::Ended)
    }

    /// Moves what can be moved now; ready once `src` has ended (and all
    /// of it is sent) or on an error.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        src: &'a TcpStream,
        dst: &'a TcpStream,
        activity: &'a Activity,
        count: &'a AtomicU64,
    ) -> Poll<io::Result<()>> {
        loop {
            match self {
                Leg::Ended => return Poll::Ready(Ok(())),
                Leg::Bulk(work) => {
                    let ended = std::task::ready!(work.as_mut().poll(cx));
                    *self = Leg::Ended;
                    return Poll::Ready(ended);
                }
                Leg::Sending {
                    unsent,
                    last,
                    last_of_all,
                } => {
                    if !unsent.is_empty() {
                        std::task::ready!(dst.poll_write_ready(cx))?;
                        match dst.try_write(unsent) {
                            Ok(n) => drop(unsent.drain(..n)),
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                            Err(e) => return Poll::Ready(Err(e)),
                        }
                        continue;
                    }
                    count.fetch_add(*last as u64, Ordering::Relaxed);
                    activity.touch();
                    *self = if *last_of_all {
                        Leg::Ended
                    } else if *last == SMALL_READ {
                        Leg::Bulk(Box::pin(bulk(src, dst, activity, count)))
                    } else {
                        Leg::Copying
                    };
                }
                Leg::Copying => {
                    std::task::ready!(src.poll_read_ready(cx))?;
                    // Asked before the read: see `fin_received`.
                    let fin = fin_received(src);
                    match relay_once(src, dst) {
                        Ok(Some((last, unsent))) => {
                            *self = Leg::Sending {
                                unsent,
                                last,
                                last_of_all: fin && last < SMALL_READ,
                            }
                        }
                        Ok(None) => *self = Leg::Ended,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
            }
        }
    }
}

/// A bulk flow's direction, to its end: splice, or a copy where splice
/// is unavailable.
async fn bulk(
    src: &TcpStream,
    dst: &TcpStream,
    activity: &Activity,
    count: &AtomicU64,
) -> io::Result<()> {
    let before = count.load(Ordering::Relaxed);
    let result = match Pipe::new() {
        Ok(pipe) => splice_loop(src, dst, &pipe, activity, count).await,
        // Out of descriptors for a pipe: still serve the connection.
        Err(_) => copy_loop(src, dst, activity, count).await,
    };
    match result {
        Err(e) if is_splice_unsupported(&e) && count.load(Ordering::Relaxed) == before => {
            copy_loop(src, dst, activity, count).await
        }
        other => other,
    }
}

/// The largest read through [`SCRATCH`].
pub const SCRATCH_SIZE: usize = 64 * 1024;

thread_local! {
    /// Where copied reads land first: one buffer per worker thread, zeroed
    /// once, not one per connection or per read.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; SCRATCH_SIZE]);
}

/// One read of at most `max` bytes appended to `buf`, without waiting
/// (see [`try_read_draining`]). Read through the worker's scratch buffer,
/// so that `buf` grows by what arrived only: a 500-byte hello costs 500
/// bytes, and no room is zeroed before each read.
pub fn try_read_append(src: &TcpStream, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
    SCRATCH.with_borrow_mut(|scratch| {
        let n = try_read_draining(src, &mut scratch[..max.min(SCRATCH_SIZE)])?;
        buf.extend_from_slice(&scratch[..n]);
        Ok(n)
    })
}

/// Whether `s`'s peer has sent its FIN, and nothing worse, by what tokio
/// last heard from epoll (EPOLLRDHUP without EPOLLHUP or EPOLLERR).
///
/// Asked before a read that then comes back short of its buffer, a yes
/// means that read took the last bytes: they all came before the FIN, and
/// a short read empties the socket. The read that would only say "end of
/// stream" is then left out, one system call a connection (the server's
/// answer and its FIN usually arrive together). Asked after the read, a
/// yes could be a FIN that came later, behind more bytes, so it is not.
/// A reset sets EPOLLHUP, so it is still read, and reported as the error
/// it is.
fn fin_received(s: &TcpStream) -> bool {
    let ready = std::pin::pin!(s.ready(Interest::READABLE | Interest::WRITABLE));
    // Polled once, never waited on: the caller has just seen the socket
    // readable, so the readiness is there to be read without a wait.
    match ready.poll(&mut Context::from_waker(std::task::Waker::noop())) {
        Poll::Ready(Ok(ready)) => ready.is_read_closed() && !ready.is_write_closed(),
        _ => false,
    }
}

/// One read from `src` and one write of it to `dst`, without waiting:
/// the bytes read and any the write did not take (to be sent once `dst`
/// can take them), or `None` at end of stream.
fn relay_once(src: &TcpStream, dst: &TcpStream) -> io::Result<Option<(usize, Vec<u8>)>> {
    SCRATCH.with_borrow_mut(|buf| {
        let n = try_read_draining(src, &mut buf[..SMALL_READ])?;
        if n == 0 {
            return Ok(None);
        }
        let sent = match dst.try_write(&buf[..n]) {
            Ok(sent) => sent,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        Ok(Some((n, buf[sent..n].to_vec())))
    })
}

fn is_splice_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
    )
}

/// Signals end of stream to the peer while keeping the read side open.
pub fn shutdown_write(stream: &TcpStream) -> io::Result<()> {
    match socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Write) {
        // The peer may already be gone; there is nothing left to tell it.
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        other => other,
    }
}

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // Best effort: the default 64 KiB works too, just with more calls.
        let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as libc::c_int));
        Ok(Pipe { read, write })
    }
}

async fn splice_loop(
    src: &TcpStream,
    dst: &TcpStream,
    pipe: &Pipe,
    activity: &Activity,
    count: &AtomicU64,
) -> io::Result<()> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        let filled = src
            .async_io(Interest::READABLE, || {
                splice(
                    src.as_fd(),
                    None,
                    pipe.write.as_fd(),
                    None,
                    PIPE_SIZE,
                    flags,
                )
                .map_err(io::Error::from)
            })
            .await?;
        if filled == 0 {
            return Ok(());
        }
        // A non-blocking splice returns after one pass over the socket's
        // queue, where a blocking one (the relay's) goes on with what
        // arrived meanwhile. Asking again at once does the same: a second
        // of the first's size half as often, for half the calls and wakes
        // per byte. Called directly, not through tokio: an EAGAIN here may
        // mean a full pipe rather than an empty socket, so it must not
        // clear the socket's readiness.
        let (mut filled, mut ended) = (filled, false);
        while filled < PIPE_SIZE {
            let room = PIPE_SIZE - filled;
            match splice(src.as_fd(), None, pipe.write.as_fd(), None, room, flags) {
                Ok(0) => {
                    ended = true;
                    break;
                }
                Ok(n) => filled += n,
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(e) => return Err(e.into()),
            }
        }
        let mut left = filled;
        while left > 0 {
            let sent = dst
                .async_io(Interest::WRITABLE, || {
                    splice(pipe.read.as_fd(), None, dst.as_fd(), None, left, flags)
                        .map_err(io::Error::from)
                })
                .await?;
            left -= sent;
            count.fetch_add(sent as u64, Ordering::Relaxed);
            activity.touch();
        }
        if ended {
            return Ok(());
        }
    }
}

async fn copy_loop(
    src: &TcpStream,
    dst: &TcpStream,
    activity: &Activity,
    count: &AtomicU64,
) -> io::Result<()> {
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        let n = read_some(src, &mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        write_all(dst, &buf[..n]).await?;
        count.fetch_add(n as u64, Ordering::Relaxed);
        activity.touch();
    }
}

/// Waits until `s` has something to read (or an error or end of stream).
///
/// Through the socket's own waker slot, not a `readable()` future: that
/// future holds a waiter node of about 150 bytes, and every wait on the
/// data path would add it to every connection's task, idle ones too. The
/// slot keeps one waker per direction, which is enough: a connection's
/// sockets are only ever waited on from that connection's one task.
pub async fn read_ready(s: &TcpStream) -> io::Result<()> {
    std::future::poll_fn(|cx| s.poll_read_ready(cx)).await
}

/// Waits until `s` can take bytes; see [`read_ready`].
pub async fn write_ready(s: &TcpStream) -> io::Result<()> {
    std::future::poll_fn(|cx| s.poll_write_ready(cx)).await
}

/// Reads at least one byte (0 at end of stream) through a shared reference,
/// so both directions can use one socket at once.
pub async fn read_some(src: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        read_ready(src).await?;
        match try_read_draining(src, buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

/// One read into `buf` without waiting (0 at end of stream; `WouldBlock`
/// when there is nothing to read). A read that returns less than `buf`
/// holds has emptied the socket, so tokio is told to forget its readiness
/// at once: the next wait goes straight to epoll instead of through a read
/// that fails with EAGAIN, one system call saved per wait. Data arriving
/// after the read marks the socket ready again (tokio compares readiness
/// ticks), so nothing is missed.
pub fn try_read_draining(src: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut read = None;
    let result = src.try_io(Interest::READABLE, || {
        let n = (&*socket2::SockRef::from(src)).read(buf)?;
        read = Some(n);
        if n > 0 && n < buf.len() {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(n)
        }
    });
    match result {
        Ok(n) => Ok(n),
        Err(e) => read.ok_or(e),
    }
}

/// Writes all of `buf` through a shared reference.
pub async fn write_all(dst: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        write_ready(dst).await?;
        match dst.try_write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Two ends of one loopback connection: (connecting, accepted).
    pub(crate) async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn forwards_both_ways_and_propagates_half_close() {
        // client <-> (c_far, c_near) proxy (u_near, u_far) <-> server
        let (mut client, proxy_client) = pair().await;
        let (proxy_upstream, mut server) = pair().await;
        let proxy = tokio::spawn(async move {
            let (activity, moved) = (Activity::default(), Counters::default());
            let result = forward_both(&proxy_client, &proxy_upstream, &activity, &moved).await;
            (moved.snapshot(), result)
        });
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        client.write_all(&payload).await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, payload, "upstream sees every byte, then end of stream");
        // The other direction still works after the client's half-close.
        server.write_all(b"reply after half-close").await.unwrap();
        server.shutdown().await.unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"reply after half-close");
        let (moved, result) = proxy.await.unwrap();
        result.unwrap();
        assert_eq!(
            moved,
            Transferred {
                up: payload.len() as u64,
                down: 22
            }
        );
    }

    #[tokio::test]
    async fn copy_fallback_moves_every_byte() {
        let (mut client, proxy_client) = pair().await;
        let (proxy_upstream, mut server) = pair().await;
        let payload: Vec<u8> = (0..500_000u32).map(|i| (i % 253) as u8).collect();
        let expected = payload.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&payload).await.unwrap();
            client.shutdown().await.unwrap();
        });
        let (activity, count) = (Activity::default(), AtomicU64::new(0));
        let copy = copy_loop(&proxy_client, &proxy_upstream, &activity, &count);
        let mut got = Vec::new();
        let read = async {
            let mut buf = vec![0u8; 65536];
            while got.len() < expected.len() {
                let n = server.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
            }
        };
        let (copied, ()) = tokio::join!(copy, read);
        copied.unwrap();
        writer.await.unwrap();
        assert_eq!(got, expected);
        assert_eq!(count.load(Ordering::Relaxed), expected.len() as u64);
    }

    /// Drives one direction until it ends (true) or turns to bulk (false).
    async fn copy_phase(src: &TcpStream, dst: &TcpStream, count: &AtomicU64) -> io::Result<bool> {
        let activity = Activity::default();
        let mut leg = Leg::default();
        std::future::poll_fn(|cx| match leg.poll(cx, src, dst, &activity, count) {
            Poll::Ready(ended) => Poll::Ready(ended.map(|()| true)),
            Poll::Pending if matches!(leg, Leg::Bulk(_)) => Poll::Ready(Ok(false)),
            Poll::Pending => Poll::Pending,
        })
        .await
    }

    #[tokio::test]
    async fn small_exchanges_are_copied_and_bulk_moves_to_splice() {
        let (mut client, proxy_client) = pair().await;
        let (proxy_upstream, mut server) = pair().await;
        let count = AtomicU64::new(0);
        client.write_all(b"a short request").await.unwrap();
        client.shutdown().await.unwrap();
        let ended = copy_phase(&proxy_client, &proxy_upstream, &count).await;
        assert!(ended.unwrap(), "a small exchange ends in the copy phase");
        let mut got = [0u8; 15];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"a short request");
        assert_eq!(count.load(Ordering::Relaxed), 15);

        let (mut client, proxy_client) = pair().await;
        client.write_all(&vec![7u8; 4 * SMALL_READ]).await.unwrap();
        let count = AtomicU64::new(0);
        let ended = copy_phase(&proxy_client, &proxy_upstream, &count).await;
        assert!(!ended.unwrap(), "a full read hands the flow to splice");
        assert!(count.load(Ordering::Relaxed) >= SMALL_READ as u64);
    }

    /// An answer and its FIN that arrive together end the direction with
    /// every byte moved and counted; the FIN is known from epoll's word
    /// (EPOLLRDHUP), and only a FIN, never a reset, counts as one.
    #[tokio::test]
    async fn an_answer_with_its_fin_ends_the_direction() {
        let (mut server, proxy_upstream) = pair().await;
        let (proxy_client, mut client) = pair().await;
        assert!(!fin_received(&proxy_upstream), "nothing has arrived");
        server.write_all(&[5u8; 1024]).await.unwrap();
        server.shutdown().await.unwrap();
        // Both in before the proxy looks, as the server's answer and its
        // FIN usually are.
        tokio::time::sleep(Duration::from_millis(50)).await;
        read_ready(&proxy_upstream).await.unwrap();
        assert!(fin_received(&proxy_upstream), "the FIN is known");
        let count = AtomicU64::new(0);
        let ended = copy_phase(&proxy_upstream, &proxy_client, &count).await;
        assert!(ended.unwrap(), "the direction has ended");
        assert_eq!(count.load(Ordering::Relaxed), 1024);
        let mut got = vec![0u8; 1024];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, vec![5u8; 1024]);

        // A reset after data is no FIN: the direction fails.
        let (mut server, proxy_upstream) = pair().await;
        server.write_all(&[6u8; 100]).await.unwrap();
        socket2::SockRef::from(&server)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(server);
        tokio::time::sleep(Duration::from_millis(50)).await;
        read_ready(&proxy_upstream).await.unwrap();
        assert!(!fin_received(&proxy_upstream), "a reset is not a FIN");
        let count = AtomicU64::new(0);
        let ended = copy_phase(&proxy_upstream, &proxy_client, &count).await;
        assert!(ended.is_err(), "a reset fails the direction: {ended:?}");
    }

    /// A copied read the destination cannot take at once is kept and sent
    /// when it can, and counted only then.
    #[tokio::test]
    async fn a_read_the_destination_cannot_take_waits_for_it() {
        let (mut client, proxy_client) = pair().await;
        let (proxy_upstream, mut server) = pair().await;
        // A tiny send buffer, and a server that reads nothing yet.
        socket2::SockRef::from(&proxy_upstream)
            .set_send_buffer_size(4096)
            .unwrap();
        let (activity, moved) = (Activity::default(), Counters::default());
        let flow = forward_both(&proxy_client, &proxy_upstream, &activity, &moved);
        let payload: Vec<u8> = (0..2_000_000u32).map(|i| (i % 241) as u8).collect();
        let expected = payload.clone();
        let writer = async move {
            for chunk in payload.chunks(1000) {
                client.write_all(chunk).await.unwrap();
            }
            client.shutdown().await.unwrap();
            client
        };
        let reader = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            got
        };
        let flow = async {
            let mut flow = std::pin::pin!(flow);
            // Ends only once the server closes its side too.
            tokio::select! {
                r = &mut flow => r.unwrap(),
                _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            }
        };
        let (client, got) = tokio::join!(writer, async {
            tokio::select! {
                got = reader => got,
                () = flow => panic!("the flow ended before the server read it all"),
            }
        });
        drop(client);
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "every byte, in order");
        assert_eq!(moved.snapshot().up, expected.len() as u64);
    }

    const CLOCK: FlowClock = FlowClock {
        idle: Duration::from_secs(60),
        half_closed: Duration::from_secs(60),
        every: None,
    };

    /// Forwards between the proxy's two sockets under `clock`: how the
    /// flow ended and what it moved.
    async fn supervised(
        client: &TcpStream,
        upstream: &TcpStream,
        clock: FlowClock,
        tick: impl FnMut(),
    ) -> (Result<io::Result<()>, Expired>, Transferred) {
        let (activity, moved) = (Activity::default(), Counters::default());
        let flow = std::pin::pin!(forward_both(client, upstream, &activity, &moved));
        let ended = supervise(flow, &activity, &clock, tick).await;
        (ended, moved.snapshot())
    }

    #[tokio::test]
    async fn closes_an_idle_flow() {
        let (_client, proxy_client) = pair().await;
        let (proxy_upstream, _server) = pair().await;
        let clock = FlowClock {
            idle: Duration::from_millis(100),
            ..CLOCK
        };
        let (ended, _) = supervised(&proxy_client, &proxy_upstream, clock, || {}).await;
        assert_eq!(ended.unwrap_err(), Expired::Idle);
    }

    #[tokio::test]
    async fn a_busy_flow_is_not_idle() {
        let (mut client, proxy_client) = pair().await;
        let (proxy_upstream, mut server) = pair().await;
        let clock = FlowClock {
            idle: Duration::from_millis(300),
            ..CLOCK
        };
        let talk = async {
            for _ in 0..10 {
                client.write_all(b"ping").await.unwrap();
                let mut got = [0u8; 4];
                server.read_exact(&mut got).await.unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            client.shutdown().await.unwrap();
            server.shutdown().await.unwrap();
        };
        let flow = supervised(&proxy_client, &proxy_upstream, clock, || {});
        let ((ended, moved), ()) = tokio::join!(flow, talk);
        ended
            .expect("a second of traffic outlives a 300 ms idle timeout")
            .unwrap();
        assert_eq!(moved.up, 40);
    }

    #[tokio::test]
    async fn a_half_closed_flow_gets_the_shorter_timeout() {
        let (client, proxy_client) = pair().await;
        let (proxy_upstream, _server) = pair().await;
        let clock = FlowClock {
            half_closed: Duration::from_millis(200),
            ..CLOCK
        };
        // The client sends its FIN; the server never answers or closes.
        drop(client);
        let start = Instant::now();
        let (ended, _) = supervised(&proxy_client, &proxy_upstream, clock, || {}).await;
        assert_eq!(ended.unwrap_err(), Expired::HalfClosed);
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn ticks_while_a_flow_runs() {
        let (_client, proxy_client) = pair().await;
        let (proxy_upstream, _server) = pair().await;
        let clock = FlowClock {
            idle: Duration::from_millis(1_000),
            every: Some(Duration::from_millis(150)),
            ..CLOCK
        };
        let mut ticks = 0;
        let (ended, _) = supervised(&proxy_client, &proxy_upstream, clock, || ticks += 1).await;
        assert_eq!(ended.unwrap_err(), Expired::Idle);
        // About six; a loaded machine may run a timer late, never early.
        assert!((3..=7).contains(&ticks), "{ticks} ticks in 1 s at 150 ms");
    }
}
