//! Destination verification (`--verify-dst dns`): an allowed name is
//! forwarded only to an address that name resolves to, so a client cannot
//! send an allowed SNI to an address of its choosing (`curl --resolve
//! allowed.example:443:ATTACKER`).
//!
//! Names are resolved with the system's configuration (`/etc/resolv.conf`,
//! `/etc/hosts`). DNS round-robin hands different clients different
//! answers, so every address seen for a name counts until its answer's TTL
//! plus [`GRACE`] has passed: the union, not the latest answer. The table
//! of addresses is bounded ([`MAX_NAMES`]).

use crate::name::HostName;
use crate::verdict::Reason;
use hickory_resolver::config::{ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::{ResolveError, TokioResolver};
use std::cell::OnceCell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long an address stays valid for its name past its answer's TTL.
pub const GRACE: Duration = Duration::from_secs(60);
/// Names whose addresses are remembered, at most.
pub const MAX_NAMES: usize = 10_000;
/// How long one lookup may take; past it the connection is refused.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// The addresses seen for each name, each with when it stops counting.
#[derive(Debug, Default)]
pub struct SeenAddrs {
    names: HashMap<String, Vec<(IpAddr, Instant)>>,
}

impl SeenAddrs {
    /// Whether `ip` is a current address of `name`.
    pub fn contains(&self, name: &str, ip: IpAddr, now: Instant) -> bool {
        self.names
            .get(name)
            .is_some_and(|addrs| addrs.iter().any(|&(a, until)| a == ip && until > now))
    }

    /// Adds an answer: `ips` count for `name` until `until`.
    pub fn record(
        &mut self,
        name: &str,
        ips: impl IntoIterator<Item = IpAddr>,
        until: Instant,
        now: Instant,
    ) {
        if !self.names.contains_key(name) && self.names.len() >= MAX_NAMES {
            self.names
                .retain(|_, addrs| addrs.iter().any(|&(_, u)| u > now));
            if self.names.len() >= MAX_NAMES {
                // Still full of live answers: forget one; it is looked up
                // again when next needed.
                if let Some(victim) = self.names.keys().next().cloned() {
                    self.names.remove(&victim);
                }
            }
        }
        let addrs = self.names.entry(name.to_string()).or_default();
        addrs.retain(|&(_, u)| u > now);
        for ip in ips {
            match addrs.iter_mut().find(|(a, _)| *a == ip) {
                Some((_, u)) => *u = (*u).max(until),
                None => addrs.push((ip, until)),
            }
        }
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// Checks original destinations against DNS, shared by every worker.
pub struct Verifier {
    config: ResolverConfig,
    options: ResolverOpts,
    seen: Mutex<SeenAddrs>,
}

thread_local! {
    /// One resolver per worker thread: its sockets belong to that worker's
    /// runtime.
    static RESOLVER: OnceCell<TokioResolver> = const { OnceCell::new() };
}

impl Verifier {
    /// Reads the system's resolver configuration (an error if it cannot be
    /// read: verification cannot work without it).
    pub fn from_system() -> Result<Verifier, ResolveError> {
        let (config, options) = hickory_resolver::system_conf::read_system_conf()?;
        Ok(Verifier {
            config,
            options,
            seen: Mutex::new(SeenAddrs::default()),
        })
    }

    /// `Ok` if `dst` is an address `name` resolves to, looking it up when
    /// the table does not already say so; `Reason::Spoofed` if not, or if
    /// the name cannot be resolved in time.
    pub async fn verify(&self, name: &HostName, dst: IpAddr) -> Result<(), Reason> {
        let name = name.as_str();
        if self.seen().contains(name, dst, Instant::now()) {
            return Ok(());
        }
        // Fully qualified: the search domains of resolv.conf must not turn
        // a client's name into one of ours.
        let fqdn = format!("{name}.");
        let resolver = RESOLVER.with(|r| r.get_or_init(|| self.resolver()).clone());
        if let Ok(Ok(answer)) =
            tokio::time::timeout(LOOKUP_TIMEOUT, resolver.lookup_ip(fqdn.as_str())).await
        {
            let now = Instant::now();
            let until = answer.valid_until().max(now) + GRACE;
            self.seen().record(name, answer.iter(), until, now);
        }
        if self.seen().contains(name, dst, Instant::now()) {
            Ok(())
        } else {
            Err(Reason::Spoofed)
        }
    }

    fn resolver(&self) -> TokioResolver {
        TokioResolver::builder_with_config(self.config.clone(), TokioConnectionProvider::default())
            .with_options(self.options.clone())
            .build()
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, SeenAddrs> {
        // A panic while the lock was held leaves at worst some addresses
        // missing or expired ones kept: every state of the table is a
        // valid one, so it stays usable.
        self.seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn every_address_seen_counts_until_its_ttl_and_grace() {
        let t0 = Instant::now();
        let mut seen = SeenAddrs::default();
        // Round-robin: two answers, each with one address.
        seen.record(
            "a.example.test",
            [ip("192.0.2.1")],
            t0 + Duration::from_secs(30),
            t0,
        );
        seen.record(
            "a.example.test",
            [ip("192.0.2.2")],
            t0 + Duration::from_secs(60),
            t0,
        );
        assert!(seen.contains("a.example.test", ip("192.0.2.1"), t0));
        assert!(seen.contains("a.example.test", ip("192.0.2.2"), t0));
        assert!(!seen.contains("a.example.test", ip("198.51.100.7"), t0));
        assert!(!seen.contains("b.example.test", ip("192.0.2.1"), t0));
        let later = t0 + Duration::from_secs(45);
        assert!(!seen.contains("a.example.test", ip("192.0.2.1"), later));
        assert!(seen.contains("a.example.test", ip("192.0.2.2"), later));
    }

    #[test]
    fn the_table_is_bounded() {
        let t0 = Instant::now();
        let mut seen = SeenAddrs::default();
        for i in 0..MAX_NAMES + 500 {
            let until = t0 + Duration::from_secs(if i % 2 == 0 { 1 } else { 600 });
            let now = t0 + Duration::from_secs(u64::from(i >= MAX_NAMES) * 2);
            seen.record(&format!("n{i}.example.test"), [ip("192.0.2.1")], until, now);
            assert!(seen.len() <= MAX_NAMES);
        }
        // The expired half was dropped to make room, the live half kept.
        assert!(seen.contains("n1.example.test", ip("192.0.2.1"), t0));
        assert!(seen.contains(
            &format!("n{}.example.test", MAX_NAMES + 499),
            ip("192.0.2.1"),
            t0
        ));
    }
}
