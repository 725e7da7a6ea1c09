//! The gateway's own view of DNS, for `--verify-dst pin` and `dns`: the
//! addresses an admitted name really has.
//!
//! Done the way a production resolver client does it:
//! - A and AAAA are always both asked for, so a dual-stack name's IPv6
//!   clients are checked against its IPv6 addresses.
//! - One query in flight per name, however many connections wait on it
//!   (coalesced across workers).
//! - Answers are cached for their TTL ([`MIN_TTL`] at least) in a table
//!   bounded by its names ([`MAX_NAMES`]) and by the addresses they hold
//!   together ([`MAX_ADDRESSES`]), whose eviction is O(1) (oldest name
//!   first); every address a name was seen with counts until its TTL plus
//!   [`GRACE`]: DNS round-robin and CDN rotation hand clients other
//!   answers than ours, and the union is what a client may have been told.
//!   An answer keeps [`MAX_PER_FAMILY`] addresses of each family, so a
//!   name whose DNS answers with thousands costs no more than a CDN's.
//! - A name whose answer is three quarters through its TTL is refreshed in
//!   the background on its next use, so steady traffic never waits.
//! - Failures are cached briefly, in a table of their own, so repeated
//!   made-up names cannot hammer the resolver nor push real names out.
//!   Distinct made-up names under a wildcard entry each need a query, so
//!   new lookups are paced ([`LOOKUPS_PER_SECOND`], waiting within the
//!   lookup's bound rather than failing at once) and at most
//!   [`MAX_IN_FLIGHT`] run at once: a flood cannot spend the resolver's
//!   budget that every other name depends on. One client (an IPv4
//!   address, an IPv6 /64) may have at most [`SOURCE_SHARE`] lookups of
//!   its own in flight, so its flood of names that never answer holds a
//!   share of the resolver, never all of it. A client's first lookup in
//!   flight has queries ([`FIRST_RESERVED`]) and pace ([`PACE_RESERVED`])
//!   set aside that second and later ones cannot take, so however many
//!   clients flood, another client's new name waits for nothing but its
//!   own lookup.
//! - The resolver is the system's (`/etc/resolv.conf`, `/etc/hosts`): on
//!   AWS, the VPC resolver the clients use too.
//!
//! [`Cache`] is pure (time is passed in); [`Resolver`] does the I/O.

use crate::limit::Source;
use crate::name::HostName;
use crate::telemetry::Metrics;
// Closed sets, kept with the other label values in `verdict`.
pub use crate::verdict::{LookupError, LookupResult};
use hickory_resolver::config::{LookupIpStrategy, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::{ResolveError, TokioResolver};
use std::cell::OnceCell;
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, watch};

/// How long an address stays valid for its name past its answer's TTL.
pub const GRACE: Duration = Duration::from_secs(60);
/// Answers are kept at least this long, however short their TTL.
pub const MIN_TTL: Duration = Duration::from_secs(1);
/// And at most this long.
pub const MAX_TTL: Duration = Duration::from_secs(3600);
/// How long a name that does not exist (or has no address) stays so.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// How long a failed or timed-out lookup is not retried.
pub const FAILURE_TTL: Duration = Duration::from_secs(1);
/// Addresses kept of one answer, per family, in the resolver's order. Real
/// names answer with a handful: a CDN's edge two to eight, S3 one to
/// eight, Route 53's multivalue answers eight. An address past these is
/// never pinned to, and a client that dialled one is pinned to one of
/// the kept, which are the name's own servers too.
pub const MAX_PER_FAMILY: usize = 16;
/// Addresses remembered per name, at most: a name that rotates through
/// many keeps those seen last. S3, one address per answer with a 5 s TTL,
/// shows about 17 within its TTL and grace.
pub const MAX_SEEN: usize = 64;
/// Names with addresses remembered, at most.
pub const MAX_NAMES: usize = 10_000;
/// Addresses the names hold together, at most (each answer's and each
/// seen one counted): about 40 bytes each, so with the names themselves
/// the cache stays under about 12 MB whatever the answers, where the
/// typical name holds 4 to 20.
pub const MAX_ADDRESSES: usize = 200_000;
/// Names remembered as failing, at most.
pub const MAX_NEGATIVE: usize = 4_096;
/// Queries to the resolver at once, at most.
pub const MAX_IN_FLIGHT: usize = 256;
/// Lookups one client may have started and not finished, at most: an
/// eighth of [`MAX_IN_FLIGHT`]. Its lookups of names that never answer
/// hold at most this many of the resolver's slots, and spend at most this
/// many of its pace per [`LOOKUP_TIMEOUT`]; a new name past it is refused
/// at once ([`LookupError::Busy`]). A client's lookups that join one
/// already in flight for the same name do not count.
pub const SOURCE_SHARE: u32 = (MAX_IN_FLIGHT / 8) as u32;
/// Of [`MAX_IN_FLIGHT`], the queries only a client's first lookup in
/// flight may take: however many clients flood, a client with nothing in
/// flight finds one free (unless this many others are each waiting on
/// their own first).
pub const FIRST_RESERVED: usize = 64;
/// Of the pace's second of burst, the tokens only a client's first lookup
/// in flight may take, so floods of names that fail fast leave room too.
pub const PACE_RESERVED: u32 = LOOKUPS_PER_SECOND / 4;
/// New lookups a second, sustained (a burst may spend a second's worth at
/// once). Each is two queries (A and AAAA): AWS's VPC resolver answers
/// 1,024 packets a second per network interface and drops the rest, so
/// this keeps to 80% of that.
pub const LOOKUPS_PER_SECOND: u32 = 400;
/// Lookups started and not finished, at most: at the pace above no more
/// than this many could finish within [`LOOKUP_TIMEOUT`] anyway, so a new
/// name past it is unresolvable at once instead of queueing memory.
pub const MAX_PENDING: usize = 1024;
/// How long one lookup may take, queueing included; past it the name is
/// unresolvable for this connection.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// A name's addresses: its latest answer, and every address seen within
/// TTL + grace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addresses {
    /// The latest answer, in the resolver's order: where to pin to.
    current: Box<[IpAddr]>,
    /// Each address seen and until when it counts.
    seen: Box<[(IpAddr, Instant)]>,
    fetched: Instant,
    fresh_until: Instant,
}

impl Addresses {
    /// An answer of `current`, valid for `ttl` from `now`, merged with
    /// what `previous` still counts.
    pub fn new(
        current: Vec<IpAddr>,
        ttl: Duration,
        now: Instant,
        previous: Option<&Addresses>,
    ) -> Addresses {
        let current = first_of_each_family(current);
        let fresh_until = now + ttl.clamp(MIN_TTL, MAX_TTL);
        let until = fresh_until + GRACE;
        let mut seen: Vec<(IpAddr, Instant)> = previous
            .map(|p| p.seen.iter().copied().filter(|&(_, u)| u > now).collect())
            .unwrap_or_default();
        for &ip in &current {
            match seen.iter_mut().find(|(a, _)| *a == ip) {
                Some((_, u)) => *u = (*u).max(until),
                None => seen.push((ip, until)),
            }
        }
        if seen.len() > MAX_SEEN {
            seen.sort_unstable_by_key(|&(_, u)| std::cmp::Reverse(u));
            seen.truncate(MAX_SEEN);
        }
        Addresses {
            current: current.into(),
            seen: seen.into(),
            fetched: now,
            fresh_until,
        }
    }

    /// Whether `ip` is an address of the name at `now`.
    pub fn contains(&self, ip: IpAddr, now: Instant) -> bool {
        self.seen.iter().any(|&(a, until)| a == ip && until > now)
    }

    /// The latest answer.
    pub fn current(&self) -> &[IpAddr] {
        &self.current
    }

    fn is_fresh(&self, now: Instant) -> bool {
        now < self.fresh_until
    }

    /// Three quarters through its TTL: time to ask again in the background.
    fn wants_refresh(&self, now: Instant) -> bool {
        let ttl = self.fresh_until.saturating_duration_since(self.fetched);
        now >= self.fetched + ttl * 3 / 4
    }

    /// The addresses held, as [`MAX_ADDRESSES`] counts them.
    fn weight(&self) -> usize {
        self.current.len() + self.seen.len()
    }
}

/// The first [`MAX_PER_FAMILY`] IPv4 and IPv6 addresses of an answer, in
/// its order: a hostile answer of thousands is never copied whole.
fn first_of_each_family(answer: impl IntoIterator<Item = IpAddr>) -> Vec<IpAddr> {
    let (mut v4, mut v6) = (0, 0);
    answer
        .into_iter()
        .filter(|ip| {
            let n = if ip.is_ipv4() { &mut v4 } else { &mut v6 };
            *n += 1;
            *n <= MAX_PER_FAMILY
        })
        .collect()
}

/// A map of at most `cap` names, and at most `max_weight` in the weights
/// of its values, that forgets the oldest name first: a name is queued
/// once when it enters, so eviction is one pop.
#[derive(Debug)]
struct Bounded<V> {
    map: HashMap<Arc<str>, (V, usize)>,
    order: VecDeque<Arc<str>>,
    cap: usize,
    max_weight: usize,
    weight: usize,
}

impl<V> Bounded<V> {
    fn new(cap: usize, max_weight: usize) -> Bounded<V> {
        Bounded {
            map: HashMap::new(),
            order: VecDeque::new(),
            cap,
            max_weight,
            weight: 0,
        }
    }

    fn get(&self, key: &str) -> Option<&V> {
        self.map.get(key).map(|(v, _)| v)
    }

    fn insert(&mut self, key: &str, value: V, weight: usize) {
        if let Some(slot) = self.map.get_mut(key) {
            self.weight = self.weight - slot.1 + weight;
            *slot = (value, weight);
        } else {
            let key: Arc<str> = key.into();
            self.order.push_back(key.clone());
            self.map.insert(key, (value, weight));
            self.weight += weight;
        }
        // Every name but the one just stored may go; that one is queued
        // again if it comes up, so it is the last to go.
        let mut spared = false;
        while self.map.len() > self.cap || self.weight > self.max_weight {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if &*oldest == key {
                if spared {
                    // Only the new entry is left, heavier than the bound
                    // by itself: kept, the one exception.
                    self.order.push_front(oldest);
                    break;
                }
                spared = true;
                self.order.push_back(oldest);
                continue;
            }
            if let Some((_, w)) = self.map.remove(&oldest) {
                self.weight -= w;
            }
        }
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

/// What the cache knows of a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cached {
    /// Addresses within their TTL; `refresh`: ask again in the background.
    Fresh {
        addresses: Arc<Addresses>,
        refresh: bool,
    },
    /// A recent failure, still standing.
    Negative(LookupError),
    Miss,
}

/// Answers and failures by name, each table bounded.
#[derive(Debug)]
pub struct Cache {
    positive: Bounded<Arc<Addresses>>,
    negative: Bounded<(LookupError, Instant)>,
}

impl Default for Cache {
    fn default() -> Self {
        Cache::with_capacity(MAX_NAMES, MAX_NEGATIVE)
    }
}

impl Cache {
    pub fn with_capacity(names: usize, negative: usize) -> Cache {
        Cache::with_bounds(names, MAX_ADDRESSES, negative)
    }

    /// At most `names` answers holding `addresses` together, and
    /// `negative` failures.
    pub fn with_bounds(names: usize, addresses: usize, negative: usize) -> Cache {
        Cache {
            positive: Bounded::new(names, addresses),
            negative: Bounded::new(negative, negative),
        }
    }

    pub fn get(&self, name: &str, now: Instant) -> Cached {
        if let Some(addresses) = self.positive.get(name)
            && addresses.is_fresh(now)
        {
            return Cached::Fresh {
                addresses: addresses.clone(),
                refresh: addresses.wants_refresh(now),
            };
        }
        match self.negative.get(name) {
            Some(&(error, until)) if until > now => Cached::Negative(error),
            _ => Cached::Miss,
        }
    }

    /// Records an answer of `ips` with `ttl`; the name's addresses now.
    pub fn store(
        &mut self,
        name: &str,
        ips: Vec<IpAddr>,
        ttl: Duration,
        now: Instant,
    ) -> Arc<Addresses> {
        let merged = Arc::new(Addresses::new(
            ips,
            ttl,
            now,
            self.positive.get(name).map(|a| &**a),
        ));
        self.positive.insert(name, merged.clone(), merged.weight());
        // A name that resolves again is no longer failing.
        if let Some(((_, until), _)) = self.negative.map.get_mut(name) {
            *until = now;
        }
        merged
    }

    /// Records a failure. An answer still within its TTL stands: a failed
    /// background refresh does not take a name's addresses away early.
    pub fn store_failure(&mut self, name: &str, error: LookupError, now: Instant) -> Cached {
        if let Cached::Fresh { addresses, .. } = self.get(name, now) {
            return Cached::Fresh {
                addresses,
                refresh: false,
            };
        }
        let ttl = match error {
            LookupError::NxDomain | LookupError::NoAddresses => NEGATIVE_TTL,
            LookupError::Failed | LookupError::Timeout | LookupError::Busy => FAILURE_TTL,
        };
        self.negative.insert(name, (error, now + ttl), 1);
        Cached::Negative(error)
    }

    pub fn names(&self) -> usize {
        self.positive.len()
    }

    /// The addresses the names hold together.
    pub fn addresses(&self) -> usize {
        self.positive.weight
    }
}

/// Paces lookups: a token bucket of `rate` a second, holding at most one
/// second's worth.
#[derive(Debug)]
pub struct Pace {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Pace {
    pub fn new(rate: u32, now: Instant) -> Pace {
        Pace {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            at: now,
        }
    }

    /// Takes a token if there is one beyond `reserve`; else how long
    /// until there is.
    pub fn take(&mut self, now: Instant, reserve: u32) -> Result<(), Duration> {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate);
        self.at = now;
        let needed = 1.0 + f64::from(reserve);
        if self.tokens >= needed {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((needed - self.tokens) / self.rate))
        }
    }
}

/// What a finished lookup hands its waiters.
type Outcome = Result<Arc<Addresses>, LookupError>;

struct Shared {
    config: ResolverConfig,
    options: ResolverOpts,
    state: Mutex<State>,
    queries: Semaphore,
    /// Of those, what a client's second and later lookups may hold.
    extra: Semaphore,
    pace: Mutex<Pace>,
    metrics: Metrics,
}

#[derive(Default)]
struct State {
    cache: Cache,
    /// Names being looked up now, each with the channel its result comes on.
    in_flight: HashMap<Arc<str>, watch::Receiver<Option<Outcome>>>,
    /// Lookups each client started that have not finished; a client with
    /// none has no entry, so this is never larger than `in_flight`.
    by_source: HashMap<Source, u32>,
}

impl State {
    /// Whether a new lookup may start for `source`: the gateway's bound
    /// and the client's share both have room.
    fn has_room(&self, source: Source) -> bool {
        self.in_flight.len() < MAX_PENDING
            && self.by_source.get(&source).copied().unwrap_or(0) < SOURCE_SHARE
    }
}

thread_local! {
    /// One hickory resolver per worker thread: its sockets belong to that
    /// worker's runtime.
    static RESOLVER: OnceCell<TokioResolver> = const { OnceCell::new() };
}

/// Looks names up for every worker; cheap to clone.
#[derive(Clone)]
pub struct Resolver {
    shared: Arc<Shared>,
}

impl Resolver {
    /// Uses the system's resolver configuration (an error if it cannot be
    /// read: pinning cannot work without it).
    pub fn from_system(metrics: Metrics) -> Result<Resolver, ResolveError> {
        let (config, options) = hickory_resolver::system_conf::read_system_conf()?;
        Ok(Resolver::new(config, options, metrics))
    }

    /// Uses `config` and `options` (the system's, or a test's), counting
    /// lookups and cache hits in `metrics`.
    pub fn new(config: ResolverConfig, mut options: ResolverOpts, metrics: Metrics) -> Resolver {
        // Both families always: the default asks for AAAA only when a
        // name has no A record, which refuses every IPv6 client of a
        // dual-stack name.
        options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        // Caching, coalescing and refresh are ours.
        options.cache_size = 0;
        Resolver {
            shared: Arc::new(Shared {
                config,
                options,
                state: Mutex::new(State::default()),
                queries: Semaphore::new(MAX_IN_FLIGHT),
                extra: Semaphore::new(MAX_IN_FLIGHT - FIRST_RESERVED),
                pace: Mutex::new(Pace::new(LOOKUPS_PER_SECOND, Instant::now())),
                metrics,
            }),
        }
    }

    /// `name`'s addresses, from the cache when it has them, else from one
    /// query shared with every other connection asking meanwhile; a new
    /// query counts against `source`'s share. Never waits longer than
    /// about [`LOOKUP_TIMEOUT`].
    pub async fn resolve(
        &self,
        name: &HostName,
        source: Source,
    ) -> Result<Arc<Addresses>, LookupError> {
        let now = Instant::now();
        let mut result = {
            let mut state = self.state();
            match state.cache.get(name.as_str(), now) {
                Cached::Fresh { addresses, refresh } => {
                    if refresh
                        && !state.in_flight.contains_key(name.as_str())
                        && state.has_room(source)
                    {
                        self.start(&mut state, name, source);
                    }
                    self.shared.metrics.dns_cache_hit();
                    return Ok(addresses);
                }
                Cached::Negative(error) => {
                    self.shared.metrics.dns_cache_hit();
                    return Err(error);
                }
                Cached::Miss => match state.in_flight.get(name.as_str()) {
                    Some(result) => result.clone(),
                    None if !state.has_room(source) => {
                        let busy = LookupResult::Failed(LookupError::Busy);
                        self.shared.metrics.dns_lookup(busy);
                        return Err(LookupError::Busy);
                    }
                    None => self.start(&mut state, name, source),
                },
            }
        };
        // The lookup task has a deadline of its own; this one only guards
        // against a task that never reports.
        let wait = result.wait_for(Option::is_some);
        match tokio::time::timeout(LOOKUP_TIMEOUT + Duration::from_millis(200), wait).await {
            Ok(Ok(outcome)) => outcome.clone().unwrap_or(Err(LookupError::Failed)),
            Ok(Err(_)) => Err(LookupError::Failed),
            Err(_) => Err(LookupError::Timeout),
        }
    }

    /// Starts a lookup of `name` on this worker; its result comes on the
    /// channel returned (and noted in the cache).
    fn start(
        &self,
        state: &mut State,
        name: &HostName,
        source: Source,
    ) -> watch::Receiver<Option<Outcome>> {
        let (tx, rx) = watch::channel(None);
        let key: Arc<str> = name.as_str().into();
        state.in_flight.insert(key.clone(), rx.clone());
        let mine = state.by_source.entry(source).or_default();
        let first = *mine == 0;
        *mine += 1;
        let me = self.clone();
        tokio::spawn(async move {
            let looked_up = me.query(&key, first).await;
            me.shared.metrics.dns_lookup(match &looked_up {
                Ok(_) => LookupResult::Ok,
                Err(e) => LookupResult::Failed(*e),
            });
            let now = Instant::now();
            let outcome = {
                let mut state = me.state();
                state.in_flight.remove(&key);
                if let Some(n) = state.by_source.get_mut(&source) {
                    *n -= 1;
                    if *n == 0 {
                        state.by_source.remove(&source);
                    }
                }
                match looked_up {
                    Ok((ips, ttl)) => {
                        let stored = state.cache.store(&key, ips, ttl, now);
                        let cache = &state.cache;
                        me.shared
                            .metrics
                            .dns_cache_size(cache.names(), cache.addresses());
                        Ok(stored)
                    }
                    Err(error) => match state.cache.store_failure(&key, error, now) {
                        Cached::Fresh { addresses, .. } => Ok(addresses),
                        _ => Err(error),
                    },
                }
            };
            tx.send_replace(Some(outcome));
        });
        rx
    }

    /// One query for A and AAAA: the addresses and their TTL. `first`:
    /// the client had no other lookup in flight, so the reserves are its.
    async fn query(&self, name: &str, first: bool) -> Result<(Vec<IpAddr>, Duration), LookupError> {
        let deadline = tokio::time::Instant::now() + LOOKUP_TIMEOUT;
        let reserve = if first { 0 } else { PACE_RESERVED };
        loop {
            let paced = {
                let mut pace = self.shared.pace.lock().unwrap_or_else(|p| p.into_inner());
                pace.take(Instant::now(), reserve)
            };
            match paced {
                Ok(()) => break,
                Err(wait) if tokio::time::Instant::now() + wait < deadline => {
                    tokio::time::sleep(wait).await;
                }
                Err(_) => return Err(LookupError::Timeout),
            }
        }
        let _extra = match first {
            true => None,
            false => {
                let acquired = tokio::time::timeout_at(deadline, self.shared.extra.acquire()).await;
                let Ok(Ok(permit)) = acquired else {
                    return Err(LookupError::Timeout);
                };
                Some(permit)
            }
        };
        let Ok(Ok(_permit)) =
            tokio::time::timeout_at(deadline, self.shared.queries.acquire()).await
        else {
            return Err(LookupError::Timeout);
        };
        let resolver = RESOLVER.with(|r| r.get_or_init(|| self.build()).clone());
        // Fully qualified: the search domains of resolv.conf must not turn
        // a client's name into one of ours.
        let fqdn = format!("{name}.");
        match tokio::time::timeout_at(deadline, resolver.lookup_ip(fqdn.as_str())).await {
            Err(_) => Err(LookupError::Timeout),
            Ok(Err(e)) if e.is_nx_domain() => Err(LookupError::NxDomain),
            Ok(Err(e)) if e.is_no_records_found() => Err(LookupError::NoAddresses),
            Ok(Err(_)) => Err(LookupError::Failed),
            Ok(Ok(answer)) => {
                let ips = first_of_each_family(answer.iter());
                if ips.is_empty() {
                    return Err(LookupError::NoAddresses);
                }
                let ttl = answer
                    .valid_until()
                    .saturating_duration_since(Instant::now());
                Ok((ips, ttl))
            }
        }
    }

    fn build(&self) -> TokioResolver {
        TokioResolver::builder_with_config(
            self.shared.config.clone(),
            TokioConnectionProvider::default(),
        )
        .with_options(self.shared.options.clone())
        .build()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while the lock was held leaves at worst an entry missing
        // or a lookup noted that never reports (its waiters time out):
        // every state is a usable one.
        self.shared
            .state
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

    const NAME: &str = "a.example.test";

    #[test]
    fn every_address_seen_counts_until_its_ttl_and_grace() {
        let t0 = Instant::now();
        let mut cache = Cache::default();
        // Round-robin: two answers, each with one address.
        cache.store(NAME, vec![ip("192.0.2.1")], Duration::from_secs(30), t0);
        let a = cache.store(NAME, vec![ip("192.0.2.2")], Duration::from_secs(60), t0);
        assert!(a.contains(ip("192.0.2.1"), t0));
        assert!(a.contains(ip("192.0.2.2"), t0));
        assert!(!a.contains(ip("198.51.100.7"), t0));
        assert_eq!(a.current(), [ip("192.0.2.2")]);
        let later = t0 + Duration::from_secs(30) + GRACE + Duration::from_secs(1);
        assert!(!a.contains(ip("192.0.2.1"), later));
        assert!(a.contains(ip("192.0.2.2"), later));
    }

    #[test]
    fn an_answer_is_fresh_for_its_ttl_and_asks_for_refresh_late_in_it() {
        let t0 = Instant::now();
        let mut cache = Cache::default();
        cache.store(NAME, vec![ip("192.0.2.1")], Duration::from_secs(8), t0);
        let at = |s: u64| cache.get(NAME, t0 + Duration::from_secs(s));
        assert!(matches!(at(0), Cached::Fresh { refresh: false, .. }));
        assert!(matches!(at(5), Cached::Fresh { refresh: false, .. }));
        assert!(matches!(at(6), Cached::Fresh { refresh: true, .. }));
        assert_eq!(at(8), Cached::Miss);
        // A TTL of 0 still holds for MIN_TTL.
        cache.store("b.example.test", vec![ip("192.0.2.1")], Duration::ZERO, t0);
        assert!(matches!(
            cache.get("b.example.test", t0 + MIN_TTL / 2),
            Cached::Fresh { .. }
        ));
        assert_eq!(cache.get("b.example.test", t0 + MIN_TTL), Cached::Miss);
    }

    #[test]
    fn failures_are_remembered_briefly_and_never_hide_a_fresh_answer() {
        let t0 = Instant::now();
        let mut cache = Cache::default();
        assert_eq!(
            cache.store_failure(NAME, LookupError::NxDomain, t0),
            Cached::Negative(LookupError::NxDomain)
        );
        assert_eq!(
            cache.get(NAME, t0 + NEGATIVE_TTL / 2),
            Cached::Negative(LookupError::NxDomain)
        );
        assert_eq!(cache.get(NAME, t0 + NEGATIVE_TTL), Cached::Miss);
        cache.store_failure("t.example.test", LookupError::Timeout, t0);
        assert_eq!(cache.get("t.example.test", t0 + FAILURE_TTL), Cached::Miss);
        // A name that resolves again is no longer negative.
        cache.store(NAME, vec![ip("192.0.2.1")], Duration::from_secs(10), t0);
        assert!(matches!(cache.get(NAME, t0), Cached::Fresh { .. }));
        // A refresh that fails keeps the answer until its TTL ends.
        let t1 = t0 + Duration::from_secs(8);
        assert!(matches!(
            cache.store_failure(NAME, LookupError::Failed, t1),
            Cached::Fresh { .. }
        ));
        assert!(matches!(cache.get(NAME, t1), Cached::Fresh { .. }));
        let t2 = t0 + Duration::from_secs(10);
        cache.store_failure(NAME, LookupError::Failed, t2);
        assert_eq!(cache.get(NAME, t2), Cached::Negative(LookupError::Failed));
    }

    #[test]
    fn both_tables_are_bounded_and_forget_the_oldest_first() {
        let t0 = Instant::now();
        let mut cache = Cache::with_capacity(100, 10);
        for i in 0..250 {
            let name = format!("n{i}.example.test");
            cache.store(&name, vec![ip("192.0.2.1")], Duration::from_secs(60), t0);
            cache.store_failure(&format!("x{i}.example.test"), LookupError::NxDomain, t0);
            assert!(cache.names() <= 100);
            assert!(cache.negative.len() <= 10);
            assert!(cache.positive.order.len() <= 100);
        }
        assert_eq!(cache.get("n149.example.test", t0), Cached::Miss);
        assert!(matches!(
            cache.get("n150.example.test", t0),
            Cached::Fresh { .. }
        ));
        // A flood of failing names never pushes out an answer.
        assert!(matches!(
            cache.get("n249.example.test", t0),
            Cached::Fresh { .. }
        ));
        // Updating a name does not queue it twice.
        for _ in 0..1000 {
            cache.store(
                "n249.example.test",
                vec![ip("192.0.2.2")],
                Duration::from_secs(60),
                t0,
            );
        }
        assert!(cache.positive.order.len() <= 100);
    }

    #[test]
    fn a_name_remembers_a_bounded_number_of_addresses_the_latest_first() {
        let t0 = Instant::now();
        let mut cache = Cache::default();
        let mut last = None;
        for i in 0..1000u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0xcb00_7100 + i));
            let now = t0 + Duration::from_millis(u64::from(i));
            last = Some(cache.store(NAME, vec![ip], Duration::from_secs(5), now));
        }
        let last = last.unwrap();
        assert_eq!(last.seen.len(), MAX_SEEN);
        assert!(last.weight() <= MAX_SEEN + 2 * MAX_PER_FAMILY);
        let newest = IpAddr::from(std::net::Ipv4Addr::from(0xcb00_7100 + 999));
        assert!(last.contains(newest, t0 + Duration::from_secs(1)));
        let oldest = IpAddr::from(std::net::Ipv4Addr::from(0xcb00_7100));
        assert!(!last.contains(oldest, t0 + Duration::from_secs(1)));
    }

    #[test]
    fn lookups_are_paced_with_a_second_of_burst() {
        let t0 = Instant::now();
        let mut pace = Pace::new(400, t0);
        for _ in 0..400 {
            assert_eq!(pace.take(t0, 0), Ok(()));
        }
        let wait = pace.take(t0, 0).unwrap_err();
        assert!(
            wait <= Duration::from_micros(2_600) && wait > Duration::ZERO,
            "{wait:?}"
        );
        let t1 = t0 + Duration::from_millis(12);
        for _ in 0..4 {
            assert_eq!(pace.take(t1, 0), Ok(()));
        }
        assert!(pace.take(t1, 0).is_err());
        // Idle for long: a second's worth, no more.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..400 {
            assert_eq!(pace.take(t2, 0), Ok(()));
        }
        assert!(pace.take(t2, 0).is_err());
        // A lookup that is not its client's first leaves the reserve.
        let t3 = t2 + Duration::from_secs(60);
        for _ in 0..(400 - PACE_RESERVED) {
            assert_eq!(pace.take(t3, PACE_RESERVED), Ok(()));
        }
        assert!(pace.take(t3, PACE_RESERVED).is_err());
        assert_eq!(pace.take(t3, 0), Ok(()));
    }

    /// A resolver whose only nameserver is a socket that never answers.
    fn silent_resolver() -> (Resolver, std::net::UdpSocket) {
        use hickory_resolver::config::NameServerConfigGroup;
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = silent.local_addr().unwrap().port();
        let servers =
            NameServerConfigGroup::from_ips_clear(&["127.0.0.1".parse().unwrap()], port, true);
        let config = ResolverConfig::from_parts(None, vec![], servers);
        let mut options = ResolverOpts::default();
        options.timeout = Duration::from_secs(10);
        options.attempts = 1;
        (Resolver::new(config, options, Metrics::detached()), silent)
    }

    #[tokio::test]
    async fn connections_waiting_on_one_name_share_one_query_that_is_bounded_in_time() {
        let (resolver, silent) = silent_resolver();
        let name = HostName::from_wire(NAME.as_bytes()).unwrap();
        let started = Instant::now();
        let waiting: Vec<_> = (0..50)
            .map(|_| {
                let (resolver, name) = (resolver.clone(), name.clone());
                tokio::spawn(async move { resolver.resolve(&name, client(1)).await })
            })
            .collect();
        for w in waiting {
            assert_eq!(w.await.unwrap(), Err(LookupError::Timeout));
        }
        let took = started.elapsed();
        assert!(
            took >= LOOKUP_TIMEOUT && took < LOOKUP_TIMEOUT + Duration::from_secs(1),
            "{took:?}"
        );
        // One lookup: its A and its AAAA query, not fifty of each.
        silent
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut buf = [0u8; 512];
        let mut datagrams = 0;
        while silent.recv(&mut buf).is_ok() {
            datagrams += 1;
        }
        assert_eq!(datagrams, 2);
        // The failure is remembered: the next connection does not wait.
        let again = Instant::now();
        assert_eq!(
            resolver.resolve(&name, client(2)).await,
            Err(LookupError::Timeout)
        );
        assert!(again.elapsed() < Duration::from_millis(100));
    }

    /// A client as the resolver counts it.
    fn client(n: u32) -> Source {
        Source::of(IpAddr::from(std::net::Ipv4Addr::from(0xc000_0200 + n)))
    }

    /// Asks for `count` new names, each from `source_of(i)`; how each
    /// lookup ended, and whether it ended at once (well before the
    /// silent resolver's lookups time out).
    async fn ask_new_names(
        resolver: &Resolver,
        prefix: &str,
        count: usize,
        source_of: impl Fn(usize) -> Source,
    ) -> Vec<(Result<Arc<Addresses>, LookupError>, bool)> {
        let started = Instant::now();
        let waiting: Vec<_> = (0..count)
            .map(|i| {
                let resolver = resolver.clone();
                let name = format!("{prefix}{i}.example.test");
                let name = HostName::from_wire(name.as_bytes()).unwrap();
                let source = source_of(i);
                tokio::spawn(async move {
                    let result = resolver.resolve(&name, source).await;
                    (result, started.elapsed() < LOOKUP_TIMEOUT / 4)
                })
            })
            .collect();
        let mut out = Vec::new();
        for w in waiting {
            out.push(w.await.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn past_the_pending_bound_a_new_name_is_refused_at_once() {
        let (resolver, _silent) = silent_resolver();
        // One client each: no client's share is what refuses them.
        let ended = ask_new_names(&resolver, "n", MAX_PENDING + 76, |i| {
            client(u32::try_from(i).unwrap())
        })
        .await;
        let busy = ended
            .iter()
            .filter(|(r, at_once)| *r == Err(LookupError::Busy) && *at_once)
            .count();
        let timed_out = ended
            .iter()
            .filter(|(r, at_once)| *r == Err(LookupError::Timeout) && !*at_once)
            .count();
        assert_eq!((busy, timed_out), (76, MAX_PENDING));
        let state = resolver.state();
        assert_eq!(state.in_flight.len(), 0);
        assert!(state.by_source.is_empty());
    }

    #[tokio::test]
    async fn floods_hold_only_their_share_and_another_clients_first_name_is_asked_at_once() {
        let (resolver, silent) = silent_resolver();
        // The server's queries are read from the start, or its buffer
        // would overflow with the floods' and drop the one looked for.
        let watch = std::thread::spawn(move || {
            silent
                .set_read_timeout(Some(Duration::from_millis(20)))
                .unwrap();
            let since = Instant::now();
            let mut buf = [0u8; 512];
            while since.elapsed() < Duration::from_secs(1) {
                if let Ok(n) = silent.recv(&mut buf)
                    && buf[..n].windows(6).any(|w| w == b"\x05other")
                {
                    return Some(Instant::now());
                }
            }
            None
        });
        let share = SOURCE_SHARE + 4;
        // Ten clients flood at once: more than every query the resolver
        // may have in flight, and each client past its own share.
        let started = Instant::now();
        let mut floods = Vec::new();
        for c in 0..10u32 {
            for i in 0..share {
                let resolver = resolver.clone();
                let name = format!("f{c}x{i}.example.test");
                let name = HostName::from_wire(name.as_bytes()).unwrap();
                floods.push(tokio::spawn(async move {
                    let result = resolver.resolve(&name, client(10 + c)).await;
                    (c, result, started.elapsed() < LOOKUP_TIMEOUT / 4)
                }));
            }
        }
        // Once the floods hold what they may, another client's first name.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let asked = Instant::now();
        let name = HostName::from_wire(b"other.example.test").unwrap();
        let other = tokio::spawn({
            let resolver = resolver.clone();
            async move { resolver.resolve(&name, client(99)).await }
        });
        let seen = tokio::task::spawn_blocking(move || watch.join().unwrap())
            .await
            .unwrap();
        let waited = seen.map(|at| at.saturating_duration_since(asked));
        assert!(
            waited.is_some_and(|w| w < Duration::from_millis(100)),
            "another client's first name waited behind the floods: {waited:?}"
        );
        let _ = other.await;
        let mut busy = [0; 10];
        for flood in floods {
            let (c, result, at_once) = flood.await.unwrap();
            if result == Err(LookupError::Busy) && at_once {
                busy[c as usize] += 1;
            }
        }
        assert_eq!(busy, [4; 10], "past its share, each refused at once");
        assert!(resolver.state().by_source.is_empty());
    }

    #[test]
    fn an_answer_keeps_a_bounded_number_of_addresses_of_each_family() {
        let t0 = Instant::now();
        let mut cache = Cache::default();
        let v6 =
            (0..2000u128).map(|i| IpAddr::from(std::net::Ipv6Addr::from(0x2001_0db8 << 96 | i)));
        let v4 = (0..20u32).map(|i| IpAddr::from(std::net::Ipv4Addr::from(0xcb00_7100 + i)));
        // The families interleaved, IPv6 first: neither crowds out the other.
        let answer: Vec<IpAddr> = v6.clone().take(5).chain(v4).chain(v6.skip(5)).collect();
        let a = cache.store(NAME, answer.clone(), Duration::from_secs(60), t0);
        assert_eq!(
            a.current().iter().filter(|ip| ip.is_ipv4()).count(),
            MAX_PER_FAMILY
        );
        assert_eq!(
            a.current().iter().filter(|ip| ip.is_ipv6()).count(),
            MAX_PER_FAMILY
        );
        // The first of each, in the answer's order.
        let kept: Vec<IpAddr> = first_of_each_family(answer.iter().copied());
        assert_eq!(a.current(), &kept[..]);
        assert!(a.contains(answer[0], t0));
        assert!(!a.contains(*answer.last().unwrap(), t0));
        assert_eq!(a.weight(), 4 * MAX_PER_FAMILY);
    }

    #[test]
    fn the_cache_is_bounded_by_the_addresses_its_names_hold() {
        let t0 = Instant::now();
        let hostile = |i: u128| -> Vec<IpAddr> {
            (0..2000u128)
                .map(|j| IpAddr::from(std::net::Ipv6Addr::from(0x2001_0db8 << 96 | i << 16 | j)))
                .collect()
        };
        let mut cache = Cache::with_bounds(10_000, 1_000, 10);
        for i in 0..1500u128 {
            let name = format!("h{i}.example.test");
            cache.store(&name, hostile(i), Duration::from_secs(300), t0);
            assert!(cache.addresses() <= 1_000, "{}", cache.addresses());
            // The name just stored is always kept.
            assert!(matches!(cache.get(&name, t0), Cached::Fresh { .. }));
        }
        assert_eq!(cache.names(), 1_000 / (2 * MAX_PER_FAMILY));
        // The oldest went first.
        assert_eq!(cache.get("h0.example.test", t0), Cached::Miss);
        // Updating a name in place keeps the count true.
        for _ in 0..100 {
            cache.store(
                "h1499.example.test",
                hostile(1499),
                Duration::from_secs(300),
                t0,
            );
        }
        let held: usize = cache.positive.map.values().map(|(a, _)| a.weight()).sum();
        assert_eq!(held, cache.addresses());
        assert_eq!(cache.positive.order.len(), cache.names());

        // With the gateway's bounds, the addresses held stay within the
        // memory README states, whatever the answers.
        let per_address = std::mem::size_of::<(IpAddr, Instant)>();
        assert!(MAX_ADDRESSES * per_address <= 8 << 20, "{per_address}");
        let mut cache = Cache::default();
        for i in 0..(MAX_NAMES as u128 + 500) {
            let name = format!("h{i}.example.test");
            cache.store(&name, hostile(i % 64), Duration::from_secs(300), t0);
        }
        assert!(cache.addresses() <= MAX_ADDRESSES);
        assert!(cache.names() <= MAX_NAMES);
    }

    #[test]
    fn lookup_results_are_indexed_in_order() {
        for (i, r) in LookupResult::ALL.iter().enumerate() {
            assert_eq!(r.index(), i, "{}", r.as_str());
        }
    }
}
