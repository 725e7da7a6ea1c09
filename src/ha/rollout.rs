//! One AZ at a time: a rollout's new gateway says it is ready only once
//! every AZ before its own (in name order, the order the Terraform module
//! staggers instance lifetimes in) is served by the new release.
//!
//! Each AZ's auto-scaling group refreshes on its own, so one apply starts
//! them all together. Held at its launch hook, a later AZ's new gateway
//! waits until an earlier AZ's new gateway has taken that AZ's routes and
//! kept them for the soak time. A release that never gets ready in the
//! first AZ is never said ready anywhere: every later AZ's launch hook
//! times out, its group abandons the instance and rolls back, and the old
//! gateways go on serving.
//!
//! A gateway is part of a rollout when its AZ still runs a gateway of
//! another release (`portcullis:release`). One whose AZ has none (a first
//! deployment, the replacement of a dead instance) or that carries no
//! release tag is never held: capacity comes back at once.

use super::fleet::{Az, Fleet, InstanceId, Layout, Millis};
use super::serving::{azs, candidate};
use std::time::Duration;

/// How long an earlier AZ must have been served by the new release.
pub const SOAK: Duration = Duration::from_secs(60);

/// What one reading says of this gateway's rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reading {
    /// Not part of a rollout, or the first AZ: nothing to wait for.
    Free,
    /// Every earlier AZ with gateways is served by this release.
    Clear,
    /// This earlier AZ is not served by this release yet.
    Behind(Az),
}

/// The pure rule, for one reading; `None` while the reading does not
/// show this gateway yet.
pub fn read(layout: &Layout, fleet: &Fleet, me: &InstanceId, now: Millis) -> Option<Reading> {
    let mine = fleet.gateway(me)?;
    let Some(release) = mine.release.as_deref() else {
        return Some(Reading::Free);
    };
    let rolling = fleet.gateways.iter().any(|g| {
        g.az == mine.az && g.id != mine.id && g.running && g.release.as_deref() != Some(release)
    });
    if !rolling {
        return Some(Reading::Free);
    }
    let mut reading = Reading::Free;
    for az in azs(layout, fleet)
        .into_iter()
        .take_while(|az| **az != mine.az)
    {
        let present = fleet
            .gateways
            .iter()
            .any(|g| &g.az == az && (g.running || g.booting));
        if !present {
            continue;
        }
        let served = fleet
            .routes
            .iter()
            .filter(|r| layout.az_of(&r.table) == Some(az))
            .any(|r| {
                fleet.holder(&r.target).is_some_and(|h| {
                    &h.az == az && h.release.as_deref() == Some(release) && candidate(h, now)
                })
            });
        if !served {
            return Some(Reading::Behind(az.clone()));
        }
        reading = Reading::Clear;
    }
    Some(reading)
}

/// Whether this gateway may say it is ready for the first time. Once it
/// has, it is not held again.
#[derive(Debug, Clone)]
pub struct Gate {
    soak: Duration,
    /// Since when every earlier AZ has been served, without a break.
    clear_since: Option<Millis>,
    open: bool,
    waiting_for: Option<Az>,
}

impl Gate {
    pub fn new(soak: Duration) -> Gate {
        Gate {
            soak,
            clear_since: None,
            open: false,
            waiting_for: None,
        }
    }

    pub fn update(&mut self, layout: &Layout, fleet: &Fleet, me: &InstanceId, now: Millis) {
        if self.open {
            return;
        }
        match read(layout, fleet, me, now) {
            None => {}
            Some(Reading::Free) => self.open = true,
            Some(Reading::Clear) => {
                let since = *self.clear_since.get_or_insert(now);
                self.open = now.since(since) >= self.soak;
                self.waiting_for = None;
            }
            Some(Reading::Behind(az)) => {
                self.clear_since = None;
                self.waiting_for = Some(az);
            }
        }
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    /// The earlier AZ the rollout waits on, if it does.
    pub fn waiting_for(&self) -> Option<&Az> {
        self.waiting_for.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::super::fleet::{EniId, Family, Gateway, Phase, Route, RouteTableId, Stated, Target};
    use super::*;

    fn gw(id: &str, az: &str, release: &str, ready: bool) -> Gateway {
        Gateway {
            release: Some(release.into()),
            state: ready.then_some(Stated {
                phase: Phase::Ready,
                since: Millis(0),
            }),
            ..Gateway::sample(&format!("i-{id}"), az, &format!("eni-{id}"))
        }
    }

    fn route(az: &str, to: &str) -> Route {
        Route {
            table: RouteTableId(format!("rtb-{az}")),
            family: Family::V4,
            target: Target::Eni(EniId(format!("eni-{to}"))),
        }
    }

    fn layout() -> Layout {
        let tables = ["a", "b", "c"]
            .iter()
            .map(|az| (Az((*az).into()), vec![RouteTableId(format!("rtb-{az}"))]))
            .collect();
        Layout {
            tables,
            ipv6: false,
        }
    }

    /// Three AZs on release 1, each with a new release-2 gateway booted
    /// beside the old: what one apply does.
    fn apply() -> Fleet {
        let mut gateways = Vec::new();
        for az in ["a", "b", "c"] {
            gateways.push(gw(&format!("{az}1"), az, "r1", true));
            gateways.push(gw(&format!("{az}2"), az, "r2", false));
        }
        Fleet {
            gateways,
            routes: vec![route("a", "a1"), route("b", "b1"), route("c", "c1")],
        }
    }

    fn me(id: &str) -> InstanceId {
        InstanceId(format!("i-{id}"))
    }

    fn az(name: &str) -> Az {
        Az(name.into())
    }

    #[test]
    fn first_az_rolls_at_once_and_later_ones_wait_for_the_one_before() {
        let fleet = apply();
        let now = Millis(1_000);
        assert_eq!(read(&layout(), &fleet, &me("a2"), now), Some(Reading::Free));
        assert_eq!(
            read(&layout(), &fleet, &me("b2"), now),
            Some(Reading::Behind(az("a")))
        );
        assert_eq!(
            read(&layout(), &fleet, &me("c2"), now),
            Some(Reading::Behind(az("a")))
        );
    }

    #[test]
    fn an_az_counts_as_rolled_once_a_ready_new_gateway_holds_its_route() {
        let mut fleet = apply();
        let l = layout();
        let now = Millis(1_000);
        // Ready but not yet holding: the old one still serves AZ a.
        fleet.gateways[1].state = Some(Stated {
            phase: Phase::Ready,
            since: Millis(0),
        });
        assert_eq!(
            read(&l, &fleet, &me("b2"), now),
            Some(Reading::Behind(az("a")))
        );
        fleet.routes[0] = route("a", "a2");
        assert_eq!(read(&l, &fleet, &me("b2"), now), Some(Reading::Clear));
        assert_eq!(
            read(&l, &fleet, &me("c2"), now),
            Some(Reading::Behind(az("b")))
        );
        // A new gateway that is down does not count, even holding.
        fleet.gateways[1].state = Some(Stated {
            phase: Phase::Down,
            since: Millis(0),
        });
        assert_eq!(
            read(&l, &fleet, &me("b2"), now),
            Some(Reading::Behind(az("a")))
        );
    }

    #[test]
    fn no_rollout_no_wait() {
        let l = layout();
        let now = Millis(1_000);
        // A replacement of a dead gateway: its AZ runs nothing else.
        let mut fleet = apply();
        fleet.gateways.retain(|g| g.id != me("b1"));
        assert_eq!(read(&l, &fleet, &me("b2"), now), Some(Reading::Free));
        // A stopped old gateway does not count as running.
        let mut fleet = apply();
        fleet.gateways[2].running = false;
        assert_eq!(read(&l, &fleet, &me("b2"), now), Some(Reading::Free));
        // No release tag: nothing to compare.
        let mut fleet = apply();
        fleet.gateways[3].release = None;
        assert_eq!(read(&l, &fleet, &me("b2"), now), Some(Reading::Free));
        // An earlier AZ with no gateway at all is skipped.
        let mut fleet = apply();
        fleet.gateways.retain(|g| g.az != az("a"));
        fleet.routes.remove(0);
        assert_eq!(read(&l, &fleet, &me("b2"), now), Some(Reading::Free));
    }

    #[test]
    fn gate_opens_after_the_soak_and_a_break_starts_it_again() {
        let l = layout();
        let mut fleet = apply();
        fleet.gateways[1].state = Some(Stated {
            phase: Phase::Ready,
            since: Millis(0),
        });
        let mut gate = Gate::new(Duration::from_secs(60));
        gate.update(&l, &fleet, &me("b2"), Millis(0));
        assert!(!gate.is_open());
        assert_eq!(gate.waiting_for(), Some(&az("a")));
        fleet.routes[0] = route("a", "a2");
        gate.update(&l, &fleet, &me("b2"), Millis(10_000));
        gate.update(&l, &fleet, &me("b2"), Millis(69_000));
        assert!(!gate.is_open(), "59 s of the soak");
        // AZ a's new gateway falls over: the soak starts again.
        fleet.routes[0] = route("a", "a1");
        gate.update(&l, &fleet, &me("b2"), Millis(70_000));
        fleet.routes[0] = route("a", "a2");
        gate.update(&l, &fleet, &me("b2"), Millis(72_000));
        gate.update(&l, &fleet, &me("b2"), Millis(131_000));
        assert!(!gate.is_open());
        gate.update(&l, &fleet, &me("b2"), Millis(132_000));
        assert!(gate.is_open());
        assert_eq!(gate.waiting_for(), None);
        // Once open it stays open, whatever AZ a does next.
        fleet.routes[0] = route("a", "a1");
        gate.update(&l, &fleet, &me("b2"), Millis(140_000));
        assert!(gate.is_open());
    }

    #[test]
    fn free_gateway_opens_on_its_first_reading_that_shows_it() {
        let mut gate = Gate::new(SOAK);
        let mut fleet = apply();
        fleet.gateways.retain(|g| g.id != me("a2"));
        gate.update(&layout(), &fleet, &me("a2"), Millis(0));
        assert!(
            !gate.is_open(),
            "a reading without this gateway says nothing"
        );
        gate.update(&layout(), &apply(), &me("a2"), Millis(0));
        assert!(gate.is_open());
    }
}
