//! The egress address: each AZ has a pool of Elastic IPs (one more than
//! its gateways, so a rollout's new instance has one while the old still
//! holds its own), and each gateway holds one of its AZ's for life. Partners
//! allowlist the pools; no address ever moves under a live connection.
//! Pure: which address to claim, from what the EC2 API says.

use super::fleet::{EniId, Fleet};
use std::fmt;

/// `eipalloc-0123…`
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AllocationId(pub String);

impl fmt::Display for AllocationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One Elastic IP of the pool, as DescribeAddresses shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub allocation: AllocationId,
    pub public_ip: String,
    /// The interface it is associated with, if any.
    pub eni: Option<EniId>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This gateway holds this one.
    Held(Address),
    /// Associate this one; `reassociate` when it is still associated with
    /// the interface of an instance that is gone.
    Take { address: Address, reassociate: bool },
    /// Every address of the pool is held by a live gateway.
    NoneFree,
}

/// Which address of its AZ's pool this gateway (interface `mine`) holds
/// or should claim. An address on a live gateway (booting or running) is
/// never taken; free ones are tried in allocation-id order, and two
/// gateways that race for one settle it on the next reading (the API
/// refuses the second association of an unassociated address).
pub fn claim(pool: &[Address], fleet: &Fleet, mine: &EniId) -> Claim {
    if let Some(held) = pool.iter().find(|a| a.eni.as_ref() == Some(mine)) {
        return Claim::Held(held.clone());
    }
    let live = |eni: &EniId| {
        fleet
            .gateways
            .iter()
            .any(|g| &g.eni == eni && (g.running || g.booting))
    };
    let mut free: Vec<&Address> = pool
        .iter()
        .filter(|a| a.eni.as_ref().is_none_or(|e| !live(e)))
        .collect();
    // Unassociated first: taking one cannot race a reassociation.
    free.sort_by_key(|a| (a.eni.is_some(), a.allocation.clone()));
    match free.first() {
        Some(a) => Claim::Take {
            address: (*a).clone(),
            reassociate: a.eni.is_some(),
        },
        None => Claim::NoneFree,
    }
}

#[cfg(test)]
mod tests {
    use super::super::fleet::Gateway;
    use super::*;

    fn gw(id: &str, running: bool) -> Gateway {
        Gateway {
            running,
            ..Gateway::sample(&format!("i-{id}"), "a", &format!("eni-{id}"))
        }
    }

    fn addr(n: u8, on: Option<&str>) -> Address {
        Address {
            allocation: AllocationId(format!("eipalloc-{n}")),
            public_ip: format!("203.0.113.{n}"),
            eni: on.map(|e| EniId(format!("eni-{e}"))),
        }
    }

    #[test]
    fn a_held_address_is_kept() {
        let fleet = Fleet {
            gateways: vec![gw("a1", true)],
            routes: vec![],
        };
        let pool = [addr(1, None), addr(2, Some("a1"))];
        assert_eq!(
            claim(&pool, &fleet, &EniId("eni-a1".into())),
            Claim::Held(addr(2, Some("a1")))
        );
    }

    #[test]
    fn new_gateway_takes_a_free_address_never_a_live_one() {
        let mut booting = gw("a2", false);
        booting.booting = true;
        let fleet = Fleet {
            gateways: vec![gw("a1", true), booting, gw("a3", false)],
            routes: vec![],
        };
        let me = EniId("eni-a3".into());
        // The old gateway holds 1 and a booting one 2: none free.
        let pool = [addr(1, Some("a1")), addr(2, Some("a2"))];
        assert_eq!(claim(&pool, &fleet, &me), Claim::NoneFree);
        // An unassociated one is preferred over one left on a dead interface.
        let pool = [addr(1, Some("a1")), addr(2, Some("dead")), addr(3, None)];
        assert_eq!(
            claim(&pool, &fleet, &me),
            Claim::Take {
                address: addr(3, None),
                reassociate: false
            }
        );
        let pool = [addr(1, Some("a1")), addr(2, Some("dead"))];
        assert_eq!(
            claim(&pool, &fleet, &me),
            Claim::Take {
                address: addr(2, Some("dead")),
                reassociate: true
            }
        );
    }
}
