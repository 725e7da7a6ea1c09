//! Who serves each AZ, decided the same way on every gateway from what the
//! EC2 API says. No I/O: the agent feeds in probe results and fleet
//! readings, and carries out the plan.
//!
//! # The rule
//! - A gateway is a *candidate* while EC2 says it is running, its own
//!   `portcullis:state` says `ready`, and it is not *dead*: dead is a
//!   challenge (`portcullis:challenge`, written by a sibling whose probes of
//!   it fail) left unanswered for [`ANSWER_WINDOW`].
//! - An AZ's gateways rank first for its routes, oldest first; then the
//!   other AZs' in turn, the AZ after it first.
//! - A route stays with its holder while the holder is a candidate
//!   (stickiness is the hysteresis); a better-ranked candidate takes it only
//!   once it has been ready for [`SETTLE`]. A route whose holder is not a
//!   candidate goes to the best-ranked candidate at once.
//! - Each gateway only ever moves routes to itself, and only when the rule
//!   names it.
//!
//! Two healthy gateways that cannot reach each other both challenge, both
//! answer through the API, and neither is dead: no route moves.

use super::fleet::{
    Az, Challenge, Family, Fleet, Gateway, InstanceId, Layout, Millis, Phase, Route, RouteTableId,
    Stated, Target,
};
use super::rollout::{self, Gate};
use super::serving::{azs, candidate, dead, pending};
use std::collections::HashMap;
use std::time::Duration;

/// How long a gateway must have been ready before it takes a route from a
/// live holder: a gateway that flaps does not drag routes with it.
pub const SETTLE: Duration = Duration::from_secs(10);
/// Failed probes in a row before a sibling is challenged.
pub const SUSPECT_AFTER: u32 = 3;
/// Own checks: failures in a row before this gateway says it is down, and
/// passes in a row before it says it is ready again.
pub const DOWN_AFTER: u32 = 3;
pub const UP_AFTER: u32 = 2;
/// After a challenge is answered while probes still fail (the two cannot
/// see each other), the next one waits this long, doubling up to the cap.
pub const CHALLENGE_BACKOFF: Duration = Duration::from_secs(30);
pub const CHALLENGE_BACKOFF_MAX: Duration = Duration::from_secs(600);
/// How often the agent reads the fleet, and probes its siblings.
pub const POLL_EVERY: Duration = Duration::from_secs(2);
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// What this gateway wants to say of itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wanted {
    /// Not yet ready once: says nothing, is never routed to.
    Starting,
    Ready,
    Down,
    Leaving,
}

/// Why a route moves; the label of the route-move counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveReason {
    /// Its holder is dead, down or gone.
    Failover,
    /// Its holder is leaving (a rollout, a shutdown).
    Handover,
    /// A better-ranked gateway is back: the AZ's own, after a failover.
    Giveback,
    /// It pointed at no gateway of the fleet (missing, a NAT gateway put
    /// back by someone's Terraform): the serving gateway re-asserts it.
    Reclaim,
}

impl MoveReason {
    pub fn as_str(self) -> &'static str {
        match self {
            MoveReason::Failover => "failover",
            MoveReason::Handover => "handover",
            MoveReason::Giveback => "giveback",
            MoveReason::Reclaim => "reclaim",
        }
    }
}

/// Point one default route at this gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Take {
    pub table: RouteTableId,
    pub family: Family,
    pub reason: MoveReason,
    /// The route's target before: for the log line.
    pub from: Target,
    /// Whether the table has the route at all (replace, or create).
    pub exists: bool,
}

/// Tags to write on this gateway's own instance.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Publish {
    pub state: Option<Stated>,
    pub alive: Option<Millis>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub publish: Option<Publish>,
    pub challenges: Vec<InstanceId>,
    pub takes: Vec<Take>,
}

#[derive(Debug, Clone, Default)]
struct Peer {
    failures: u32,
    /// No new challenge before this.
    quiet_until: Option<Millis>,
    backoff: Option<Duration>,
}

/// One gateway's memory: its own checks, its probes of siblings, the
/// challenges it sent.
#[derive(Debug)]
pub struct Brain {
    me: InstanceId,
    layout: Layout,
    wanted: Wanted,
    passes: u32,
    failures: u32,
    peers: HashMap<InstanceId, Peer>,
    rollout: Gate,
}

impl Brain {
    pub fn new(me: InstanceId, layout: Layout) -> Brain {
        Brain {
            me,
            layout,
            wanted: Wanted::Starting,
            passes: 0,
            failures: 0,
            peers: HashMap::new(),
            rollout: Gate::new(rollout::SOAK),
        }
    }

    /// How long an earlier AZ must have been served by a new release
    /// before this gateway, part of the rollout, says it is ready.
    pub fn with_rollout_soak(mut self, soak: Duration) -> Brain {
        self.rollout = Gate::new(soak);
        self
    }

    /// The earlier AZ whose rollout this gateway waits on, if it does.
    pub fn rollout_waits_for(&self) -> Option<&Az> {
        self.rollout.waiting_for()
    }

    pub fn me(&self) -> &InstanceId {
        &self.me
    }

    /// This gateway's own check: its proxy ready, the internet reachable.
    pub fn self_check(&mut self, ok: bool) {
        if ok {
            self.passes = self.passes.saturating_add(1);
            self.failures = 0;
        } else {
            self.failures = self.failures.saturating_add(1);
            self.passes = 0;
        }
        self.wanted = match self.wanted {
            Wanted::Leaving => Wanted::Leaving,
            Wanted::Starting | Wanted::Down if self.passes >= UP_AFTER => Wanted::Ready,
            Wanted::Ready if self.failures >= DOWN_AFTER => Wanted::Down,
            other => other,
        };
    }

    /// From now on this gateway hands its routes over and takes none.
    pub fn leave(&mut self) {
        self.wanted = Wanted::Leaving;
    }

    pub fn is_leaving(&self) -> bool {
        self.wanted == Wanted::Leaving
    }

    /// Whether its own checks pass (after their hysteresis).
    pub fn is_ready(&self) -> bool {
        self.wanted == Wanted::Ready
    }

    pub fn probe(&mut self, sibling: &InstanceId, ok: bool) {
        let peer = self.peers.entry(sibling.clone()).or_default();
        if ok {
            *peer = Peer::default();
        } else {
            peer.failures = peer.failures.saturating_add(1);
        }
    }

    /// A sibling that is not a candidate (booting, down, dead) starts
    /// afresh once it is one again.
    pub fn forget(&mut self, sibling: &InstanceId) {
        self.peers.remove(sibling);
    }

    /// Siblings no longer in the fleet are forgotten.
    pub fn forget_gone(&mut self, fleet: &Fleet) {
        self.peers.retain(|id, _| fleet.gateway(id).is_some());
    }

    /// A challenge to `sibling` was written at `at`.
    pub fn challenged(&mut self, sibling: &InstanceId, at: Millis) {
        let peer = self.peers.entry(sibling.clone()).or_default();
        let backoff = peer
            .backoff
            .map_or(CHALLENGE_BACKOFF, |b| (b * 2).min(CHALLENGE_BACKOFF_MAX));
        peer.backoff = Some(backoff);
        peer.quiet_until = Some(at.plus(backoff));
    }

    pub fn plan(&mut self, fleet: &Fleet, now: Millis) -> Plan {
        self.rollout.update(&self.layout, fleet, &self.me, now);
        Plan {
            publish: self.publish(fleet, now),
            challenges: self.challenges(fleet, now),
            takes: self.takes(fleet, now),
        }
    }

    fn publish(&self, fleet: &Fleet, now: Millis) -> Option<Publish> {
        let mine = fleet.gateway(&self.me)?;
        let phase = |p| mine.state.is_some_and(|s| s.phase == p);
        let fresh = |phase| Stated { phase, since: now };
        match self.wanted {
            Wanted::Starting => None,
            // A rollout one AZ at a time: not ready before the AZ before
            // this one is served by this release (`rollout`).
            Wanted::Ready if mine.state.is_none() && !self.rollout.is_open() => None,
            Wanted::Down if !phase(Phase::Down) => Some(Publish {
                state: Some(fresh(Phase::Down)),
                alive: None,
            }),
            Wanted::Leaving if !phase(Phase::Leaving) => Some(Publish {
                state: Some(fresh(Phase::Leaving)),
                alive: None,
            }),
            Wanted::Down | Wanted::Leaving => None,
            Wanted::Ready => {
                // Answer above the challenge's own time, so a clock behind
                // the challenger's still answers it.
                let answer =
                    |c: Option<&Challenge>| Some(c.map_or(now, |c| Millis(now.0.max(c.at.0 + 1))));
                if !phase(Phase::Ready) || dead(mine, now) {
                    // Back from down, or from being declared dead: ready
                    // from now, so SETTLE applies before it takes back.
                    Some(Publish {
                        state: Some(fresh(Phase::Ready)),
                        alive: answer(mine.challenge.as_ref()),
                    })
                } else if pending(mine) {
                    Some(Publish {
                        state: None,
                        alive: answer(mine.challenge.as_ref()),
                    })
                } else {
                    None
                }
            }
        }
    }

    fn challenges(&self, fleet: &Fleet, now: Millis) -> Vec<InstanceId> {
        if !self.is_ready() || !fleet.gateway(&self.me).is_some_and(|g| candidate(g, now)) {
            return Vec::new();
        }
        fleet
            .gateways
            .iter()
            .filter(|g| g.id != self.me && candidate(g, now) && !pending(g))
            .filter(|g| {
                self.peers.get(&g.id).is_some_and(|p| {
                    p.failures >= SUSPECT_AFTER && p.quiet_until.is_none_or(|q| now >= q)
                })
            })
            .map(|g| g.id.clone())
            .collect()
    }

    fn takes(&self, fleet: &Fleet, now: Millis) -> Vec<Take> {
        let Some(mine) = fleet.gateway(&self.me) else {
            return Vec::new();
        };
        if !self.is_ready() || !candidate(mine, now) {
            return Vec::new();
        }
        fleet
            .routes
            .iter()
            .filter(|r| r.target != Target::Eni(mine.eni.clone()))
            .filter_map(|route| {
                let az = self.layout.az_of(&route.table)?;
                let owner = owner(&self.layout, fleet, az, route, now)?;
                (owner.id == self.me).then(|| Take {
                    table: route.table.clone(),
                    family: route.family,
                    reason: reason(fleet, route, now),
                    from: route.target.clone(),
                    exists: route.target != Target::Missing,
                })
            })
            .collect()
    }
}

fn settled(g: &Gateway, now: Millis) -> bool {
    g.state.is_some_and(|s| now.since(s.since) >= SETTLE)
}

/// The candidates for `az`'s routes, best first.
fn ranked<'f>(layout: &Layout, fleet: &'f Fleet, az: &Az, now: Millis) -> Vec<&'f Gateway> {
    let azs = azs(layout, fleet);
    let at = azs.iter().position(|a| *a == az).unwrap_or(0);
    let distance = |a: &Az| {
        let i = azs.iter().position(|x| *x == a).unwrap_or(0);
        (i + azs.len() - at) % azs.len().max(1)
    };
    let mut cands: Vec<&Gateway> = fleet
        .gateways
        .iter()
        .filter(|g| candidate(g, now))
        .collect();
    cands.sort_by(|a, b| {
        (distance(&a.az), a.launched, &a.id).cmp(&(distance(&b.az), b.launched, &b.id))
    });
    cands
}

/// Who should hold `route` (of `az`) now.
pub fn owner<'f>(
    layout: &Layout,
    fleet: &'f Fleet,
    az: &Az,
    route: &Route,
    now: Millis,
) -> Option<&'f Gateway> {
    let cands = ranked(layout, fleet, az, now);
    let held = cands
        .iter()
        .position(|g| Target::Eni(g.eni.clone()) == route.target);
    match held {
        Some(h) => cands[..h]
            .iter()
            .find(|g| settled(g, now))
            .or(cands.get(h))
            .copied(),
        None => cands.first().copied(),
    }
}

fn reason(fleet: &Fleet, route: &Route, now: Millis) -> MoveReason {
    match fleet.holder(&route.target) {
        None => MoveReason::Reclaim,
        Some(h) if h.state.is_some_and(|s| s.phase == Phase::Leaving) => MoveReason::Handover,
        Some(h) if candidate(h, now) => MoveReason::Giveback,
        Some(_) => MoveReason::Failover,
    }
}

/// How many candidates each AZ of the layout has: zero is an AZ served
/// from another AZ, or not at all (the alert's gauge).
pub fn candidates_by_az<'l>(
    layout: &'l Layout,
    fleet: &Fleet,
    now: Millis,
) -> std::collections::BTreeMap<&'l Az, usize> {
    layout
        .tables
        .keys()
        .map(|az| {
            let n = fleet
                .gateways
                .iter()
                .filter(|g| &g.az == az && candidate(g, now))
                .count();
            (az, n)
        })
        .collect()
}

/// Whether some configured route points at no candidate: the AZ is
/// black-holed or bypasses the fleet (the alert's gauge).
pub fn unserved(fleet: &Fleet, now: Millis) -> usize {
    fleet
        .routes
        .iter()
        .filter(|r| fleet.holder(&r.target).is_none_or(|g| !candidate(g, now)))
        .count()
}

#[cfg(test)]
mod tests {
    use super::super::fleet::EniId;
    use super::*;

    const T0: u64 = 1_764_600_000_000;

    fn at(secs: u64) -> Millis {
        Millis(T0 + secs * 1000)
    }

    fn gw(id: &str, az: &str, launched: u64) -> Gateway {
        Gateway {
            launched: at(launched),
            state: Some(Stated {
                phase: Phase::Ready,
                since: at(0),
            }),
            alive: Some(at(0)),
            ..Gateway::sample(&format!("i-{id}"), az, &format!("eni-{id}"))
        }
    }

    fn layout() -> Layout {
        let mut tables = std::collections::BTreeMap::new();
        tables.insert(Az("a".into()), vec![RouteTableId("rtb-a".into())]);
        tables.insert(Az("b".into()), vec![RouteTableId("rtb-b".into())]);
        Layout {
            tables,
            ipv6: false,
        }
    }

    fn route(table: &str, to: &str) -> Route {
        Route {
            table: RouteTableId(format!("rtb-{table}")),
            family: Family::V4,
            target: Target::Eni(EniId(format!("eni-{to}"))),
        }
    }

    /// Gateway a1 in AZ a, b1 in AZ b, each holding its own AZ.
    fn pair() -> Fleet {
        Fleet {
            gateways: vec![gw("a1", "a", 0), gw("b1", "b", 0)],
            routes: vec![route("a", "a1"), route("b", "b1")],
        }
    }

    fn ready_brain(id: &str) -> Brain {
        let mut brain = Brain::new(InstanceId(format!("i-{id}")), layout());
        for _ in 0..UP_AFTER {
            brain.self_check(true);
        }
        brain
    }

    fn fail_probes(brain: &mut Brain, sibling: &str, n: u32) {
        for _ in 0..n {
            brain.probe(&InstanceId(format!("i-{sibling}")), false);
        }
    }

    fn challenge(fleet: &mut Fleet, on: &str, by: &str, secs: u64) {
        let g = fleet
            .gateways
            .iter_mut()
            .find(|g| g.id.0 == format!("i-{on}"))
            .expect("gateway");
        g.challenge = Some(Challenge {
            at: at(secs),
            by: InstanceId(format!("i-{by}")),
        });
    }

    fn gateway_mut<'f>(fleet: &'f mut Fleet, id: &str) -> &'f mut Gateway {
        fleet
            .gateways
            .iter_mut()
            .find(|g| g.id.0 == format!("i-{id}"))
            .expect("gateway")
    }

    #[test]
    fn healthy_pair_moves_nothing_and_says_nothing() {
        let fleet = pair();
        for id in ["a1", "b1"] {
            assert_eq!(ready_brain(id).plan(&fleet, at(100)), Plan::default());
        }
        assert_eq!(unserved(&fleet, at(100)), 0);
    }

    #[test]
    fn silent_sibling_is_challenged_then_its_az_taken_after_the_window() {
        let mut fleet = pair();
        let mut b1 = ready_brain("b1");
        fail_probes(&mut b1, "a1", SUSPECT_AFTER - 1);
        assert!(b1.plan(&fleet, at(100)).challenges.is_empty(), "too soon");
        fail_probes(&mut b1, "a1", 1);
        let plan = b1.plan(&fleet, at(100));
        assert_eq!(plan.challenges, vec![InstanceId("i-a1".into())]);
        assert!(plan.takes.is_empty(), "a challenge is not a verdict");
        b1.challenged(&InstanceId("i-a1".into()), at(100));
        challenge(&mut fleet, "a1", "b1", 100);

        // Within the window: a1 may still answer.
        let plan = b1.plan(&fleet, at(105));
        assert!(plan.takes.is_empty() && plan.challenges.is_empty());
        assert_eq!(unserved(&fleet, at(105)), 0);

        // Window over, no answer: a1 is dead and b1 takes AZ a.
        let plan = b1.plan(&fleet, at(106));
        assert_eq!(
            plan.takes,
            vec![Take {
                table: RouteTableId("rtb-a".into()),
                family: Family::V4,
                reason: MoveReason::Failover,
                from: Target::Eni(EniId("eni-a1".into())),
                exists: true,
            }]
        );
        assert_eq!(unserved(&fleet, at(106)), 1);
    }

    #[test]
    fn answered_challenge_keeps_routes_where_they_are_and_backs_off() {
        // The split: both are healthy and cannot see each other.
        let mut fleet = pair();
        let mut a1 = ready_brain("a1");
        let mut b1 = ready_brain("b1");
        fail_probes(&mut a1, "b1", SUSPECT_AFTER);
        fail_probes(&mut b1, "a1", SUSPECT_AFTER);
        for (brain, target) in [(&mut a1, "b1"), (&mut b1, "a1")] {
            let plan = brain.plan(&fleet, at(100));
            assert_eq!(plan.challenges, vec![InstanceId(format!("i-{target}"))]);
            brain.challenged(&InstanceId(format!("i-{target}")), at(100));
        }
        challenge(&mut fleet, "a1", "b1", 100);
        challenge(&mut fleet, "b1", "a1", 100);

        // Each answers the challenge on itself, above its time.
        for (brain, own) in [(&mut a1, "a1"), (&mut b1, "b1")] {
            let plan = brain.plan(&fleet, at(102));
            assert_eq!(
                plan.publish,
                Some(Publish {
                    state: None,
                    alive: Some(at(102))
                })
            );
            gateway_mut(&mut fleet, own).alive = Some(at(102));
        }
        for t in [106, 120, 129] {
            for brain in [&mut a1, &mut b1] {
                assert_eq!(brain.plan(&fleet, at(t)), Plan::default(), "at +{t}s");
            }
        }
        // Probes still fail: the next challenge waits for the backoff, and
        // the one after that twice as long.
        fail_probes(&mut b1, "a1", 5);
        assert_eq!(b1.plan(&fleet, at(130)).challenges.len(), 1);
        b1.challenged(&InstanceId("i-a1".into()), at(130));
        assert!(b1.plan(&fleet, at(189)).challenges.is_empty());
        assert_eq!(b1.plan(&fleet, at(190)).challenges.len(), 1);
    }

    #[test]
    fn answer_is_above_a_challenge_from_a_clock_ahead() {
        let mut fleet = pair();
        challenge(&mut fleet, "a1", "b1", 200);
        let plan = ready_brain("a1").plan(&fleet, at(199));
        assert_eq!(
            plan.publish.and_then(|p| p.alive),
            Some(Millis(at(200).0 + 1))
        );
    }

    #[test]
    fn az_own_gateway_takes_back_only_after_settling() {
        let mut fleet = pair();
        fleet.routes[0] = route("a", "b1"); // b1 holds AZ a after a failover
        // a1 is back: ready since +100.
        gateway_mut(&mut fleet, "a1").state = Some(Stated {
            phase: Phase::Ready,
            since: at(100),
        });
        let mut a1 = ready_brain("a1");
        assert!(a1.plan(&fleet, at(109)).takes.is_empty(), "still settling");
        let takes = a1.plan(&fleet, at(110)).takes;
        assert_eq!(takes.len(), 1);
        assert_eq!(takes[0].reason, MoveReason::Giveback);
        // b1 computes the same owner and does not fight for it.
        assert!(ready_brain("b1").plan(&fleet, at(110)).takes.is_empty());
    }

    #[test]
    fn a_dead_gateway_back_on_its_feet_says_ready_afresh() {
        let mut fleet = pair();
        challenge(&mut fleet, "a1", "b1", 100);
        let plan = ready_brain("a1").plan(&fleet, at(130));
        assert_eq!(
            plan.publish,
            Some(Publish {
                state: Some(Stated {
                    phase: Phase::Ready,
                    since: at(130)
                }),
                alive: Some(at(130)),
            })
        );
        assert!(plan.takes.is_empty(), "dead until its answer is read back");
    }

    #[test]
    fn gateway_whose_own_checks_fail_says_down_and_is_taken_over_at_once() {
        let mut fleet = pair();
        let mut a1 = ready_brain("a1");
        for _ in 0..DOWN_AFTER - 1 {
            a1.self_check(false);
        }
        assert_eq!(
            a1.plan(&fleet, at(100)),
            Plan::default(),
            "one blip is not down"
        );
        a1.self_check(false);
        let down = Stated {
            phase: Phase::Down,
            since: at(100),
        };
        assert_eq!(
            a1.plan(&fleet, at(100)).publish,
            Some(Publish {
                state: Some(down),
                alive: None
            })
        );
        gateway_mut(&mut fleet, "a1").state = Some(down);
        // A gateway that is down challenges nobody and takes nothing.
        fail_probes(&mut a1, "b1", 10);
        assert_eq!(a1.plan(&fleet, at(101)), Plan::default());
        let takes = ready_brain("b1").plan(&fleet, at(100)).takes;
        assert_eq!(takes.len(), 1);
        assert_eq!(takes[0].reason, MoveReason::Failover);
        // Back up: it says so, and takes AZ a back once settled.
        a1.self_check(true);
        a1.self_check(true);
        assert_eq!(
            a1.plan(&fleet, at(120)).publish.and_then(|p| p.state),
            Some(Stated {
                phase: Phase::Ready,
                since: at(120)
            })
        );
    }

    #[test]
    fn half_up_sibling_that_answers_keeps_its_routes() {
        // b1's probes of a1 fail (its admin port is unreachable from b1),
        // but a1 answers through the API: the rule keeps AZ a where it is.
        let mut fleet = pair();
        let mut b1 = ready_brain("b1");
        fail_probes(&mut b1, "a1", 20);
        challenge(&mut fleet, "a1", "b1", 100);
        gateway_mut(&mut fleet, "a1").alive = Some(at(101));
        assert!(b1.plan(&fleet, at(200)).takes.is_empty());
    }

    #[test]
    fn sibling_that_is_not_running_holds_nothing() {
        let mut fleet = pair();
        gateway_mut(&mut fleet, "a1").running = false;
        let takes = ready_brain("b1").plan(&fleet, at(100)).takes;
        assert_eq!(takes.len(), 1);
        assert_eq!(takes[0].reason, MoveReason::Failover);
    }

    #[test]
    fn rollout_new_gateway_waits_for_the_old_to_leave_then_takes_over() {
        let mut fleet = pair();
        let mut new = gw("b2", "b", 50);
        new.state = Some(Stated {
            phase: Phase::Ready,
            since: at(60),
        });
        fleet.gateways.push(new);
        let mut b2 = ready_brain("b2");
        // Ready and settled, but the older b1 holds AZ b and ranks first.
        assert!(b2.plan(&fleet, at(200)).takes.is_empty());
        gateway_mut(&mut fleet, "b1").state = Some(Stated {
            phase: Phase::Leaving,
            since: at(200),
        });
        let takes = b2.plan(&fleet, at(200)).takes;
        assert_eq!(takes.len(), 1);
        assert_eq!(takes[0].reason, MoveReason::Handover);
        assert_eq!(takes[0].table, RouteTableId("rtb-b".into()));
        // a1 is in another AZ and ranks after b2: it stays out of it.
        assert!(ready_brain("a1").plan(&fleet, at(200)).takes.is_empty());
    }

    #[test]
    fn rollout_says_ready_in_the_second_az_only_after_the_first_has_rolled() {
        // One apply: both AZs' groups launch a release-2 gateway at once.
        let mut fleet = pair();
        for g in &mut fleet.gateways {
            g.release = Some("r1".into());
        }
        for (id, az) in [("a2", "a"), ("b2", "b")] {
            let mut new = gw(id, az, 50);
            new.state = None;
            new.release = Some("r2".into());
            fleet.gateways.push(new);
        }
        let mut a2 = ready_brain("a2");
        let mut b2 = ready_brain("b2").with_rollout_soak(Duration::from_secs(60));
        let said = |p: Plan| p.publish.and_then(|p| p.state).map(|s| s.phase);
        assert_eq!(said(a2.plan(&fleet, at(100))), Some(Phase::Ready));
        assert_eq!(said(b2.plan(&fleet, at(100))), None, "AZ a still on r1");
        assert_eq!(b2.rollout_waits_for(), Some(&Az("a".into())));
        // a2 says ready, and takes AZ a once a1 hands it over.
        gateway_mut(&mut fleet, "a2").state = Some(Stated {
            phase: Phase::Ready,
            since: at(100),
        });
        fleet.routes[0] = route("a", "a2");
        assert_eq!(said(b2.plan(&fleet, at(150))), None, "soaking");
        assert_eq!(said(b2.plan(&fleet, at(209))), None, "soaking");
        assert_eq!(said(b2.plan(&fleet, at(210))), Some(Phase::Ready));
    }

    #[test]
    fn gateway_that_never_gets_ready_never_takes_a_route() {
        let mut fleet = pair();
        let mut new = gw("b2", "b", 50);
        new.state = None;
        fleet.gateways.push(new);
        gateway_mut(&mut fleet, "b1").state = Some(Stated {
            phase: Phase::Leaving,
            since: at(200),
        });
        let mut b2 = Brain::new(InstanceId("i-b2".into()), layout());
        b2.self_check(true); // one pass is not ready
        assert_eq!(b2.plan(&fleet, at(300)), Plan::default());
        // The leaving b1 is not a candidate; a1 takes AZ b instead.
        let takes = ready_brain("a1").plan(&fleet, at(300)).takes;
        assert_eq!(takes.len(), 1);
        assert_eq!(takes[0].reason, MoveReason::Handover);
    }

    #[test]
    fn leaving_gateway_says_so_and_stops_taking() {
        let mut fleet = pair();
        fleet.routes[1] = route("b", "gone");
        let mut a1 = ready_brain("a1");
        a1.leave();
        a1.self_check(true);
        assert!(a1.is_leaving());
        let plan = a1.plan(&fleet, at(100));
        assert_eq!(
            plan.publish.and_then(|p| p.state).map(|s| s.phase),
            Some(Phase::Leaving)
        );
        assert!(plan.takes.is_empty());
    }

    #[test]
    fn route_taken_away_from_the_fleet_is_reclaimed_by_its_owner() {
        let mut fleet = pair();
        fleet.routes[0].target = Target::Other("nat-0123".into());
        fleet.routes[1].target = Target::Missing;
        assert_eq!(unserved(&fleet, at(100)), 2);
        let a = ready_brain("a1").plan(&fleet, at(100)).takes;
        assert_eq!(a.len(), 1);
        assert_eq!((a[0].reason, a[0].exists), (MoveReason::Reclaim, true));
        let b = ready_brain("b1").plan(&fleet, at(100)).takes;
        assert_eq!((b[0].reason, b[0].exists), (MoveReason::Reclaim, false));
    }

    #[test]
    fn standby_in_the_same_az_ranks_before_other_azs() {
        let mut fleet = pair();
        fleet.gateways.push(gw("a2", "a", 10));
        challenge(&mut fleet, "a1", "b1", 100);
        let standby = ready_brain("a2").plan(&fleet, at(106)).takes;
        assert_eq!(standby.len(), 1);
        assert_eq!(standby[0].table, RouteTableId("rtb-a".into()));
        assert!(ready_brain("b1").plan(&fleet, at(106)).takes.is_empty());
    }

    #[test]
    fn three_azs_fail_over_to_the_next_az_in_turn() {
        let mut fleet = pair();
        fleet.gateways.push(gw("c1", "c", 0));
        let mut l = layout();
        l.tables
            .insert(Az("c".into()), vec![RouteTableId("rtb-c".into())]);
        fleet.routes.push(route("c", "c1"));
        gateway_mut(&mut fleet, "b1").running = false;
        let brain = |id: &str| {
            let mut b = Brain::new(InstanceId(format!("i-{id}")), l.clone());
            b.self_check(true);
            b.self_check(true);
            b
        };
        // After b comes c.
        assert_eq!(brain("c1").plan(&fleet, at(100)).takes.len(), 1);
        assert!(brain("a1").plan(&fleet, at(100)).takes.is_empty());
    }

    #[test]
    fn an_az_whose_gateways_are_down_counts_none() {
        let mut fleet = pair();
        gateway_mut(&mut fleet, "a1").state = Some(Stated {
            phase: Phase::Down,
            since: at(50),
        });
        fleet.gateways.push(gw("b2", "b", 10));
        let counts: Vec<(String, usize)> = candidates_by_az(&layout(), &fleet, at(100))
            .into_iter()
            .map(|(az, n)| (az.0.clone(), n))
            .collect();
        assert_eq!(counts, [("a".to_string(), 0), ("b".to_string(), 2)]);
    }

    #[test]
    fn every_gateway_computes_the_same_owner() {
        // Whatever the fleet's state, at most one gateway plans to take
        // any one route.
        let phases = [
            None,
            Some(Phase::Ready),
            Some(Phase::Down),
            Some(Phase::Leaving),
        ];
        for pa in phases {
            for pb in phases {
                for pc in phases {
                    for holder in ["a1", "b1", "b2", "nat"] {
                        let mut fleet = pair();
                        fleet.gateways.push(gw("b2", "b", 5));
                        for (id, p) in [("a1", pa), ("b1", pb), ("b2", pc)] {
                            gateway_mut(&mut fleet, id).state = p.map(|phase| Stated {
                                phase,
                                since: at(3),
                            });
                        }
                        fleet.routes[1] = route("b", holder);
                        let takers: Vec<_> = ["a1", "b1", "b2"]
                            .into_iter()
                            .filter(|id| {
                                ready_brain(id)
                                    .plan(&fleet, at(100))
                                    .takes
                                    .iter()
                                    .any(|t| t.table.0 == "rtb-b")
                            })
                            .collect();
                        assert!(
                            takers.len() <= 1,
                            "{pa:?} {pb:?} {pc:?} held by {holder}: {takers:?}"
                        );
                    }
                }
            }
        }
    }
}
