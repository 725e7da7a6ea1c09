//! The fleet as the EC2 API shows it: the gateways, what each has said of
//! itself in its tags, and where each private route table's default route
//! points. Pure values; `ec2` fills them in, `decide` reads them.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

/// Unix time in milliseconds: what the HA tags carry, so that every
/// gateway reads the same instant from the same tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Millis(pub u64);

impl Millis {
    pub fn now() -> Millis {
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Millis(u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn plus(self, d: std::time::Duration) -> Millis {
        let d = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Millis(self.0.saturating_add(d))
    }

    /// How long after `earlier` this is; zero if it is not after.
    pub fn since(self, earlier: Millis) -> std::time::Duration {
        std::time::Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

macro_rules! id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub String);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id!(
    /// `i-0123…`
    InstanceId
);
id!(
    /// An availability zone's name, `us-east-1a`.
    Az
);
id!(
    /// `eni-0123…`: what a gateway's routes point at.
    EniId
);
id!(
    /// `rtb-0123…`
    RouteTableId
);

/// What a gateway last said of itself (`portcullis:state`): written when it
/// becomes ready, when its own checks fail, and when it is leaving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stated {
    pub phase: Phase,
    pub since: Millis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Serving, or able to: its proxy is ready and reaches the internet.
    Ready,
    /// Its own checks fail: it must not be routed to.
    Down,
    /// Being replaced or shut down: it hands its routes over, then drains.
    Leaving,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Phase::Ready => "ready",
            Phase::Down => "down",
            Phase::Leaving => "leaving",
        }
    }
}

/// A sibling's "are you alive?" (`portcullis:challenge`), written on the
/// suspect by a gateway whose probes of it fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub at: Millis,
    pub by: InstanceId,
}

/// Tag keys. Values are short and parsed strictly: a tag that does not
/// parse counts as absent.
pub const TAG_STATE: &str = "portcullis:state";
pub const TAG_ALIVE: &str = "portcullis:alive";
pub const TAG_CHALLENGE: &str = "portcullis:challenge";
/// What the instance was launched to run (written by the deployment, e.g.
/// the Terraform module's hash of the AMI and the settings): a gateway
/// whose AZ still runs another release is part of a rollout.
pub const TAG_RELEASE: &str = "portcullis:release";

impl Stated {
    /// `ready@1764601200000`
    pub fn to_tag(self) -> String {
        format!("{}@{}", self.phase.as_str(), self.since.0)
    }

    pub fn from_tag(value: &str) -> Option<Stated> {
        let (phase, since) = value.split_once('@')?;
        let phase = match phase {
            "ready" => Phase::Ready,
            "down" => Phase::Down,
            "leaving" => Phase::Leaving,
            _ => return None,
        };
        Some(Stated {
            phase,
            since: Millis(since.parse().ok()?),
        })
    }
}

impl Challenge {
    /// `1764601200000 i-0123…`
    pub fn to_tag(&self) -> String {
        format!("{} {}", self.at.0, self.by)
    }

    pub fn from_tag(value: &str) -> Option<Challenge> {
        let (at, by) = value.split_once(' ')?;
        if !by.starts_with("i-") {
            return None;
        }
        Some(Challenge {
            at: Millis(at.parse().ok()?),
            by: InstanceId(by.to_owned()),
        })
    }
}

pub fn alive_from_tag(value: &str) -> Option<Millis> {
    value.parse().ok().map(Millis)
}

/// One instance tagged as a gateway of this fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gateway {
    pub id: InstanceId,
    pub az: Az,
    /// The primary interface: where routes point.
    pub eni: EniId,
    /// Where siblings probe it.
    pub ip: Option<IpAddr>,
    /// Its primary interface's IPv6 address, if it has one: where a
    /// hand-off sends IPv6 flows.
    pub ip6: Option<std::net::Ipv6Addr>,
    pub launched: Millis,
    /// EC2's own state is `running` (not pending, stopping, terminated).
    pub running: bool,
    /// EC2's state is `pending`: launching.
    pub booting: bool,
    /// Its auto-scaling group (the `aws:autoscaling:groupName` tag).
    pub group: Option<String>,
    /// `portcullis:release`, if the deployment tags it.
    pub release: Option<String>,
    pub state: Option<Stated>,
    pub alive: Option<Millis>,
    pub challenge: Option<Challenge>,
}

#[cfg(test)]
impl Gateway {
    /// A running gateway that has said nothing of itself yet.
    pub fn sample(id: &str, az: &str, eni: &str) -> Gateway {
        Gateway {
            id: InstanceId(id.into()),
            az: Az(az.into()),
            eni: EniId(eni.into()),
            ip: None,
            ip6: None,
            launched: Millis(0),
            running: true,
            booting: false,
            group: None,
            release: None,
            state: None,
            alive: None,
            challenge: None,
        }
    }
}

/// Which default route of a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn destination(self) -> &'static str {
        match self {
            Family::V4 => "0.0.0.0/0",
            Family::V6 => "::/0",
        }
    }
}

/// Where a default route points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Eni(EniId),
    /// The table has no such route.
    Missing,
    /// A NAT or internet gateway, an instance id without an interface, or
    /// a route EC2 shows as a blackhole: no gateway of ours serves it.
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub table: RouteTableId,
    pub family: Family,
    pub target: Target,
}

/// Which private route tables belong to which AZ, and which default
/// routes the fleet owns: from the gateway's HA config, the same on every
/// gateway.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Layout {
    pub tables: BTreeMap<Az, Vec<RouteTableId>>,
    pub ipv6: bool,
}

impl Layout {
    pub fn az_of(&self, table: &RouteTableId) -> Option<&Az> {
        self.tables
            .iter()
            .find(|(_, tables)| tables.contains(table))
            .map(|(az, _)| az)
    }

    pub fn families(&self) -> &'static [Family] {
        if self.ipv6 {
            &[Family::V4, Family::V6]
        } else {
            &[Family::V4]
        }
    }

    pub fn all_tables(&self) -> impl Iterator<Item = &RouteTableId> {
        self.tables.values().flatten()
    }
}

/// One reading of the EC2 API.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fleet {
    pub gateways: Vec<Gateway>,
    pub routes: Vec<Route>,
}

impl Fleet {
    pub fn gateway(&self, id: &InstanceId) -> Option<&Gateway> {
        self.gateways.iter().find(|g| &g.id == id)
    }

    pub fn holder(&self, target: &Target) -> Option<&Gateway> {
        match target {
            Target::Eni(eni) => self.gateways.iter().find(|g| &g.eni == eni),
            Target::Missing | Target::Other(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip_and_garbage_reads_as_absent() {
        let s = Stated {
            phase: Phase::Leaving,
            since: Millis(1_764_601_200_000),
        };
        assert_eq!(Stated::from_tag(&s.to_tag()), Some(s));
        let c = Challenge {
            at: Millis(5),
            by: InstanceId("i-0abc".into()),
        };
        assert_eq!(Challenge::from_tag(&c.to_tag()), Some(c));
        for bad in ["", "ready", "ready@", "ready@x", "up@5", "@5", "ready@-1"] {
            assert_eq!(Stated::from_tag(bad), None, "{bad:?}");
        }
        for bad in ["", "5", "5 ", "x i-1", "5 eni-1"] {
            assert_eq!(Challenge::from_tag(bad), None, "{bad:?}");
        }
        assert_eq!(alive_from_tag("12"), Some(Millis(12)));
        assert_eq!(alive_from_tag("soon"), None);
    }

    #[test]
    fn time_arithmetic_saturates() {
        assert_eq!(Millis(5).since(Millis(9)), std::time::Duration::ZERO);
        assert_eq!(
            Millis(u64::MAX).plus(std::time::Duration::from_secs(1)),
            Millis(u64::MAX)
        );
    }
}
