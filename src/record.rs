//! The facts of one connection, as values: what its audit lines and its
//! end-of-connection metrics are made from.
//!
//! A leaf: the proxy fills a [`Record`] in with [`Fact`]s as it learns
//! them and closes it with the [`Verdict`]; `audit` and `telemetry` only
//! read it. Facts are noted as they are learnt (not only at the end) so
//! that an interim record, or the record of a connection cut by shutdown,
//! says all that was known.

use crate::name::HostName;
use crate::net::forward::Transferred;
use crate::net::orig_dst::OrigDst;
use crate::policy::PolicyId;
use crate::verdict::{ErrorKind, Proto, Reason, Verdict};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The facts of one connection, reported when it ends (and, for a long
/// one, while it runs).
#[derive(Debug, Clone)]
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
    /// Everything the connection moved so far.
    pub moved: Transferred,
    /// What it had moved when the request this record describes began:
    /// the record's own bytes are `moved` less these.
    pub base: Transferred,
    /// HTTP: which request of the connection this record describes (from
    /// 1); 0 for TLS, and before a request head was read.
    pub request: u32,
    pub accepted: Instant,
    /// From accept until the hello or first request head was complete.
    pub hello: Option<Duration>,
    /// How long the upstream connect took, if it succeeded.
    pub connect: Option<Duration>,
    /// From accept until the verdict was final (a refusal's linger is not
    /// included).
    pub duration: Duration,
}

/// One thing learnt about a connection, in the order the ports learn them.
#[derive(Debug, Clone, PartialEq)]
pub enum Fact {
    /// The original destination; `None`: the connection was not redirected.
    Destination(Option<OrigDst>),
    /// The ClientHello or first request head is complete, `took` after
    /// accept.
    Hello { took: Duration, ech: bool },
    /// The name a hello or request asked for. A later HTTP request on the
    /// same connection is decided anew, so the rule goes with the name.
    Named(HostName),
    /// The name was admitted by `rule`; in monitor mode, `would_deny` is
    /// why enforce mode would have refused it (the first such is kept).
    Admitted {
        rule: Option<Arc<str>>,
        would_deny: Option<Reason>,
    },
    /// The upstream address about to be connected to.
    Upstream(SocketAddr),
    /// The upstream connect succeeded, `took` after it started.
    Connected { took: Duration },
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
            base: Transferred::default(),
            request: 0,
            accepted: Instant::now(),
            hello: None,
            connect: None,
            duration: Duration::ZERO,
        }
    }

    /// The one place a fact enters the record.
    pub fn note(&mut self, fact: Fact) {
        match fact {
            Fact::Destination(dst) => self.dst = dst,
            Fact::Hello { took, ech } => {
                self.hello = Some(took);
                self.ech = ech;
            }
            Fact::Named(name) => {
                self.name = Some(name);
                self.rule = None;
            }
            Fact::Admitted { rule, would_deny } => {
                self.rule = rule;
                if let Some(reason) = would_deny {
                    self.would_deny.get_or_insert(reason);
                }
            }
            Fact::Upstream(upstream) => self.upstream = Some(upstream),
            Fact::Connected { took } => self.connect = Some(took),
        }
    }

    /// The record as it stands `now`: `verdict`, and `moved` so far.
    pub fn close(&mut self, verdict: Verdict, moved: Transferred, now: Instant) {
        self.verdict = verdict;
        self.moved = moved;
        self.duration = now.saturating_duration_since(self.accepted);
    }

    /// HTTP: a request head was read, and the record describes it from
    /// now on, with the connection's bytes counted from `moved`. Its name,
    /// rule and monitor-mode reason are its own; where the connection
    /// goes (destination, upstream) is the connection's.
    pub fn next_request(&mut self, moved: Transferred) {
        self.request = self.request.saturating_add(1);
        self.base = moved;
        self.name = None;
        self.rule = None;
        self.would_deny = None;
    }

    /// The bytes of what this record describes: the whole connection, or
    /// on HTTP its request (head and body up, response down).
    pub fn own_bytes(&self) -> Transferred {
        Transferred {
            up: self.moved.up.saturating_sub(self.base.up),
            down: self.moved.down.saturating_sub(self.base.down),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record::new(
            "192.0.2.10:40000".parse().unwrap(),
            PolicyId::default(),
            Proto::Http,
        )
    }

    fn host(name: &str) -> HostName {
        HostName::from_wire(name.as_bytes()).unwrap()
    }

    #[test]
    fn a_later_request_is_decided_anew_so_its_name_clears_the_rule() {
        let mut rec = record();
        rec.note(Fact::Named(host("a.example")));
        rec.note(Fact::Admitted {
            rule: Some("a.example".into()),
            would_deny: None,
        });
        rec.note(Fact::Named(host("b.example")));
        assert_eq!(rec.name, Some(host("b.example")));
        assert_eq!(rec.rule, None);
    }

    #[test]
    fn each_request_of_a_connection_has_its_own_name_and_bytes() {
        let mut rec = record();
        rec.note(Fact::Upstream("203.0.113.5:80".parse().unwrap()));
        rec.next_request(Transferred::default());
        rec.note(Fact::Named(host("a.example")));
        rec.note(Fact::Admitted {
            rule: Some("a.example".into()),
            would_deny: Some(Reason::NotListed),
        });
        let after_first = Transferred {
            up: 1_048_650,
            down: 200,
        };
        rec.close(Verdict::Allow, after_first, rec.accepted);
        assert_eq!((rec.request, rec.own_bytes()), (1, after_first));
        rec.next_request(after_first);
        assert_eq!(rec.request, 2);
        assert_eq!((rec.name.as_ref(), rec.rule.as_ref()), (None, None));
        assert_eq!(rec.would_deny, None);
        assert!(rec.upstream.is_some(), "the connection's upstream stays");
        rec.note(Fact::Named(host("evil.example")));
        rec.close(Verdict::Deny(Reason::NotListed), after_first, rec.accepted);
        // The refused request carries none of the allowed one's bytes,
        // while the connection's total stays whole.
        assert_eq!(rec.own_bytes(), Transferred::default());
        assert_eq!(rec.moved, after_first);
    }

    #[test]
    fn monitor_mode_keeps_the_first_reason_enforce_mode_would_have_refused() {
        let mut rec = record();
        for would_deny in [None, Some(Reason::NotListed), Some(Reason::Spoofed), None] {
            rec.note(Fact::Admitted {
                rule: None,
                would_deny,
            });
        }
        assert_eq!(rec.would_deny, Some(Reason::NotListed));
    }

    #[test]
    fn closing_sets_the_verdict_the_bytes_and_the_duration_since_accept() {
        let mut rec = record();
        let moved = Transferred { up: 3, down: 5 };
        rec.close(
            Verdict::Allow,
            moved,
            rec.accepted + Duration::from_millis(40),
        );
        assert_eq!(rec.verdict, Verdict::Allow);
        assert_eq!((rec.moved.up, rec.moved.down), (3, 5));
        assert_eq!(rec.duration, Duration::from_millis(40));
    }

    #[test]
    fn hello_connect_and_upstream_are_noted_as_they_come() {
        let mut rec = record();
        let upstream: SocketAddr = "203.0.113.5:443".parse().unwrap();
        rec.note(Fact::Hello {
            took: Duration::from_millis(2),
            ech: true,
        });
        rec.note(Fact::Upstream(upstream));
        rec.note(Fact::Connected {
            took: Duration::from_millis(7),
        });
        assert_eq!(rec.hello, Some(Duration::from_millis(2)));
        assert!(rec.ech);
        assert_eq!(rec.upstream, Some(upstream));
        assert_eq!(rec.connect, Some(Duration::from_millis(7)));
    }
}
