//! How many connections may be served at once: in all (`--max-connections`)
//! and per client (`--max-connections-per-source`), so that one host, busy
//! or compromised, cannot take every slot and stop egress for the others.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Shards of the per-source table: accepts on different workers rarely
/// take the same lock.
const SHARDS: usize = 32;

/// A client as the per-source limit counts it: an IPv4 address, or the
/// /64 of an IPv6 address (a host is given a whole /64 and can take any
/// address in it, so counting addresses would let it rotate around the
/// cap). An IPv4 client seen on a dual-stack socket (`::ffff:a.b.c.d`)
/// counts as its IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    V4(u32),
    V6Net(u64),
}

impl Source {
    pub fn of(ip: IpAddr) -> Source {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Source::V4(v4.to_bits()),
            IpAddr::V6(v6) => Source::V6Net((v6.to_bits() >> 64) as u64),
        }
    }

    fn shard(self) -> usize {
        let bits = match self {
            Source::V4(a) => u64::from(a),
            Source::V6Net(n) => n,
        };
        // Fibonacci hashing: neighbouring addresses land on different shards.
        (bits.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 59) as usize % SHARDS
    }
}

/// Which limit refused a connection; the label of the rejections metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// `--max-connections` are being served.
    Total,
    /// This client holds `--max-connections-per-source`.
    Source,
}

impl Full {
    pub const ALL: [Full; 2] = [Full::Total, Full::Source];

    pub fn as_str(self) -> &'static str {
        match self {
            Full::Total => "total",
            Full::Source => "per_source",
        }
    }
}

/// Both limits. Cheap to share: clone the `Arc`.
pub struct Limits {
    total: Arc<Semaphore>,
    max: usize,
    per_source: Option<PerSource>,
}

/// A served connection's place under both limits, given back on drop.
pub struct Slot {
    _total: OwnedSemaphorePermit,
    _source: Option<SourceSlot>,
}

impl Limits {
    /// `per_source` at or above `max` is no per-source limit at all.
    pub fn new(max: usize, per_source: usize) -> Arc<Limits> {
        Arc::new(Limits {
            total: Arc::new(Semaphore::new(max)),
            max,
            per_source: (per_source < max).then(|| PerSource::new(per_source)),
        })
    }

    /// A slot for a connection from `ip`, or which limit is full.
    pub fn try_admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Full> {
        let total = self
            .total
            .clone()
            .try_acquire_owned()
            .map_err(|_| Full::Total)?;
        let source = match &self.per_source {
            None => None,
            Some(table) => Some(table.try_take(self, Source::of(ip)).ok_or(Full::Source)?),
        };
        Ok(Slot {
            _total: total,
            _source: source,
        })
    }

    /// Connections being served now.
    pub fn live(&self) -> usize {
        self.max - self.total.available_permits()
    }

    /// Resolves once no connection is being served.
    pub async fn all_ended(&self) {
        let all = u32::try_from(self.max).unwrap_or(u32::MAX);
        // The semaphore is never closed, so this only ever succeeds.
        let _all = self.total.acquire_many(all).await;
    }
}

/// How many connections each client holds; a client with none has no
/// entry, so the table is never larger than the connections served.
struct PerSource {
    cap: u32,
    shards: Box<[Mutex<HashMap<Source, u32>>]>,
}

impl PerSource {
    fn new(cap: usize) -> PerSource {
        PerSource {
            cap: u32::try_from(cap).unwrap_or(u32::MAX),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    fn try_take(&self, limits: &Arc<Limits>, source: Source) -> Option<SourceSlot> {
        let mut shard = self.shards[source.shard()]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let held = shard.entry(source).or_insert(0);
        if *held >= self.cap {
            return None;
        }
        *held += 1;
        Some(SourceSlot {
            limits: limits.clone(),
            source,
        })
    }

    fn give_back(&self, source: Source) {
        let mut shard = self.shards[source.shard()]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(held) = shard.get_mut(&source) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                shard.remove(&source);
            }
        }
    }

    #[cfg(test)]
    fn clients(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap().len()).sum()
    }
}

struct SourceSlot {
    limits: Arc<Limits>,
    source: Source,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        if let Some(table) = &self.limits.per_source {
            table.give_back(self.source);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_client_cannot_take_another_clients_share() {
        let limits = Limits::new(10, 3);
        let held: Vec<Slot> = (0..3)
            .map(|_| limits.try_admit(ip("192.0.2.10")).unwrap())
            .collect();
        assert_eq!(limits.try_admit(ip("192.0.2.10")).err(), Some(Full::Source));
        assert!(limits.try_admit(ip("192.0.2.11")).is_ok());
        drop(held);
        assert!(limits.try_admit(ip("192.0.2.10")).is_ok());
    }

    #[test]
    fn the_total_limit_still_holds_across_clients() {
        let limits = Limits::new(4, 2);
        let _held: Vec<Slot> = ["192.0.2.1", "192.0.2.1", "192.0.2.2", "192.0.2.3"]
            .iter()
            .map(|a| limits.try_admit(ip(a)).unwrap())
            .collect();
        assert_eq!(limits.live(), 4);
        assert_eq!(limits.try_admit(ip("192.0.2.4")).err(), Some(Full::Total));
    }

    #[test]
    fn an_ipv6_host_is_counted_by_its_64() {
        let limits = Limits::new(100, 2);
        let _a = limits.try_admit(ip("2001:db8:1:2::1")).unwrap();
        let _b = limits.try_admit(ip("2001:db8:1:2:ffff::9")).unwrap();
        assert_eq!(
            limits.try_admit(ip("2001:db8:1:2:abcd::1")).err(),
            Some(Full::Source),
            "another address of the same /64 is the same host"
        );
        assert!(limits.try_admit(ip("2001:db8:1:3::1")).is_ok());
    }

    #[test]
    fn ipv4_clients_on_a_dual_stack_socket_are_not_one_ipv6_network() {
        // Every ::ffff:a.b.c.d is in ::/64: counted by /64 they would share
        // one cap.
        let limits = Limits::new(100, 1);
        let _a = limits.try_admit(ip("::ffff:192.0.2.1")).unwrap();
        assert!(limits.try_admit(ip("::ffff:192.0.2.2")).is_ok());
        assert_eq!(
            limits.try_admit(ip("192.0.2.1")).err(),
            Some(Full::Source),
            "a mapped address is its IPv4 address"
        );
    }

    #[test]
    fn the_table_forgets_clients_with_no_connection() {
        let limits = Limits::new(1000, 10);
        for i in 0..200u32 {
            let a = IpAddr::from(std::net::Ipv4Addr::from_bits(0xC000_0200 + i));
            drop(limits.try_admit(a).unwrap());
        }
        assert_eq!(limits.per_source.as_ref().unwrap().clients(), 0);
    }

    #[test]
    fn a_per_source_cap_at_the_total_is_no_table_at_all() {
        let limits = Limits::new(5, 5);
        assert!(limits.per_source.is_none());
        let _held: Vec<Slot> = (0..5)
            .map(|_| limits.try_admit(ip("192.0.2.1")).unwrap())
            .collect();
    }
}
