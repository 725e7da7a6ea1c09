//! The HTTP port: every request on the connection is checked, not only
//! the first, so a kept-alive connection to an allowed host cannot carry a
//! request for a denied one (shared CDN addresses serve many hosts).
//!
//! Two loops run per connection. The request loop parses each request head,
//! decides, and forwards the head and its body. The response loop frames
//! each response so it knows when all answers are out (a refusal is only
//! written then, never into the middle of a response) and whether an
//! upgrade really happened: only a `101` to an upgrade request switches the
//! connection to plain forwarding.

use super::inbound::{Inbound, ReadError};
use super::{Admitted, Ask, Conn, Context, NotConnected, Outcome, connect, refuse_with};
use crate::config::Limits;
use crate::detect::Detect;
use crate::detect::http::{
    BodyLength, HttpError, RequestHead, parse_request_head, parse_response_head, without_h2c,
};
use crate::name::{HostName, NameError};
use crate::net::forward::{Activity, shutdown_write};
use crate::net::orig_dst::OrigDst;
use crate::record::Fact;
use crate::verdict::{ErrorKind, Reason, Verdict};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

/// Requests forwarded and not yet answered, at most.
const PIPELINE_DEPTH: usize = 32;
/// Cap on a response head (servers send larger heads than clients).
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// A refusal: why, and the status the client gets.
struct Refusal {
    reason: Reason,
    status: u16,
}

/// What reading one request head came to.
enum NextRequest {
    Head(RequestHead),
    /// The client closed cleanly before sending a byte of it.
    Closed,
    /// Refuse it: the client is told why.
    Refuse(Refusal),
    /// Give up: there is nothing to tell the client.
    Fail(ErrorKind),
}

pub(super) async fn serve(client: &TcpStream, dst: OrigDst, ctx: &Context, conn: &Conn) -> Outcome {
    let limits = ctx.limits;
    let mut from_client = Inbound::new(client);
    let accepted = conn.accepted();
    let deadline = accepted + limits.hello_timeout;
    let first = match read_request(&mut from_client, limits, deadline).await {
        NextRequest::Head(head) => head,
        NextRequest::Closed => return Verdict::Error(ErrorKind::ClientClosed).into(),
        NextRequest::Fail(kind) => return Verdict::Error(kind).into(),
        NextRequest::Refuse(refusal) => return deny(client, refusal, None).await,
    };
    conn.learn(Fact::Hello {
        took: accepted.elapsed(),
        ech: false,
    });
    conn.begin_request(ctx);
    // Named before the decision: a record written during a slow lookup
    // (an interim one, or at shutdown) says what is being decided.
    conn.learn(Fact::Named(first.host.clone()));
    let upstream_addr = match admit(ctx, &first, conn, dst, None).await {
        Ok(admitted) => admitted_as(conn, admitted),
        Err(refusal) => return deny(client, refusal, Some(&first.host)).await,
    };
    let upstream = match connect(upstream_addr, ctx, conn).await {
        Ok(upstream) => upstream,
        Err(NotConnected::Gateway) => {
            let refusal = Refusal {
                reason: Reason::ForbiddenDst,
                status: 403,
            };
            return deny(client, refusal, Some(&first.host)).await;
        }
        Err(NotConnected::Failed(kind)) => {
            let status = if kind == ErrorKind::ConnectTimeout {
                504
            } else {
                502
            };
            let refusal =
                error_response(status, Some(&first.host), "the server could not be reached");
            let sent = refuse_with(client, &refusal).await;
            return Outcome::failed_and_told(kind, sent);
        }
    };

    let activity = Activity::default();
    let (pending_tx, pending_rx) = mpsc::channel(PIPELINE_DEPTH);
    let (answered_tx, answered_rx) = watch::channel(0u64);
    let link = Connection {
        client,
        upstream: &upstream,
        upstream_addr,
        dst,
        activity: &activity,
    };
    // Made inside the block: made outside and moved in, the two loops'
    // states would be stored twice in every connection's task.
    let work = std::pin::pin!(async {
        let requests = Requests {
            link: &link,
            from_client,
            ctx,
            conn,
            pending: pending_tx,
            answered: answered_rx,
            sent: 0,
        };
        let responses = Responses {
            link: &link,
            from_upstream: Inbound::new(link.upstream),
            pending: pending_rx,
            answered: answered_tx,
            down: &conn.moved.down,
        };
        let requests = requests.run(first);
        let responses = responses.run();
        tokio::pin!(requests, responses);
        tokio::select! {
            outcome = &mut requests => match (outcome, responses.await) {
                (outcome, Err(kind)) if outcome.verdict == Verdict::Allow => {
                    Verdict::Error(kind).into()
                }
                (outcome, _) => outcome,
            },
            // A broken upstream ends the connection; a clean close still
            // lets the request loop finish what it is doing.
            answered = &mut responses => match answered {
                Err(kind) => Verdict::Error(kind).into(),
                Ok(()) => requests.await,
            },
        }
    });
    match conn.supervised(work, &activity, ctx).await {
        Ok(outcome) => outcome,
        Err(expired) => Verdict::Error(expired.into()).into(),
    }
}

/// A request forwarded upstream whose response has not been framed yet.
struct Pending {
    is_head: bool,
    /// For an upgrade request: told whether the server switched protocols.
    upgrade: Option<oneshot::Sender<bool>>,
}

/// What both loops of one connection share.
struct Connection<'a> {
    client: &'a TcpStream,
    upstream: &'a TcpStream,
    /// Where `upstream` is connected: every later request must name a
    /// host with this address.
    upstream_addr: SocketAddr,
    dst: OrigDst,
    activity: &'a Activity,
}

/// The request loop: each request head read, decided and forwarded with
/// its body, and noted for the response loop.
struct Requests<'a> {
    link: &'a Connection<'a>,
    from_client: Inbound<'a>,
    ctx: &'a Context,
    conn: &'a Conn,
    /// Each forwarded request, for the response loop to frame.
    pending: mpsc::Sender<Pending>,
    /// How many responses the client has been sent.
    answered: watch::Receiver<u64>,
    /// How many requests went upstream.
    sent: u64,
}

impl Requests<'_> {
    async fn run(mut self, mut head: RequestHead) -> Outcome {
        let limits = self.ctx.limits;
        let link = self.link;
        let up = &self.conn.moved.up;
        loop {
            let (switched_tx, switched_rx) = match head.upgrade {
                true => Some(oneshot::channel()).unzip(),
                false => (None, None),
            };
            let note = Pending {
                is_head: head.is_head,
                upgrade: switched_tx,
            };
            if self.pending.send(note).await.is_err() {
                // The response side is gone: upstream closed.
                return Verdict::Allow.into();
            }
            self.sent += 1;
            if self.forward_request(&head).await.is_err() {
                return Verdict::Error(ErrorKind::Io).into();
            }
            self.from_client.release();
            if let Some(switched) = switched_rx
                && switched.await == Ok(true)
            {
                // Boxed, as every rare state here: the largest state of
                // the loop sizes every kept-alive connection.
                let rest = self
                    .from_client
                    .forward_rest(link.upstream, link.activity, up);
                return match Box::pin(rest).await {
                    Ok(()) => Verdict::Allow.into(),
                    Err(_) => Verdict::Error(ErrorKind::Io).into(),
                };
            }
            let next = match self.from_client.wait_for_data().await {
                Ok(false) => {
                    link.activity.one_side_closed();
                    let _ = shutdown_write(link.upstream);
                    return Verdict::Allow.into();
                }
                Ok(true) => {
                    let deadline = Instant::now() + limits.hello_timeout;
                    read_request(&mut self.from_client, limits, deadline).await
                }
                Err(_) => return Verdict::Error(ErrorKind::Io).into(),
            };
            // The record still describes the request before: it is
            // written as its own once this one is decided (and, for a
            // refusal, once that one's response is out), so that each
            // record's bytes are its own request's.
            let (refusal, host) = match next {
                NextRequest::Head(next) => {
                    let connected = Some(link.upstream_addr);
                    match admit(self.ctx, &next, self.conn, link.dst, connected).await {
                        Ok(admitted) => {
                            self.conn.begin_request(self.ctx);
                            self.conn.learn(Fact::Named(next.host.clone()));
                            admitted_as(self.conn, admitted);
                            head = next;
                            continue;
                        }
                        Err(refusal) => (refusal, Some(next.host)),
                    }
                }
                NextRequest::Closed => return Verdict::Error(ErrorKind::ClientClosed).into(),
                NextRequest::Fail(kind) => return Verdict::Error(kind).into(),
                NextRequest::Refuse(refusal) => (refusal, None),
            };
            // Let every earlier response reach the client first.
            let sent = self.sent;
            let _ = self.answered.wait_for(|n| *n >= sent).await;
            self.conn.begin_request(self.ctx);
            if let Some(host) = &host {
                self.conn.learn(Fact::Named(host.clone()));
            }
            let outcome = Box::pin(deny(link.client, refusal, host.as_ref())).await;
            let _ = socket2::SockRef::from(link.upstream).shutdown(std::net::Shutdown::Both);
            return outcome;
        }
    }

    async fn forward_request(&mut self, head: &RequestHead) -> std::io::Result<()> {
        let (link, up) = (self.link, &self.conn.moved.up);
        self.from_client
            .forward_buffered(head.len, link.upstream, up)
            .await?;
        link.activity.touch();
        let framed =
            forward_body(&mut self.from_client, head.body, link.upstream, link, up).await?;
        if !framed {
            // The parser frames every request; one "until close" would
            // leave nothing to check the next request against.
            return Err(std::io::Error::other("request body delimited by close"));
        }
        Ok(())
    }
}

/// The response loop: each response framed and forwarded, and counted so
/// that a refusal waits until every earlier answer is out.
struct Responses<'a> {
    link: &'a Connection<'a>,
    from_upstream: Inbound<'a>,
    pending: mpsc::Receiver<Pending>,
    answered: watch::Sender<u64>,
    down: &'a AtomicU64,
}

impl Responses<'_> {
    async fn run(mut self) -> Result<(), ErrorKind> {
        let link = self.link;
        let mut current: Option<Pending> = None;
        let mut count = 0u64;
        let io = |_| ErrorKind::Io;
        loop {
            match self.from_upstream.wait_for_data().await {
                Ok(true) => {}
                Ok(false) => {
                    link.activity.one_side_closed();
                    let _ = shutdown_write(link.client);
                    return Ok(());
                }
                Err(_) => return Err(ErrorKind::Io),
            }
            if current.is_none() {
                // The request loop notes a request before forwarding it, so
                // a response with nothing noted is unsolicited (e.g. a 408).
                current = self.pending.try_recv().ok();
            }
            let is_head = current.as_ref().is_some_and(|p| p.is_head);
            let parse = |buf: &[u8]| parse_response_head(buf, MAX_RESPONSE_HEAD, is_head);
            let far = Instant::now() + std::time::Duration::from_secs(24 * 3600);
            let head = match self
                .from_upstream
                .read_message(MAX_RESPONSE_HEAD, far, parse, HttpError::TooLarge)
                .await
            {
                Ok(head) => head,
                Err(ReadError::Io) => return Err(ErrorKind::Io),
                Err(_) => return Err(ErrorKind::UpstreamProtocol),
            };
            self.from_upstream
                .forward_buffered(head.len, link.client, self.down)
                .await
                .map_err(io)?;
            link.activity.touch();
            if head.is_interim() {
                continue;
            }
            let upgrade = current.take().and_then(|p| p.upgrade);
            if head.status == 101 && upgrade.is_none() {
                return Err(ErrorKind::UpstreamProtocol);
            }
            if let Some(upgrade) = upgrade {
                let _ = upgrade.send(head.status == 101);
            }
            let framed = head.status != 101
                && forward_body(
                    &mut self.from_upstream,
                    head.body,
                    link.client,
                    link,
                    self.down,
                )
                .await
                .map_err(io)?;
            if !framed {
                // Switched protocols, or a body that runs until close:
                // everything else the server sends goes to the client.
                let rest = self
                    .from_upstream
                    .forward_rest(link.client, link.activity, self.down);
                return Box::pin(rest).await.map_err(io);
            }
            self.from_upstream.release();
            count += 1;
            self.answered.send_replace(count);
        }
    }
}

/// Forwards one message body, framed as its head says, for requests and
/// responses alike; `false` for a body that runs until the stream closes,
/// which the caller forwards with [`Inbound::forward_rest`].
async fn forward_body(
    from: &mut Inbound<'_>,
    body: BodyLength,
    to: &TcpStream,
    link: &Connection<'_>,
    count: &AtomicU64,
) -> std::io::Result<bool> {
    match body {
        BodyLength::Exact(n) => from.forward_exact(n, to, link.activity, count).await?,
        BodyLength::Chunked => from.forward_chunked(to, link.activity, count).await?,
        BodyLength::UntilClose => return Ok(false),
    }
    Ok(true)
}

/// Reads one request head; one offering `Upgrade: h2c` comes back with
/// that offer taken out.
async fn read_request(
    from_client: &mut Inbound<'_>,
    limits: Limits,
    deadline: Instant,
) -> NextRequest {
    let cap = limits.max_hello_bytes;
    let parse = |buf: &[u8]| parse_request_head(buf, cap);
    match from_client
        .read_message(cap, deadline, parse, HttpError::TooLarge)
        .await
    {
        Ok(head) if head.h2c => without_h2c_upgrade(from_client, &head, cap),
        Ok(head) => NextRequest::Head(head),
        Err(ReadError::Invalid(e)) => NextRequest::Refuse(refusal_for(e)),
        Err(ReadError::Timeout) => NextRequest::Refuse(Refusal {
            reason: Reason::Timeout,
            status: 408,
        }),
        Err(ReadError::Closed { partial: 0 }) => NextRequest::Closed,
        Err(ReadError::Closed { .. }) => NextRequest::Fail(ErrorKind::ClientClosed),
        Err(ReadError::Io) => NextRequest::Fail(ErrorKind::Io),
    }
}

/// Rewrites a buffered head that offers `Upgrade: h2c` so that the server
/// cannot switch the connection to HTTP/2, where later requests would pass
/// unchecked; the request itself goes on as HTTP/1.1.
fn without_h2c_upgrade(
    from_client: &mut Inbound<'_>,
    head: &RequestHead,
    cap: usize,
) -> NextRequest {
    let malformed = || NextRequest::Refuse(refusal_for(HttpError::Malformed));
    let Some(rewritten) = without_h2c(&from_client.buffered()[..head.len]) else {
        return malformed();
    };
    let Detect::Done(stripped) = parse_request_head(&rewritten, cap) else {
        return malformed();
    };
    from_client.replace_front(head.len, &rewritten);
    NextRequest::Head(stripped)
}

fn refusal_for(e: HttpError) -> Refusal {
    let (reason, status) = match e {
        HttpError::Malformed | HttpError::SeveralHosts | HttpError::BadFraming => {
            (Reason::Malformed, 400)
        }
        HttpError::BadHost(NameError::IpLiteral) => (Reason::IpLiteral, 403),
        HttpError::BadHost(_) => (Reason::Malformed, 400),
        HttpError::TooLarge => (Reason::TooLarge, 431),
        HttpError::NoHost => (Reason::NoName, 400),
        HttpError::HostMismatch => (Reason::HostMismatch, 400),
        HttpError::Connect => (Reason::Method, 403),
    };
    Refusal { reason, status }
}

/// Decides on a request's Host. `connected`: the upstream of a kept-alive
/// connection, which a later request must be for. Noting the request and
/// its outcome is the caller's: a later request's record begins only once
/// it is decided.
async fn admit(
    ctx: &Context,
    head: &RequestHead,
    conn: &Conn,
    dst: OrigDst,
    connected: Option<SocketAddr>,
) -> Result<Admitted, Refusal> {
    let ask = Ask {
        policy: conn.policy(),
        client: conn.client(),
        name: Ok(&head.host),
        below_tls_floor: false,
        dst,
        connected,
    };
    match ctx.admit(ask).await {
        Ok(admitted) => Ok(admitted),
        Err(reason) => Err(Refusal {
            reason,
            // Temporary: the client may retry once the gateway has a list
            // or its resolver answers.
            status: match reason {
                Reason::NoList | Reason::Unresolvable => 503,
                _ => 403,
            },
        }),
    }
}

/// Notes an admitted request's rule (and in monitor mode, why enforce
/// mode would have refused it); where it goes.
fn admitted_as(conn: &Conn, admitted: Admitted) -> SocketAddr {
    conn.learn(Fact::Admitted {
        rule: admitted.rule,
        would_deny: admitted.would_deny,
    });
    admitted.upstream
}

async fn deny(client: &TcpStream, refusal: Refusal, host: Option<&HostName>) -> Outcome {
    let reason = refusal.reason;
    let response = error_response(refusal.status, host, explain(reason));
    Outcome::refused(reason, refuse_with(client, &response).await)
}

/// Refuses a connection before any request was read (e.g. a loop);
/// whether the refusal was sent.
pub(super) async fn refuse(client: &TcpStream, reason: Reason) -> bool {
    refuse_with(client, &error_response(403, None, explain(reason))).await
}

/// The 503 for a connection refused at a connection limit.
pub(super) fn full(full: crate::limit::Full) -> Vec<u8> {
    let why = match full {
        crate::limit::Full::Total => "the gateway is serving as many connections as it may",
        crate::limit::Full::Source => "this client holds as many connections as it may",
    };
    error_response(503, None, why)
}

fn explain(reason: Reason) -> &'static str {
    match reason {
        Reason::NotListed => "the host is not on this gateway's allowlist",
        Reason::NoList => "this gateway has no allowlist loaded yet",
        Reason::NoName => "the request has no Host header",
        Reason::IpLiteral => "requests must name a host, not an IP address",
        Reason::Malformed => "the request could not be parsed",
        Reason::NotTls => "TLS was expected",
        Reason::TooLarge => "the request head is too large",
        Reason::Timeout => "the request head did not arrive in time",
        Reason::Loop => "the connection was addressed to the gateway itself",
        Reason::HostMismatch => "the request target and the Host header disagree",
        Reason::Method => "CONNECT is not allowed through this gateway",
        Reason::TlsVersion => "the TLS version is below this gateway's floor",
        Reason::Spoofed => "the host does not resolve to the server this connection goes to",
        Reason::Unresolvable => "the host could not be resolved",
        Reason::ForbiddenDst => "the destination is one this gateway never connects to",
    }
}

/// A complete response that closes the connection. The host named is a
/// validated name, so it cannot inject anything into the response.
fn error_response(status: u16, host: Option<&HostName>, why: &str) -> Vec<u8> {
    let phrase = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    };
    let body = match host {
        Some(host) => format!("portcullis: {host}: {why}\n"),
        None => format!("portcullis: {why}\n"),
    };
    format!(
        "HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_names_host_and_reason_and_closes() {
        let host = HostName::from_wire(b"denied.example").unwrap();
        let text = String::from_utf8(error_response(403, Some(&host), explain(Reason::NotListed)))
            .unwrap();
        assert!(text.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{text}");
        assert!(text.contains("Connection: close\r\n"));
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert_eq!(
            body,
            "portcullis: denied.example: the host is not on this gateway's allowlist\n"
        );
    }
}
