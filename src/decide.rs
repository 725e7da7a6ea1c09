//! The one decision both ports make, as a pure function of the facts of a
//! connection: admit it (by which rule, to which upstream) or refuse it
//! (why). The order of the checks, and the switch between enforce and
//! monitor mode, are written here only.
//!
//! 1. The destination (what the client dialled, or the upstream a kept-alive
//!    HTTP connection already has) is not one the gateway must never reach
//!    ([`Guard`]): refused in every mode, monitor included.
//! 2. A name, and not an IP address.
//! 3. TLS: the hello's version is not below `--min-tls`.
//! 4. The policy has a list, and the list allows the name.
//! 5. `--verify-dst`: `off` goes where the client dialled; `dns` only if
//!    that is one of the name's addresses; `pin` there if it is, and to
//!    one of the name's own addresses if not. A name that does not resolve
//!    is refused. This step asks for the name's addresses ([`Step::Resolve`]),
//!    so only a listed name is ever looked up.
//!
//! Refusals of steps 2–5 are policy: in monitor mode the connection goes on
//! to where the client dialled, noting what enforce mode would have done.

use crate::allowlist::{InForce, Rule};
use crate::config::VerifyDst;
use crate::dns::{Addresses, LookupError};
use crate::guard::{Guard, canonical};
use crate::name::HostName;
use crate::verdict::Reason;
use std::net::SocketAddr;
use std::time::Instant;

/// What is known of a connection (or of one HTTP request) when deciding.
pub struct Facts<'a> {
    /// The name asked for, or why there is none to decide on
    /// (`NoName`, `IpLiteral`).
    pub name: Result<&'a HostName, Reason>,
    /// TLS: the hello's highest version is below `--min-tls`.
    pub below_tls_floor: bool,
    /// The policy's list in force; `None` while it has none.
    pub list: Option<&'a InForce>,
    /// The client's original destination.
    pub dst: SocketAddr,
    /// A later request on a kept-alive HTTP connection: the upstream it is
    /// connected to, which it cannot change.
    pub connected: Option<SocketAddr>,
    pub verify: VerifyDst,
    /// Policy refusals are carried out (enforce mode, or monitor mode
    /// past its end).
    pub enforcing: bool,
    /// The name's addresses, once [`Step::Resolve`] asked for them.
    pub addresses: Option<Result<&'a Addresses, LookupError>>,
    pub guard: &'a Guard,
    pub now: Instant,
    /// Chooses among equally good addresses to pin to (any number; a
    /// random one spreads clients over a name's servers).
    pub pick: usize,
}

/// What [`decide`] needs next.
#[derive(Debug)]
pub enum Step {
    /// Decided.
    Done(Decision),
    /// The name's addresses: look them up and decide again with them.
    Resolve,
}

#[derive(Debug)]
pub enum Decision {
    Admit(Admission),
    Refuse(Reason),
}

#[derive(Debug)]
pub struct Admission {
    /// Where to connect (or, for a later HTTP request, the upstream kept).
    pub upstream: SocketAddr,
    /// The list entry that admitted it; `None` when it goes on only
    /// because monitor mode does not refuse. Not yet counted as a hit.
    pub rule: Option<Rule>,
    /// Monitor mode: what enforce mode would have refused it for.
    pub would_deny: Option<Reason>,
}

/// Decides, or asks for the name's addresses first.
pub fn decide(f: &Facts<'_>) -> Step {
    let target = f.connected.unwrap_or(f.dst);
    let forbidden = |addr: SocketAddr| f.guard.check(addr.ip()).is_some();
    if forbidden(f.dst) || f.connected.is_some_and(forbidden) {
        return Step::Done(Decision::Refuse(Reason::ForbiddenDst));
    }
    let decision = match check(f, target) {
        Checked::Resolve => return Step::Resolve,
        Checked::Admit { upstream, rule } => Decision::Admit(Admission {
            upstream,
            rule: Some(rule.clone()),
            would_deny: None,
        }),
        Checked::Refuse(Reason::ForbiddenDst) => Decision::Refuse(Reason::ForbiddenDst),
        Checked::Refuse(reason) if f.enforcing => Decision::Refuse(reason),
        Checked::Refuse(reason) => Decision::Admit(Admission {
            upstream: target,
            rule: None,
            would_deny: Some(reason),
        }),
    };
    Step::Done(decision)
}

enum Checked<'a> {
    Admit {
        upstream: SocketAddr,
        rule: &'a Rule,
    },
    Refuse(Reason),
    Resolve,
}

/// Steps 2 to 5, as enforce mode sees them.
fn check<'a>(f: &Facts<'a>, target: SocketAddr) -> Checked<'a> {
    let name = match f.name {
        Ok(name) => name,
        Err(reason) => return Checked::Refuse(reason),
    };
    if f.below_tls_floor {
        return Checked::Refuse(Reason::TlsVersion);
    }
    let Some(list) = f.list else {
        return Checked::Refuse(Reason::NoList);
    };
    let Some(rule) = list.rule_for(name.as_str()) else {
        return Checked::Refuse(Reason::NotListed);
    };
    if f.verify == VerifyDst::Off {
        return Checked::Admit {
            upstream: target,
            rule,
        };
    }
    let addresses = match f.addresses {
        None => return Checked::Resolve,
        Some(Err(_)) => return Checked::Refuse(Reason::Unresolvable),
        Some(Ok(addresses)) => addresses,
    };
    if addresses.contains(canonical(target.ip()), f.now) {
        return Checked::Admit {
            upstream: target,
            rule,
        };
    }
    // `dns` refuses a mismatch, and a connected upstream cannot be moved.
    if f.verify == VerifyDst::Dns || f.connected.is_some() {
        return Checked::Refuse(Reason::Spoofed);
    }
    match pin_to(addresses, f.dst, f.guard, f.pick) {
        Some(upstream) => Checked::Admit { upstream, rule },
        // Every address of the name is one never to be reached.
        None => Checked::Refuse(Reason::ForbiddenDst),
    }
}

/// One of the name's current addresses, on the client's port, of the
/// client's address family if it has one.
fn pin_to(
    addresses: &Addresses,
    dst: SocketAddr,
    guard: &Guard,
    pick: usize,
) -> Option<SocketAddr> {
    let usable = || {
        addresses
            .current()
            .iter()
            .filter(|ip| guard.check(**ip).is_none())
    };
    let same_family = usable().filter(|ip| ip.is_ipv4() == dst.is_ipv4()).count();
    let ip = if same_family > 0 {
        usable()
            .filter(|ip| ip.is_ipv4() == dst.is_ipv4())
            .nth(pick % same_family)
    } else {
        let all = usable().count();
        usable().nth(pick % all.max(1))
    }?;
    Some(SocketAddr::new(*ip, dst.port()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allowlist::Live;
    use std::net::IpAddr;
    use std::time::Duration;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    struct World {
        live: Live,
        guard: Guard,
        name: HostName,
        now: Instant,
    }

    impl World {
        fn new() -> World {
            let list = crate::allowlist::parse(".example.test\n").unwrap();
            World {
                live: Live::with(list),
                guard: Guard::with_addresses([ip("192.0.2.1"), ip("198.51.100.1")]),
                name: HostName::from_wire(b"www.example.test").unwrap(),
                now: Instant::now(),
            }
        }

        fn facts<'a>(&'a self, list: &'a InForce, verify: VerifyDst) -> Facts<'a> {
            Facts {
                name: Ok(&self.name),
                below_tls_floor: false,
                list: Some(list),
                dst: addr("203.0.113.20:443"),
                connected: None,
                verify,
                enforcing: true,
                addresses: None,
                guard: &self.guard,
                now: self.now,
                pick: 0,
            }
        }

        fn addresses(&self, ips: &[&str]) -> Addresses {
            Addresses::new(
                ips.iter().map(|s| ip(s)).collect(),
                Duration::from_secs(5),
                self.now,
                None,
            )
        }
    }

    fn done(step: Step) -> Decision {
        match step {
            Step::Done(d) => d,
            Step::Resolve => panic!("asked to resolve"),
        }
    }

    fn refused(step: Step) -> Reason {
        match done(step) {
            Decision::Refuse(r) => r,
            Decision::Admit(a) => panic!("admitted: {a:?}"),
        }
    }

    fn admitted(step: Step) -> Admission {
        match done(step) {
            Decision::Admit(a) => a,
            Decision::Refuse(r) => panic!("refused: {r}"),
        }
    }

    #[test]
    fn every_policy_reason_in_its_order() {
        let w = World::new();
        let list = w.live.current();
        let base = || w.facts(&list, VerifyDst::Pin);
        let f = Facts {
            name: Err(Reason::NoName),
            below_tls_floor: true,
            ..base()
        };
        assert_eq!(refused(decide(&f)), Reason::NoName);
        let f = Facts {
            name: Err(Reason::IpLiteral),
            ..base()
        };
        assert_eq!(refused(decide(&f)), Reason::IpLiteral);
        let f = Facts {
            below_tls_floor: true,
            list: None,
            ..base()
        };
        assert_eq!(refused(decide(&f)), Reason::TlsVersion);
        let f = Facts {
            list: None,
            ..base()
        };
        assert_eq!(refused(decide(&f)), Reason::NoList);
        let other = HostName::from_wire(b"denied.example").unwrap();
        let f = Facts {
            name: Ok(&other),
            ..base()
        };
        assert_eq!(refused(decide(&f)), Reason::NotListed);
        // Listed: only now is the name looked up.
        assert!(matches!(decide(&base()), Step::Resolve));
        let f = Facts {
            addresses: Some(Err(LookupError::NxDomain)),
            ..base()
        };
        assert_eq!(refused(decide(&f)), Reason::Unresolvable);
        let f = Facts {
            addresses: Some(Err(LookupError::Timeout)),
            ..base()
        };
        assert_eq!(refused(decide(&f)), Reason::Unresolvable);
    }

    #[test]
    fn forbidden_destinations_are_refused_first_and_in_every_mode() {
        let w = World::new();
        let list = w.live.current();
        for verify in [VerifyDst::Off, VerifyDst::Dns, VerifyDst::Pin] {
            for enforcing in [true, false] {
                for dst in [
                    "169.254.169.254:80",
                    "192.0.2.1:443",
                    "[::ffff:127.0.0.1]:443",
                ] {
                    let f = Facts {
                        dst: addr(dst),
                        enforcing,
                        name: Err(Reason::NoName),
                        ..w.facts(&list, verify)
                    };
                    assert_eq!(refused(decide(&f)), Reason::ForbiddenDst, "{dst}");
                }
            }
        }
        // A name whose only addresses are forbidden is never pinned to them.
        let a = w.addresses(&["127.0.0.1", "169.254.169.254", "198.51.100.1"]);
        let f = Facts {
            addresses: Some(Ok(&a)),
            ..w.facts(&list, VerifyDst::Pin)
        };
        assert_eq!(refused(decide(&f)), Reason::ForbiddenDst);
        let f = Facts {
            enforcing: false,
            ..f
        };
        assert_eq!(refused(decide(&f)), Reason::ForbiddenDst);
    }

    #[test]
    fn pin_keeps_a_real_destination_and_moves_a_spoofed_one() {
        let w = World::new();
        let list = w.live.current();
        let a = w.addresses(&["2001:db8:3::10", "203.0.113.10", "203.0.113.11"]);
        let with = |dst: &str, pick: usize| Facts {
            dst: addr(dst),
            addresses: Some(Ok(&a)),
            pick,
            ..w.facts(&list, VerifyDst::Pin)
        };
        let kept = admitted(decide(&with("203.0.113.11:443", 0)));
        assert_eq!(kept.upstream, addr("203.0.113.11:443"));
        assert_eq!(kept.rule.unwrap().text.as_ref(), ".example.test");
        // Spoofed: to one of the name's own addresses, same port and family.
        for pick in 0..4 {
            let moved = admitted(decide(&with("203.0.113.66:8443", pick)));
            assert!(
                [addr("203.0.113.10:8443"), addr("203.0.113.11:8443")].contains(&moved.upstream),
                "{moved:?}"
            );
            assert!(moved.would_deny.is_none());
        }
        let moved = admitted(decide(&with("[2001:db8:3::66]:443", 7)));
        assert_eq!(moved.upstream, addr("[2001:db8:3::10]:443"));
        // Only IPv6 addresses, an IPv4 client: the other family, not a refusal.
        let v6 = w.addresses(&["2001:db8:3::10"]);
        let f = Facts {
            addresses: Some(Ok(&v6)),
            ..w.facts(&list, VerifyDst::Pin)
        };
        assert_eq!(admitted(decide(&f)).upstream, addr("[2001:db8:3::10]:443"));
        // An address seen in an earlier answer still counts.
        let later = Addresses::new(
            vec![ip("203.0.113.12")],
            Duration::from_secs(5),
            w.now,
            Some(&a),
        );
        let f = Facts {
            dst: addr("203.0.113.10:443"),
            addresses: Some(Ok(&later)),
            ..w.facts(&list, VerifyDst::Pin)
        };
        assert_eq!(admitted(decide(&f)).upstream, addr("203.0.113.10:443"));
    }

    #[test]
    fn dns_refuses_a_mismatch_and_off_goes_where_the_client_dialled() {
        let w = World::new();
        let list = w.live.current();
        let a = w.addresses(&["203.0.113.10"]);
        let f = Facts {
            addresses: Some(Ok(&a)),
            ..w.facts(&list, VerifyDst::Dns)
        };
        assert_eq!(refused(decide(&f)), Reason::Spoofed);
        let f = Facts {
            dst: addr("203.0.113.10:443"),
            ..f
        };
        assert_eq!(admitted(decide(&f)).upstream, addr("203.0.113.10:443"));
        // off never asks for addresses.
        let off = admitted(decide(&w.facts(&list, VerifyDst::Off)));
        assert_eq!(off.upstream, addr("203.0.113.20:443"));
        assert!(off.rule.is_some());
    }

    #[test]
    fn a_later_http_request_must_name_a_host_of_the_connected_upstream() {
        let w = World::new();
        let list = w.live.current();
        let a = w.addresses(&["203.0.113.10"]);
        let f = Facts {
            dst: addr("203.0.113.66:80"),
            connected: Some(addr("203.0.113.10:80")),
            addresses: Some(Ok(&a)),
            ..w.facts(&list, VerifyDst::Pin)
        };
        assert_eq!(admitted(decide(&f)).upstream, addr("203.0.113.10:80"));
        let elsewhere = w.addresses(&["203.0.113.77"]);
        let f = Facts {
            addresses: Some(Ok(&elsewhere)),
            ..f
        };
        assert_eq!(refused(decide(&f)), Reason::Spoofed);
        let f = Facts {
            enforcing: false,
            ..f
        };
        let monitored = admitted(decide(&f));
        assert_eq!(monitored.upstream, addr("203.0.113.10:80"));
        assert_eq!(monitored.would_deny, Some(Reason::Spoofed));
    }

    #[test]
    fn monitor_mode_forwards_where_the_client_dialled_and_notes_why() {
        let w = World::new();
        let list = w.live.current();
        for (facts, reason) in [
            (
                Facts {
                    name: Err(Reason::IpLiteral),
                    ..w.facts(&list, VerifyDst::Pin)
                },
                Reason::IpLiteral,
            ),
            (
                Facts {
                    list: None,
                    ..w.facts(&list, VerifyDst::Pin)
                },
                Reason::NoList,
            ),
            (
                Facts {
                    addresses: Some(Err(LookupError::Failed)),
                    ..w.facts(&list, VerifyDst::Pin)
                },
                Reason::Unresolvable,
            ),
        ] {
            let f = Facts {
                enforcing: false,
                ..facts
            };
            let a = admitted(decide(&f));
            assert_eq!(a.upstream, addr("203.0.113.20:443"));
            assert_eq!(a.would_deny, Some(reason));
            assert!(a.rule.is_none(), "a forwarded refusal is no rule's hit");
        }
    }
}
