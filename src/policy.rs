//! Per-source policies: the client's address chooses which allowlist
//! decides its connections. Each named policy lists source CIDRs; the most
//! specific CIDR that holds the client wins, and a client no CIDR holds
//! falls to the default policy (the top-level `allowlist`).
//!
//! [`Cidr`], [`PolicyName`] and [`SourceTable`] are pure; [`Policies`]
//! pairs each policy with the list it has in force.

use crate::allowlist::{InForce, Live, Source};
use arc_swap::Guard;
use rustc_hash::FxHashMap;
use serde::Deserialize;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::sync::Arc;

/// The name of the policy for clients no CIDR holds.
pub const DEFAULT_POLICY: &str = "default";
/// Named policies at most, besides the default. Each adds its own series
/// to the per-policy metric families, so the count is bounded here.
pub const MAX_POLICIES: usize = 32;
const MAX_NAME_LEN: usize = 32;

/// A policy's name, as audit lines and metric labels carry it: 1 to 32 of
/// `a-z`, `0-9`, `-` and `_`, starting with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct PolicyName(Arc<str>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyNameError {
    #[error("policy name {0:?}: use 1 to 32 of a-z, 0-9, - and _, starting with a letter or digit")]
    Invalid(String),
    #[error("policy name \"default\" is taken: the top-level allowlist is the default policy")]
    Default,
}

impl PolicyName {
    pub fn default_policy() -> PolicyName {
        PolicyName(DEFAULT_POLICY.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for PolicyName {
    type Err = PolicyNameError;

    fn from_str(s: &str) -> Result<PolicyName, PolicyNameError> {
        let allowed =
            |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_';
        let first_ok = s
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !first_ok || s.len() > MAX_NAME_LEN || !s.bytes().all(allowed) {
            return Err(PolicyNameError::Invalid(s.to_string()));
        }
        if s == DEFAULT_POLICY {
            return Err(PolicyNameError::Default);
        }
        Ok(PolicyName(s.into()))
    }
}

impl fmt::Display for PolicyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An address block such as `192.0.2.0/25` or `2001:db8::/48`. A bare
/// address is a block of one. Host bits must be zero: `192.0.2.7/24` is
/// refused, as it is more likely a typo than a way to write
/// `192.0.2.0/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{0:?} is not an address block such as 192.0.2.0/24 or 2001:db8::/48")]
    Syntax(String),
    #[error("{given}: the bits after the prefix must be zero (did you mean {meant}?)")]
    HostBits { given: String, meant: Cidr },
}

impl Cidr {
    /// `ip` with the bits after this block's prefix cleared.
    fn masked(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask32(self.prefix))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask128(self.prefix))),
        }
    }
}

/// The plain reading of a block, which the tests hold [`SourceTable`] to.
#[cfg(test)]
impl Cidr {
    fn new(network: IpAddr, prefix: u8) -> Option<Cidr> {
        let cidr = Cidr { network, prefix };
        let max = if network.is_ipv4() { 32 } else { 128 };
        (prefix <= max && cidr.masked(network) == network).then_some(cidr)
    }

    fn prefix(&self) -> u8 {
        self.prefix
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.network.is_ipv4() && self.masked(ip) == self.network
    }
}

fn mask32(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask128(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let syntax = || CidrError::Syntax(s.to_string());
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let network: IpAddr = addr.parse().map_err(|_| syntax())?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            // Digits only: u8's parser would take a leading '+'.
            Some(p) if !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse().map_err(|_| syntax())?
            }
            Some(_) => return Err(syntax()),
        };
        if prefix > max {
            return Err(syntax());
        }
        let block = Cidr { network, prefix };
        let meant = Cidr {
            network: block.masked(network),
            prefix,
        };
        if meant != block {
            return Err(CidrError::HostBits {
                given: s.to_string(),
                meant,
            });
        }
        Ok(block)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

// Both are read from a config file through their `FromStr` (serde's
// `try_from`), so a bad value is reported at its line.
impl TryFrom<String> for PolicyName {
    type Error = PolicyNameError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl TryFrom<String> for Cidr {
    type Error = CidrError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// A policy's place in [`Policies`]: 0 is the default policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PolicyId(pub u16);

impl PolicyId {
    pub const DEFAULT: PolicyId = PolicyId(0);

    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

/// Blocks of one prefix length, keyed by their masked network.
#[derive(Debug, Clone)]
struct Level<K> {
    prefix: u8,
    mask: K,
    blocks: FxHashMap<K, PolicyId>,
}

/// Client address → policy, by longest prefix: one hash lookup per
/// prefix length in use, longest first, with nothing allocated.
#[derive(Debug, Clone, Default)]
pub struct SourceTable {
    v4: Vec<Level<u32>>,
    v6: Vec<Level<u128>>,
}

impl SourceTable {
    /// Adds `block` for `policy`; a block already given (to any policy)
    /// is refused, returning the policy that has it.
    pub fn insert(&mut self, block: Cidr, policy: PolicyId) -> Result<(), PolicyId> {
        match block.network {
            IpAddr::V4(a) => insert(
                &mut self.v4,
                block.prefix,
                mask32(block.prefix),
                a.into(),
                policy,
            ),
            IpAddr::V6(a) => insert(
                &mut self.v6,
                block.prefix,
                mask128(block.prefix),
                a.into(),
                policy,
            ),
        }
    }

    /// The policy for a client at `ip`: the most specific block that
    /// holds it, else the default. IPv4-mapped IPv6 addresses count as
    /// the IPv4 address they carry.
    pub fn policy_of(&self, ip: IpAddr) -> PolicyId {
        let found = match ip.to_canonical() {
            IpAddr::V4(a) => find(&self.v4, u32::from(a)),
            IpAddr::V6(a) => find(&self.v6, u128::from(a)),
        };
        found.unwrap_or(PolicyId::DEFAULT)
    }
}

fn insert<K>(
    levels: &mut Vec<Level<K>>,
    prefix: u8,
    mask: K,
    network: K,
    policy: PolicyId,
) -> Result<(), PolicyId>
where
    K: Copy + Eq + std::hash::Hash,
{
    let at = match levels.iter().position(|l| l.prefix <= prefix) {
        Some(i) if levels[i].prefix == prefix => i,
        Some(i) => {
            levels.insert(
                i,
                Level {
                    prefix,
                    mask,
                    blocks: FxHashMap::default(),
                },
            );
            i
        }
        None => {
            levels.push(Level {
                prefix,
                mask,
                blocks: FxHashMap::default(),
            });
            levels.len() - 1
        }
    };
    match levels[at].blocks.entry(network) {
        std::collections::hash_map::Entry::Occupied(taken) => Err(*taken.get()),
        std::collections::hash_map::Entry::Vacant(slot) => {
            slot.insert(policy);
            Ok(())
        }
    }
}

fn find<K>(levels: &[Level<K>], ip: K) -> Option<PolicyId>
where
    K: Copy + Eq + std::hash::Hash + std::ops::BitAnd<Output = K>,
{
    levels
        .iter()
        .find_map(|level| level.blocks.get(&(ip & level.mask)).copied())
}

/// One policy at run time: its name, where its list comes from and the
/// list it has in force.
#[derive(Debug)]
pub struct Policy {
    pub name: PolicyName,
    pub source: Source,
    pub live: Arc<Live>,
}

/// Every policy, the default first, and the table that picks one.
#[derive(Debug)]
pub struct Policies {
    table: SourceTable,
    all: Vec<Policy>,
}

impl Policies {
    /// `all[0]` is the default policy; `table` maps to indices into `all`.
    pub fn new(table: SourceTable, all: Vec<Policy>) -> Policies {
        assert!(!all.is_empty(), "the default policy is always there");
        Policies { table, all }
    }

    /// Only a default policy, on `live`.
    pub fn single(source: Source, live: Arc<Live>) -> Policies {
        let default = Policy {
            name: PolicyName::default_policy(),
            source,
            live,
        };
        Policies::new(SourceTable::default(), vec![default])
    }

    pub fn policy_of(&self, ip: IpAddr) -> PolicyId {
        self.table.policy_of(ip)
    }

    pub fn get(&self, id: PolicyId) -> &Policy {
        // An id only comes from this table, so it is always in range; the
        // default is the safe answer all the same.
        self.all.get(id.index()).unwrap_or(&self.all[0])
    }

    /// The list `id` decides with now, or `None` while it has none.
    pub fn in_force(&self, id: PolicyId) -> Option<Guard<Arc<InForce>>> {
        let live = &self.get(id).live;
        live.is_loaded().then(|| live.current())
    }

    pub fn iter(&self) -> impl Iterator<Item = &Policy> {
        self.all.iter()
    }

    /// Whether every policy has a list in force.
    pub fn all_loaded(&self) -> bool {
        self.all.iter().all(|p| p.live.is_loaded())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_blocks_and_refuses_host_bits_and_nonsense() {
        assert_eq!(cidr("192.0.2.0/24").to_string(), "192.0.2.0/24");
        assert_eq!(cidr("192.0.2.7").to_string(), "192.0.2.7/32");
        assert_eq!(cidr("2001:db8::/32").to_string(), "2001:db8::/32");
        assert_eq!(cidr("0.0.0.0/0").prefix(), 0);
        assert_eq!(cidr("::/0").prefix(), 0);
        assert_eq!(
            "192.0.2.7/24".parse::<Cidr>().unwrap_err().to_string(),
            "192.0.2.7/24: the bits after the prefix must be zero (did you mean 192.0.2.0/24?)"
        );
        for bad in [
            "",
            "/24",
            "192.0.2.0/",
            "192.0.2.0/33",
            "2001:db8::/129",
            "192.0.2.0/+8",
            "192.0.2.0/0024",
            "192.0.2.0/24/8",
            "example.com/24",
            " 192.0.2.0/24",
            "192.0.2/24",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn contains_holds_mapped_addresses_and_keeps_families_apart() {
        let block = cidr("192.0.2.128/25");
        assert!(block.contains(ip("192.0.2.130")));
        assert!(block.contains(ip("::ffff:192.0.2.130")));
        assert!(!block.contains(ip("192.0.2.127")));
        assert!(cidr("::/0").contains(ip("2001:db8::1")));
        assert!(!cidr("::/0").contains(ip("192.0.2.1")));
        assert!(!cidr("0.0.0.0/0").contains(ip("2001:db8::1")));
    }

    #[test]
    fn the_most_specific_block_wins_and_the_rest_is_default() {
        let (ci, one, v6, all4) = (PolicyId(1), PolicyId(2), PolicyId(3), PolicyId(4));
        let mut t = SourceTable::default();
        t.insert(cidr("192.0.2.128/25"), ci).unwrap();
        t.insert(cidr("192.0.2.131"), one).unwrap();
        t.insert(cidr("2001:db8:1:0:8000::/65"), v6).unwrap();
        assert_eq!(t.policy_of(ip("192.0.2.130")), ci);
        assert_eq!(t.policy_of(ip("192.0.2.255")), ci);
        assert_eq!(t.policy_of(ip("192.0.2.131")), one);
        assert_eq!(t.policy_of(ip("::ffff:192.0.2.131")), one);
        assert_eq!(t.policy_of(ip("192.0.2.2")), PolicyId::DEFAULT);
        assert_eq!(t.policy_of(ip("2001:db8:1:0:8000::2")), v6);
        assert_eq!(t.policy_of(ip("2001:db8:1::2")), PolicyId::DEFAULT);
        // Inserted in any order, the longer prefix is still tried first.
        t.insert(cidr("0.0.0.0/0"), all4).unwrap();
        assert_eq!(t.policy_of(ip("198.51.100.1")), all4);
        assert_eq!(t.policy_of(ip("192.0.2.131")), one);
        assert_eq!(t.policy_of(ip("192.0.2.129")), ci);
        assert_eq!(t.policy_of(ip("2001:db8::1")), PolicyId::DEFAULT);
    }

    #[test]
    fn a_block_belongs_to_one_policy() {
        let mut t = SourceTable::default();
        t.insert(cidr("192.0.2.0/25"), PolicyId(1)).unwrap();
        assert_eq!(
            t.insert(cidr("192.0.2.0/25"), PolicyId(2)),
            Err(PolicyId(1))
        );
        // The same network with another prefix is another block.
        t.insert(cidr("192.0.2.0/24"), PolicyId(2)).unwrap();
    }

    #[test]
    fn agrees_with_a_linear_scan_over_random_blocks() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut t = SourceTable::default();
        let mut blocks = Vec::new();
        for i in 1..=200u16 {
            let prefix = rng.u8(8..=32);
            let network = IpAddr::V4(Ipv4Addr::from(rng.u32(..) & mask32(prefix) & 0x0fff_ffff));
            let block = Cidr::new(network, prefix).unwrap();
            if t.insert(block, PolicyId(i)).is_ok() {
                blocks.push((block, PolicyId(i)));
            }
        }
        for _ in 0..20_000 {
            let probe = IpAddr::V4(Ipv4Addr::from(rng.u32(..) & 0x0fff_ffff));
            let expected = blocks
                .iter()
                .filter(|(b, _)| b.contains(probe))
                .max_by_key(|(b, _)| b.prefix())
                .map_or(PolicyId::DEFAULT, |(_, p)| *p);
            assert_eq!(t.policy_of(probe), expected, "{probe}");
        }
    }

    #[test]
    fn names_are_short_label_safe_and_not_default() {
        for good in ["ci", "payments-prod", "team_7", "0day"] {
            assert_eq!(good.parse::<PolicyName>().unwrap().as_str(), good);
        }
        for bad in [
            "",
            "CI",
            "-ci",
            "_ci",
            "ci.prod",
            "ci prod",
            "ci\"",
            &"a".repeat(33),
        ] {
            assert!(bad.parse::<PolicyName>().is_err(), "{bad:?}");
        }
        assert_eq!(
            "default".parse::<PolicyName>(),
            Err(PolicyNameError::Default)
        );
    }

    proptest! {
        #[test]
        fn parsing_never_panics(text in "[0-9a-f:./]{0,48}") {
            let _ = text.parse::<Cidr>();
        }

        /// A block prints as it parses, and holds exactly the addresses
        /// that share its prefix.
        #[test]
        fn blocks_round_trip_and_contain_their_prefix(
            raw in any::<u128>(),
            v4 in any::<bool>(),
            prefix in 0u8..=128,
            probe in any::<u128>(),
        ) {
            let (network, prefix, same) = if v4 {
                let p = prefix % 33;
                let (n, q) = (raw as u32 & mask32(p), probe as u32);
                (IpAddr::V4(n.into()), p, q & mask32(p) == n)
            } else {
                let (n, q) = (raw & mask128(prefix), probe);
                (IpAddr::V6(n.into()), prefix, q & mask128(prefix) == n)
            };
            let block = Cidr::new(network, prefix).unwrap();
            prop_assert_eq!(block.to_string().parse::<Cidr>(), Ok(block));
            let probe = if v4 { IpAddr::V4((probe as u32).into()) } else { IpAddr::V6(probe.into()) };
            prop_assert_eq!(block.contains(probe), same);
        }
    }
}
