//! The TLS port: read the ClientHello, decide on its SNI, then forward
//! the hello and everything after it untouched. No TLS is terminated.

use super::inbound::{Inbound, ReadError};
use super::{Ask, Context, Record, connect, refuse_with, reset};
use crate::detect::tls::{AlertDescription, ServerName, TlsError, fatal_alert, parse_client_hello};
use crate::name::NameError;
use crate::net::forward::{forward_both, write_all};
use crate::net::orig_dst::OrigDst;
use crate::verdict::{ErrorKind, Reason, Verdict};
use tokio::net::TcpStream;

pub(super) async fn serve(
    client: &TcpStream,
    dst: OrigDst,
    ctx: &Context,
    rec: &mut Record,
) -> Verdict {
    let limits = ctx.limits;
    let deadline = rec.accepted + limits.hello_timeout;
    let cap = limits.max_hello_bytes;
    let mut inbound = Inbound::new(client);
    let parse = |buf: &[u8]| parse_client_hello(buf, cap);
    let hello = match inbound
        .read_message(cap, deadline, parse, TlsError::TooLarge)
        .await
    {
        Ok(hello) => {
            rec.hello = Some(rec.accepted.elapsed());
            hello
        }
        Err(ReadError::Invalid(e)) => return deny(client, rec, reason_for(e)).await,
        Err(ReadError::Timeout) => return deny(client, rec, Reason::Timeout).await,
        Err(ReadError::Closed { .. }) => return Verdict::Error(ErrorKind::ClientClosed),
        Err(ReadError::Io) => return Verdict::Error(ErrorKind::Io),
    };
    rec.ech = hello.ech;
    let name = match hello.server_name {
        ServerName::Name(name) => Ok(rec.name.insert(name) as &_),
        ServerName::Absent => Err(Reason::NoName),
        ServerName::Invalid(NameError::IpLiteral) => Err(Reason::IpLiteral),
        ServerName::Invalid(_) => return deny(client, rec, Reason::Malformed).await,
    };
    let ask = Ask {
        policy: rec.policy,
        name,
        below_tls_floor: hello.max_version < limits.min_tls,
        dst,
        connected: None,
    };
    let admitted = match ctx.admit(ask).await {
        Ok(admitted) => admitted,
        Err(reason) => return deny(client, rec, reason).await,
    };
    rec.rule = admitted.rule;
    rec.would_deny = admitted.would_deny;
    let upstream = match connect(admitted.upstream, limits.connect_timeout, rec).await {
        Ok(upstream) => upstream,
        Err(kind) => {
            reset(client);
            return Verdict::Error(kind);
        }
    };
    if write_all(&upstream, inbound.buffered()).await.is_err() {
        return Verdict::Error(ErrorKind::Io);
    }
    // The hello is upstream now: free its buffer before a flow that may
    // last hours.
    let hello_len = inbound.buffered().len() as u64;
    drop(inbound);
    let (moved, result) = forward_both(client, &upstream, limits.idle_timeout).await;
    rec.moved = moved;
    rec.moved.up += hello_len;
    match result {
        Ok(()) => Verdict::Allow,
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Verdict::Error(ErrorKind::Idle),
        Err(_) => Verdict::Error(ErrorKind::Io),
    }
}

fn reason_for(e: TlsError) -> Reason {
    match e {
        TlsError::NotTls => Reason::NotTls,
        TlsError::Malformed => Reason::Malformed,
        TlsError::TooLarge => Reason::TooLarge,
    }
}

async fn deny(client: &TcpStream, rec: &mut Record, reason: Reason) -> Verdict {
    rec.refused = refuse(client, reason).await;
    Verdict::Deny(reason)
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
