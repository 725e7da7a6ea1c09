//! The TLS port: read the ClientHello, decide on its SNI, then forward
//! the hello and everything after it untouched. No TLS is terminated.

use super::inbound::{Inbound, ReadError};
use super::{Ask, Conn, Context, NotConnected, Outcome, connect, refuse_with, reset};
use crate::detect::tls::{AlertDescription, ServerName, TlsError, fatal_alert, parse_client_hello};
use crate::name::NameError;
use crate::net::forward::{Activity, forward_both, write_all};
use crate::net::orig_dst::OrigDst;
use crate::record::Fact;
use crate::verdict::{ErrorKind, Reason, Verdict};
use std::sync::atomic::Ordering;
use tokio::net::TcpStream;

/// Forwards an admitted connection (see [`open_upstream`]) to its end.
pub(super) async fn forward(
    client: &TcpStream,
    upstream: TcpStream,
    ctx: &Context,
    conn: &Conn,
) -> Outcome {
    let activity = Activity::default();
    let flow = std::pin::pin!(forward_both(client, &upstream, &activity, &conn.moved));
    let verdict = match conn.supervised(flow, &activity, ctx).await {
        Ok(Ok(())) => Verdict::Allow,
        Ok(Err(_)) => Verdict::Error(ErrorKind::Io),
        Err(expired) => Verdict::Error(expired.into()),
    };
    verdict.into()
}

/// Reads the hello, decides, connects and sends the hello upstream: the
/// upstream connection, or how the connection ended.
pub(super) async fn open_upstream(
    client: &TcpStream,
    dst: OrigDst,
    ctx: &Context,
    conn: &Conn,
) -> Result<TcpStream, Outcome> {
    let limits = ctx.limits;
    let accepted = conn.accepted();
    let deadline = accepted + limits.hello_timeout;
    let cap = limits.max_hello_bytes;
    let mut inbound = Inbound::new(client);
    let parse = |buf: &[u8]| parse_client_hello(buf, cap);
    let hello = match inbound
        .read_message(cap, deadline, parse, TlsError::TooLarge)
        .await
    {
        Ok(hello) => hello,
        Err(ReadError::Invalid(e)) => return Err(deny(client, reason_for(e)).await),
        Err(ReadError::Timeout) => return Err(deny(client, Reason::Timeout).await),
        Err(ReadError::Closed { .. }) => return Err(Verdict::Error(ErrorKind::ClientClosed).into()),
        Err(ReadError::Io) => return Err(Verdict::Error(ErrorKind::Io).into()),
    };
    conn.learn(Fact::Hello {
        took: accepted.elapsed(),
        ech: hello.ech,
    });
    let name = match hello.server_name {
        ServerName::Name(name) => Ok(name),
        ServerName::Absent => Err(Reason::NoName),
        ServerName::Invalid(NameError::IpLiteral) => Err(Reason::IpLiteral),
        ServerName::Invalid(_) => return Err(deny(client, Reason::Malformed).await),
    };
    let ask = Ask {
        policy: conn.policy(),
        client: conn.client(),
        name: name.as_ref().map_err(|r| *r),
        below_tls_floor: hello.max_version < limits.min_tls,
        dst,
        connected: None,
    };
    let admitted = ctx.admit(ask).await;
    // Noted after the decision, which only borrows it: no copy per hello.
    if let Ok(name) = name {
        conn.learn(Fact::Named(name));
    }
    let admitted = match admitted {
        Ok(admitted) => admitted,
        Err(reason) => return Err(deny(client, reason).await),
    };
    conn.learn(Fact::Admitted {
        rule: admitted.rule,
        would_deny: admitted.would_deny,
    });
    let upstream = match connect(admitted.upstream, ctx, conn).await {
        Ok(upstream) => upstream,
        Err(NotConnected::Gateway) => return Err(deny(client, Reason::ForbiddenDst).await),
        Err(NotConnected::Failed(kind)) => {
            reset(client);
            return Err(Verdict::Error(kind).into());
        }
    };
    if write_all(&upstream, inbound.buffered()).await.is_err() {
        return Err(Verdict::Error(ErrorKind::Io).into());
    }
    let hello_len = inbound.buffered().len() as u64;
    conn.moved.up.fetch_add(hello_len, Ordering::Relaxed);
    // The hello is upstream now: its buffer goes with this function,
    // before a flow that may last hours.
    Ok(upstream)
}

fn reason_for(e: TlsError) -> Reason {
    match e {
        TlsError::NotTls => Reason::NotTls,
        TlsError::Malformed => Reason::Malformed,
        TlsError::TooLarge => Reason::TooLarge,
    }
}

async fn deny(client: &TcpStream, reason: Reason) -> Outcome {
    Outcome::refused(reason, refuse(client, reason).await)
}

/// Answers with a fatal alert that says why, as far as TLS can say it;
/// whether it was sent.
pub(super) async fn refuse(client: &TcpStream, reason: Reason) -> bool {
    let description = match reason {
        Reason::NotListed
        | Reason::NoList
        | Reason::NoName
        | Reason::IpLiteral
        | Reason::Loop
        | Reason::Method
        | Reason::Spoofed
        | Reason::Unresolvable
        | Reason::ForbiddenDst => AlertDescription::AccessDenied,
        Reason::Malformed | Reason::NotTls | Reason::TooLarge | Reason::HostMismatch => {
            AlertDescription::DecodeError
        }
        Reason::Timeout => AlertDescription::HandshakeFailure,
        Reason::TlsVersion => AlertDescription::ProtocolVersion,
    };
    refuse_with(client, &fatal_alert(description)).await
}
