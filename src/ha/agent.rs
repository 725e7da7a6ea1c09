//! The HA agent's I/O: its own checks, probes of its siblings, the fleet
//! read from EC2 every couple of seconds, and the plan carried out. Every
//! wait is bounded; a throttled or failing API only delays the next call.

use super::address::{self, Address, AllocationId, Claim};
use super::decide::{Brain, Plan, Take};
use super::ec2::{Ec2, Ec2Error};
use super::fleet::{
    Challenge, EniId, Fleet, Gateway, InstanceId, Layout, Millis, TAG_ALIVE, TAG_CHALLENGE,
    TAG_STATE, Target,
};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One HTTP readiness probe of a sibling, connect to last byte. Short: a
/// failed probe only leads to a challenge, which a live sibling answers.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(800);
/// This gateway's own checks: longer, since three failures in a row hand
/// its routes away. A loaded machine must not fail them by being slow.
pub const SELF_CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// A reading older than this is not acted on.
const STALE_AFTER: Duration = Duration::from_secs(6);
/// Once throttled, the next call waits this long, doubling up to the cap.
const THROTTLE_FIRST: Duration = Duration::from_secs(1);
const THROTTLE_MAX: Duration = Duration::from_secs(16);

/// Delays after throttling: exponential, capped, with jitter so a fleet
/// does not retry in step.
#[derive(Debug, Default)]
pub struct Backoff {
    delay: Option<Duration>,
    until: Option<Millis>,
}

impl Backoff {
    pub fn throttled(&mut self, now: Millis) {
        let delay = self
            .delay
            .map_or(THROTTLE_FIRST, |d| (d * 2).min(THROTTLE_MAX));
        self.delay = Some(delay);
        let jitter = delay.mul_f64(0.2 * fastrand::f64());
        self.until = Some(now.plus(delay + jitter));
    }

    pub fn succeeded(&mut self) {
        *self = Backoff::default();
    }

    pub fn allows(&self, now: Millis) -> bool {
        self.until.is_none_or(|u| now >= u)
    }
}

/// What a poll did: for tests and the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Done {
    pub read: bool,
    pub published: bool,
    pub challenged: Vec<InstanceId>,
    pub took: Vec<Take>,
    pub errors: Vec<&'static str>,
}

pub(crate) struct Agent<E> {
    pub brain: Brain,
    ec2: E,
    fleet_name: String,
    layout: Layout,
    backoff: Backoff,
    fleet: Option<(Fleet, Millis)>,
    source_dest_check_off: bool,
    /// Each AZ's Elastic IP pool (empty: no stable address wanted).
    eips: std::collections::BTreeMap<super::fleet::Az, Vec<AllocationId>>,
    /// The pool's address this gateway holds, and when that was checked.
    address: Option<(Address, Millis)>,
    hooks: Hooks,
    /// The launch hook's wait has been ended (or there was none).
    launched: bool,
    /// When a failed call was last logged as a warning.
    warned: Option<Millis>,
    /// Runs `start PEER` / `stop`: flows of a sibling this gateway took
    /// routes from are routed on to it (ami/scripts/handoff.sh).
    handoff_command: Vec<String>,
    handoff: Option<Handoff>,
    /// The earlier AZ a rollout was last logged as waiting on.
    rollout_wait: Option<super::fleet::Az>,
}

/// A hand-off in progress: the sibling whose connections still arrive here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handoff {
    pub peer: InstanceId,
    pub ip: std::net::Ipv4Addr,
    /// With IPv6 routes, the sibling's IPv6 address: its IPv6 flows too.
    pub ip6: Option<std::net::Ipv6Addr>,
    pub since: Millis,
}

/// A hand-off ends when its sibling is gone, or after this long (longer
/// than any drain).
const HANDOFF_MAX: Duration = Duration::from_secs(300);
/// The hand-off command's bound.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// A failing API is logged at most this often (each failure is counted).
const WARN_EVERY: Duration = Duration::from_secs(30);

/// The auto-scaling group's lifecycle hooks the agent ends: the launch
/// hook once it is ready (a new instance that never is is abandoned, and a
/// rollout stops), the termination hook once it has drained.
#[derive(Debug, Clone, Default)]
pub struct Hooks {
    pub launch: Option<String>,
    pub terminate: Option<String>,
}

/// A held address is re-read this often (it cannot move while held, but
/// someone may disassociate it by hand).
const ADDRESS_RECHECK: Duration = Duration::from_secs(30);

impl<E: Ec2> Agent<E> {
    pub fn new(me: InstanceId, ec2: E, fleet_name: String, layout: Layout) -> Agent<E> {
        Agent {
            brain: Brain::new(me, layout.clone()),
            ec2,
            fleet_name,
            layout,
            backoff: Backoff::default(),
            fleet: None,
            source_dest_check_off: false,
            eips: Default::default(),
            address: None,
            hooks: Hooks::default(),
            launched: false,
            warned: None,
            handoff_command: Vec::new(),
            handoff: None,
            rollout_wait: None,
        }
    }

    pub fn with_handoff(mut self, command: Vec<String>) -> Agent<E> {
        self.handoff_command = command;
        self
    }

    #[cfg(test)]
    pub fn handoff(&self) -> Option<&Handoff> {
        self.handoff.as_ref()
    }

    /// Clears what an earlier run may have left.
    pub async fn reset_handoff(&mut self) {
        if !self.handoff_command.is_empty() {
            run_command(&self.handoff_command, &["stop"]).await;
        }
        self.handoff = None;
    }

    /// Starts a hand-off to the holder a route was just taken from, if it
    /// is a live sibling in this gateway's AZ (its subnet: packets can be
    /// sent to it directly) that is leaving.
    async fn start_handoff(&mut self, from: &Target, now: Millis) {
        let Some((fleet, _)) = &self.fleet else {
            return;
        };
        let (Some(me), Some(holder)) = (fleet.gateway(self.brain.me()), fleet.holder(from)) else {
            return;
        };
        let Some(std::net::IpAddr::V4(ip)) = holder.ip else {
            return;
        };
        if holder.az != me.az
            || !holder.running
            || self.handoff.as_ref().is_some_and(|h| h.ip == ip)
        {
            return;
        }
        let peer = holder.id.clone();
        let ip6 = holder.ip6.filter(|_| self.layout.ipv6);
        let mut args = vec!["start".to_owned(), ip.to_string()];
        args.extend(ip6.map(|ip6| ip6.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        if !self.handoff_command.is_empty() && !run_command(&self.handoff_command, &args).await {
            return;
        }
        tracing::warn!(%peer, %ip, ?ip6, "flows in progress on the previous holder are routed on to it");
        self.handoff = Some(Handoff {
            peer,
            ip,
            ip6,
            since: now,
        });
    }

    async fn end_handoff_if_done(&mut self, now: Millis) {
        let Some(h) = &self.handoff else { return };
        let peer_live = self
            .fleet
            .as_ref()
            .and_then(|(f, _)| f.gateway(&h.peer))
            .is_some_and(|g| g.running);
        if peer_live && now.since(h.since) < HANDOFF_MAX {
            return;
        }
        tracing::info!(peer = %h.peer, "hand-off over: the previous holder is gone");
        self.reset_handoff().await;
    }

    pub fn with_rollout_soak(mut self, soak: Duration) -> Agent<E> {
        self.brain = self.brain.with_rollout_soak(soak);
        self
    }

    pub fn with_hooks(mut self, hooks: Hooks) -> Agent<E> {
        self.hooks = hooks;
        self
    }

    /// Ends the launch hook's wait once this gateway has said it is ready.
    async fn end_launch_wait(&mut self, now: Millis, done: &mut Done) {
        let Some(hook) = self.hooks.launch.clone() else {
            return;
        };
        let Some(me) = self.me().cloned() else { return };
        let said_ready = me
            .state
            .is_some_and(|s| s.phase == super::fleet::Phase::Ready);
        if self.launched || !self.brain.is_ready() || !said_ready {
            return;
        }
        let Some(group) = me.group.clone() else {
            // Not launched by a group: no hook to end.
            self.launched = true;
            return;
        };
        match self.ec2.complete_lifecycle(&group, &hook, &me.id).await {
            Ok(()) => {
                self.launched = true;
                tracing::info!(%group, %hook, "ready: ended the launch hook's wait, the group may count this instance in service");
            }
            // No wait in progress: launched before the hook existed, or
            // ended already by an earlier run of the agent.
            Err(Ec2Error::Api { code, .. }) if code == "ValidationError" => self.launched = true,
            Err(e) => self.failed(&e, now, done),
        }
    }

    /// Ends the termination hook's wait: the routes are handed over and
    /// the proxy drained. A few tries; the hook's own timeout is the bound.
    pub async fn end_termination_wait(&mut self) {
        let (Some(hook), Some(me)) = (self.hooks.terminate.clone(), self.me().cloned()) else {
            return;
        };
        let Some(group) = me.group else { return };
        for _ in 0..3 {
            match self.ec2.complete_lifecycle(&group, &hook, &me.id).await {
                Ok(()) => {
                    tracing::info!(%group, %hook, "drained: ended the termination hook's wait");
                    return;
                }
                Err(Ec2Error::Api { code, .. }) if code == "ValidationError" => return,
                Err(e) => {
                    tracing::warn!(error = %e, "could not end the termination hook's wait");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        }
    }

    /// Hold one address of this AZ's pool before saying ready.
    pub fn with_eips(
        mut self,
        eips: std::collections::BTreeMap<super::fleet::Az, Vec<AllocationId>>,
    ) -> Agent<E> {
        self.eips = eips;
        self
    }

    fn pool(&self) -> &[AllocationId] {
        self.me()
            .and_then(|g| self.eips.get(&g.az))
            .map_or(&[], Vec::as_slice)
    }

    /// Whether this gateway egresses from its AZ's stable address (or
    /// none is configured): until then it must not say it is ready.
    pub fn address_ok(&self) -> bool {
        self.address.is_some() || (self.me().is_some() && self.pool().is_empty())
    }

    /// The last reading, if it is fresh enough to act on.
    pub fn fleet(&self, now: Millis) -> Option<&Fleet> {
        self.fleet
            .as_ref()
            .filter(|(_, at)| now.since(*at) < STALE_AFTER)
            .map(|(f, _)| f)
    }

    pub fn me(&self) -> Option<&Gateway> {
        self.fleet
            .as_ref()
            .and_then(|(f, _)| f.gateway(self.brain.me()))
    }

    /// How many default routes point at this gateway, by a fresh reading.
    pub fn routes_held(&self, now: Millis) -> Option<usize> {
        let (fleet, me) = (self.fleet(now)?, self.me()?);
        let mine = Target::Eni(me.eni.clone());
        Some(fleet.routes.iter().filter(|r| r.target == mine).count())
    }

    /// Whether no default route points at this gateway any more.
    pub fn holds_nothing(&self, now: Millis) -> bool {
        self.routes_held(now) == Some(0)
    }

    /// One round: read the fleet, decide, act.
    pub async fn poll(&mut self, now: Millis) -> Done {
        let mut done = Done::default();
        if !self.backoff.allows(now) {
            return done;
        }
        match self.ec2.fleet(&self.fleet_name, &self.layout).await {
            Ok(fleet) => {
                self.brain.forget_gone(&fleet);
                self.fleet = Some((fleet, now));
                done.read = true;
            }
            Err(e) => {
                self.failed(&e, now, &mut done);
                return done;
            }
        }
        if !self.source_dest_check_off {
            self.turn_off_source_dest_check(now, &mut done).await;
        }
        let recheck = self
            .address
            .as_ref()
            .is_none_or(|(_, at)| now.since(*at) >= ADDRESS_RECHECK);
        if recheck && !self.pool().is_empty() {
            self.claim_address(now, &mut done).await;
        }
        let Some((fleet, _)) = &self.fleet else {
            return done;
        };
        let plan = self.brain.plan(fleet, now);
        self.log_rollout_wait();
        let Some((fleet, _)) = &self.fleet else {
            return done;
        };
        let eni = fleet.gateway(self.brain.me()).map(|g| g.eni.clone());
        self.carry_out(plan, eni, now, &mut done).await;
        for from in done
            .took
            .iter()
            .filter(|t| t.reason == super::decide::MoveReason::Handover)
            .map(|t| t.from.clone())
            .collect::<Vec<_>>()
        {
            self.start_handoff(&from, now).await;
        }
        self.end_handoff_if_done(now).await;
        self.end_launch_wait(now, &mut done).await;
        done
    }

    fn log_rollout_wait(&mut self) {
        let waits = self.brain.rollout_waits_for().cloned();
        if waits == self.rollout_wait {
            return;
        }
        match (&waits, &self.rollout_wait) {
            (Some(az), _) => tracing::info!(
                "rollout: {az} is not served by this release yet; this gateway says ready only once it is"
            ),
            (None, Some(az)) => tracing::info!(
                "rollout: {az} is served by this release; ready once it has been for the soak time"
            ),
            (None, None) => {}
        }
        self.rollout_wait = waits;
    }

    async fn claim_address(&mut self, now: Millis, done: &mut Done) {
        let pool = self.pool().to_vec();
        let (Some((fleet, _)), Some(me)) = (&self.fleet, self.me()) else {
            return;
        };
        let eni = me.eni.clone();
        let addresses = match self.ec2.addresses(&pool).await {
            Ok(a) => a,
            Err(e) => return self.failed(&e, now, done),
        };
        match address::claim(&addresses, fleet, &eni) {
            Claim::Held(a) => self.address = Some((a, now)),
            Claim::NoneFree => {
                self.address = None;
                tracing::warn!(
                    "every Elastic IP of this AZ's pool is held by a live gateway: not ready until one is free"
                );
            }
            Claim::Take {
                address,
                reassociate,
            } => match self
                .ec2
                .associate(&address.allocation, &eni, reassociate)
                .await
            {
                Ok(()) => {
                    tracing::warn!(
                        "address claimed: {} ({}) now on {} (this instance {})",
                        address.public_ip,
                        address.allocation,
                        eni,
                        self.brain.me()
                    );
                    // Confirmed by the next reading: a race is lost there.
                    self.address = None;
                }
                Err(e) => self.failed(&e, now, done),
            },
        }
    }

    async fn turn_off_source_dest_check(&mut self, now: Millis, done: &mut Done) {
        let me = self.brain.me().clone();
        match self.ec2.disable_source_dest_check(&me).await {
            Ok(()) => {
                self.source_dest_check_off = true;
                tracing::info!(instance = %me, "source/destination check off: this instance forwards");
            }
            Err(e) => self.failed(&e, now, done),
        }
    }

    async fn carry_out(&mut self, plan: Plan, eni: Option<EniId>, now: Millis, done: &mut Done) {
        let me = self.brain.me().clone();
        if let Some(publish) = plan.publish {
            let mut tags = Vec::new();
            if let Some(state) = publish.state {
                tags.push((TAG_STATE, state.to_tag()));
            }
            if let Some(alive) = publish.alive {
                tags.push((TAG_ALIVE, alive.0.to_string()));
            }
            match self.ec2.tag(&me, &tags).await {
                Ok(()) => {
                    done.published = true;
                    if let Some(state) = publish.state {
                        tracing::info!(instance = %me, state = %state.to_tag(), "said of itself");
                    }
                }
                Err(e) => return self.failed(&e, now, done),
            }
        }
        for sibling in plan.challenges {
            let challenge = Challenge {
                at: now,
                by: me.clone(),
            };
            match self
                .ec2
                .tag(&sibling, &[(TAG_CHALLENGE, challenge.to_tag())])
                .await
            {
                Ok(()) => {
                    self.brain.challenged(&sibling, now);
                    tracing::warn!(%sibling, "sibling fails its probes: challenged it to answer through the EC2 API");
                    done.challenged.push(sibling);
                }
                Err(e) => return self.failed(&e, now, done),
            }
        }
        let Some(eni) = eni else { return };
        for take in plan.takes {
            match self.ec2.take(&take, &eni).await {
                Ok(()) => {
                    let from = match &take.from {
                        Target::Eni(e) => e.0.clone(),
                        Target::Missing => "nothing".into(),
                        Target::Other(o) => o.clone(),
                    };
                    tracing::warn!(
                        "route moved: {} {} from {} to {} ({}, this instance {})",
                        take.table,
                        take.family.destination(),
                        from,
                        eni,
                        take.reason.as_str(),
                        me
                    );
                    metrics::counter!(crate::telemetry::HA_ROUTE_MOVES, "reason" => take.reason.as_str())
                        .increment(1);
                    done.took.push(take);
                }
                Err(e) => return self.failed(&e, now, done),
            }
        }
        self.backoff.succeeded();
    }

    fn failed(&mut self, e: &Ec2Error, now: Millis, done: &mut Done) {
        metrics::counter!(crate::telemetry::HA_API_ERRORS, "kind" => e.kind()).increment(1);
        done.errors.push(e.kind());
        if matches!(e, Ec2Error::Throttled(_)) {
            self.backoff.throttled(now);
        }
        if self.warned.is_none_or(|w| now.since(w) >= WARN_EVERY) {
            self.warned = Some(now);
            tracing::warn!(error = %e, "EC2 call failed; the next poll tries again");
        } else {
            tracing::debug!(error = %e, "EC2 call failed; the next poll tries again");
        }
    }
}

/// Runs `command` with `args`, bounded; whether it succeeded.
async fn run_command(command: &[String], args: &[&str]) -> bool {
    let Some((program, fixed)) = command.split_first() else {
        return false;
    };
    let status = tokio::process::Command::new(program)
        .args(fixed)
        .args(args)
        .kill_on_drop(true)
        .status();
    match tokio::time::timeout(COMMAND_TIMEOUT, status).await {
        Ok(Ok(s)) if s.success() => true,
        Ok(Ok(s)) => {
            tracing::warn!(command = %command.join(" "), ?args, %s, "command failed");
            false
        }
        Ok(Err(e)) => {
            tracing::warn!(command = %command.join(" "), error = %e, "command did not start");
            false
        }
        Err(_) => {
            tracing::warn!(command = %command.join(" "), "command still running after {COMMAND_TIMEOUT:?}");
            false
        }
    }
}

/// GET `url` (plain http://host:port/path) and whether it answered 200.
pub async fn http_ok(addr: SocketAddr, path: &str, bound: Duration) -> bool {
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = [0u8; 32];
        let mut got = 0;
        while got < 12 {
            let n = stream.read(&mut head[got..]).await.ok()?;
            if n == 0 {
                break;
            }
            got += n;
        }
        Some(head[..got].starts_with(b"HTTP/1.1 200") || head[..got].starts_with(b"HTTP/1.0 200"))
    };
    matches!(tokio::time::timeout(bound, probe).await, Ok(Some(true)))
}

/// Whether a TCP connection to `target` (host:port) opens in time.
pub async fn reaches(target: &str, bound: Duration) -> bool {
    let connect = async {
        let addrs = tokio::net::lookup_host(target).await.ok()?;
        for addr in addrs {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Some(());
            }
        }
        None
    };
    matches!(tokio::time::timeout(bound, connect).await, Ok(Some(())))
}

#[cfg(test)]
mod tests {
    use super::super::decide::{MoveReason, UP_AFTER};
    use super::super::fleet::{Az, Family, Phase, Route, RouteTableId, Stated};
    use super::super::serving::ANSWER_WINDOW;
    use super::*;
    use std::cell::RefCell;
    use std::collections::VecDeque;
    use std::rc::Rc;

    /// An EC2 API in memory: tags and routes change as calls say, and
    /// queued failures are returned first.
    #[derive(Default)]
    struct FakeEc2 {
        fleet: RefCell<Fleet>,
        /// Outcomes of the next calls, in order: None succeeds.
        failures: RefCell<VecDeque<Option<Ec2Error>>>,
        calls: RefCell<Vec<String>>,
        pool: RefCell<Vec<Address>>,
    }

    impl FakeEc2 {
        fn next_failure(&self, call: &str) -> Result<(), Ec2Error> {
            self.calls.borrow_mut().push(call.to_owned());
            match self.failures.borrow_mut().pop_front() {
                Some(Some(e)) => Err(e),
                _ => Ok(()),
            }
        }
    }

    impl Ec2 for Rc<FakeEc2> {
        async fn fleet(&self, _: &str, _: &Layout) -> Result<Fleet, Ec2Error> {
            self.next_failure("fleet")?;
            Ok(self.fleet.borrow().clone())
        }

        async fn take(&self, take: &Take, eni: &EniId) -> Result<(), Ec2Error> {
            self.next_failure("take")?;
            let mut fleet = self.fleet.borrow_mut();
            for r in fleet.routes.iter_mut().filter(|r| r.table == take.table) {
                r.target = Target::Eni(eni.clone());
            }
            Ok(())
        }

        async fn tag(&self, id: &InstanceId, tags: &[(&str, String)]) -> Result<(), Ec2Error> {
            self.next_failure("tag")?;
            let mut fleet = self.fleet.borrow_mut();
            let g = fleet
                .gateways
                .iter_mut()
                .find(|g| &g.id == id)
                .ok_or(Ec2Error::Api {
                    action: "CreateTags",
                    code: "InvalidInstanceID.NotFound".into(),
                    message: String::new(),
                })?;
            for (k, v) in tags {
                match *k {
                    TAG_STATE => g.state = Stated::from_tag(v),
                    TAG_ALIVE => g.alive = super::super::fleet::alive_from_tag(v),
                    TAG_CHALLENGE => g.challenge = Challenge::from_tag(v),
                    _ => {}
                }
            }
            Ok(())
        }

        async fn disable_source_dest_check(&self, _: &InstanceId) -> Result<(), Ec2Error> {
            self.next_failure("source_dest_check")
        }

        async fn addresses(&self, _: &[AllocationId]) -> Result<Vec<Address>, Ec2Error> {
            self.next_failure("addresses")?;
            Ok(self.pool.borrow().clone())
        }

        async fn complete_lifecycle(
            &self,
            group: &str,
            hook: &str,
            _: &InstanceId,
        ) -> Result<(), Ec2Error> {
            self.next_failure(&format!("complete {group} {hook}"))
        }

        async fn associate(
            &self,
            allocation: &AllocationId,
            eni: &EniId,
            reassociate: bool,
        ) -> Result<(), Ec2Error> {
            self.next_failure("associate")?;
            let mut pool = self.pool.borrow_mut();
            let a = pool
                .iter_mut()
                .find(|a| &a.allocation == allocation)
                .ok_or(Ec2Error::Timeout)?;
            if a.eni.is_some() && !reassociate {
                return Err(Ec2Error::Api {
                    action: "AssociateAddress",
                    code: "Resource.AlreadyAssociated".into(),
                    message: String::new(),
                });
            }
            a.eni = Some(eni.clone());
            Ok(())
        }
    }

    const T0: u64 = 1_764_600_000_000;

    fn at(ms: u64) -> Millis {
        Millis(T0 + ms)
    }

    fn gateway(id: &str, az: &str) -> Gateway {
        Gateway {
            launched: Millis(T0),
            ..Gateway::sample(id, az, &format!("eni-{id}"))
        }
    }

    fn setup() -> (Layout, Rc<FakeEc2>) {
        let mut layout = Layout::default();
        layout
            .tables
            .insert(Az("a".into()), vec![RouteTableId("rtb-a".into())]);
        layout
            .tables
            .insert(Az("b".into()), vec![RouteTableId("rtb-b".into())]);
        let fake = FakeEc2::default();
        *fake.fleet.borrow_mut() = Fleet {
            gateways: vec![gateway("i-a", "a"), gateway("i-b", "b")],
            routes: ["a", "b"]
                .iter()
                .map(|t| Route {
                    table: RouteTableId(format!("rtb-{t}")),
                    family: Family::V4,
                    target: Target::Other("nat-0".into()),
                })
                .collect(),
        };
        (layout, Rc::new(fake))
    }

    fn ready(agent: &mut Agent<Rc<FakeEc2>>) {
        for _ in 0..UP_AFTER {
            agent.brain.self_check(true);
        }
    }

    #[tokio::test]
    async fn first_boot_says_ready_then_claims_its_az_from_the_nat_gateway() {
        let (layout, fake) = setup();
        let mut agent = Agent::new(InstanceId("i-a".into()), fake, "f".into(), layout);
        let first = agent.poll(at(0)).await;
        assert!(first.read && !first.published, "not ready: says nothing");
        ready(&mut agent);
        let second = agent.poll(at(2000)).await;
        assert!(second.published);
        assert!(second.took.is_empty(), "the reading predates its own tag");
        let third = agent.poll(at(4000)).await;
        let reasons: Vec<_> = third.took.iter().map(|t| t.table.0.clone()).collect();
        // Both AZs: b's gateway has never said it is ready.
        assert_eq!(reasons, vec!["rtb-a", "rtb-b"]);
        assert!(third.took.iter().all(|t| t.reason == MoveReason::Reclaim));
        assert_eq!(
            agent
                .ec2
                .calls
                .borrow()
                .iter()
                .filter(|c| *c == "source_dest_check")
                .count(),
            1
        );
        assert!(agent.poll(at(6000)).await.took.is_empty(), "idempotent");
    }

    #[tokio::test]
    async fn gateway_holds_a_pool_address_before_it_may_say_ready() {
        let (layout, fake) = setup();
        *fake.pool.borrow_mut() = ["1", "2"]
            .iter()
            .map(|n| Address {
                allocation: AllocationId(format!("eipalloc-{n}")),
                public_ip: format!("203.0.113.{n}"),
                eni: None,
            })
            .collect();
        let mut eips = std::collections::BTreeMap::new();
        eips.insert(
            Az("a".into()),
            vec![
                AllocationId("eipalloc-1".into()),
                AllocationId("eipalloc-2".into()),
            ],
        );
        let mut a = Agent::new(
            InstanceId("i-a".into()),
            fake.clone(),
            "f".into(),
            layout.clone(),
        )
        .with_eips(eips.clone());
        assert!(!a.address_ok(), "before the fleet is read");
        a.poll(at(0)).await;
        assert!(!a.address_ok(), "claimed, not yet confirmed");
        a.poll(at(2000)).await;
        assert!(a.address_ok());
        // A second gateway of AZ a gets the other address.
        fake.fleet.borrow_mut().gateways.push(gateway("i-a2", "a"));
        let mut a2 =
            Agent::new(InstanceId("i-a2".into()), fake.clone(), "f".into(), layout).with_eips(eips);
        a2.poll(at(4000)).await;
        a2.poll(at(6000)).await;
        assert!(a2.address_ok());
        let held: Vec<_> = fake.pool.borrow().iter().map(|p| p.eni.clone()).collect();
        assert_eq!(
            held,
            vec![
                Some(EniId("eni-i-a".into())),
                Some(EniId("eni-i-a2".into()))
            ]
        );
    }

    #[tokio::test]
    async fn launch_hook_ends_only_once_the_gateway_has_said_it_is_ready() {
        let (layout, fake) = setup();
        for g in fake.fleet.borrow_mut().gateways.iter_mut() {
            g.group = Some("grp-a".into());
        }
        let hooks = Hooks {
            launch: Some("portcullis-ready".into()),
            terminate: Some("portcullis-drain".into()),
        };
        let mut agent = Agent::new(InstanceId("i-a".into()), fake.clone(), "f".into(), layout)
            .with_hooks(hooks);
        let completions = |fake: &FakeEc2| {
            fake.calls
                .borrow()
                .iter()
                .filter(|c| c.starts_with("complete"))
                .cloned()
                .collect::<Vec<_>>()
        };
        agent.poll(at(0)).await;
        assert!(completions(&fake).is_empty(), "not ready");
        ready(&mut agent);
        agent.poll(at(2000)).await; // says ready
        agent.poll(at(4000)).await; // reads it back, ends the wait
        agent.poll(at(6000)).await;
        assert_eq!(completions(&fake), ["complete grp-a portcullis-ready"]);
        agent.end_termination_wait().await;
        assert_eq!(
            completions(&fake),
            [
                "complete grp-a portcullis-ready",
                "complete grp-a portcullis-drain"
            ]
        );
    }

    #[tokio::test]
    async fn handover_from_a_leaving_sibling_of_the_az_hands_its_flows_off_until_it_is_gone() {
        let (layout, fake) = setup();
        {
            let mut fleet = fake.fleet.borrow_mut();
            let mut old = gateway("i-a0", "a");
            old.ip = Some("198.51.100.140".parse().expect("ip"));
            old.state = Some(Stated {
                phase: Phase::Leaving,
                since: Millis(T0),
            });
            fleet.gateways.push(old);
            fleet.routes[0].target = Target::Eni(EniId("eni-i-a0".into()));
        }
        let mut agent = Agent::new(InstanceId("i-a".into()), fake.clone(), "f".into(), layout);
        ready(&mut agent);
        agent.poll(at(0)).await; // says ready
        let done = agent.poll(at(2000)).await;
        assert!(
            done.took.iter().any(|t| t.reason == MoveReason::Handover),
            "{done:?}"
        );
        assert_eq!(
            agent
                .handoff()
                .map(|h| (h.peer.0.as_str(), h.ip.to_string())),
            Some(("i-a0", "198.51.100.140".to_string()))
        );
        agent.poll(at(4000)).await;
        assert!(agent.handoff().is_some(), "while the sibling runs");
        fake.fleet
            .borrow_mut()
            .gateways
            .retain(|g| g.id.0 != "i-a0");
        agent.poll(at(6000)).await;
        assert!(agent.handoff().is_none(), "ended once it is gone");
    }

    #[tokio::test]
    async fn with_ipv6_routes_the_hand_off_names_the_siblings_ipv6_address_too() {
        let (mut layout, fake) = setup();
        layout.ipv6 = true;
        {
            let mut fleet = fake.fleet.borrow_mut();
            let mut old = gateway("i-a0", "a");
            old.ip = Some("198.51.100.140".parse().expect("ip"));
            old.ip6 = Some("2001:db8:a::140".parse().expect("ip6"));
            old.state = Some(Stated {
                phase: Phase::Leaving,
                since: Millis(T0),
            });
            fleet.gateways.push(old);
            fleet.routes[0].target = Target::Eni(EniId("eni-i-a0".into()));
        }
        let said = std::env::temp_dir().join(format!("portcullis-handoff-{}", std::process::id()));
        let command = vec![
            "sh".to_owned(),
            "-c".to_owned(),
            format!("echo \"$*\" >> {}", said.display()),
            "handoff".to_owned(),
        ];
        let mut agent = Agent::new(InstanceId("i-a".into()), fake.clone(), "f".into(), layout)
            .with_handoff(command);
        ready(&mut agent);
        agent.poll(at(0)).await;
        agent.poll(at(2000)).await;
        let text = std::fs::read_to_string(&said).unwrap_or_default();
        let _ = std::fs::remove_file(&said);
        assert_eq!(text, "start 198.51.100.140 2001:db8:a::140\n");
        assert_eq!(
            agent.handoff().and_then(|h| h.ip6).map(|ip| ip.to_string()),
            Some("2001:db8:a::140".to_string())
        );
    }

    #[tokio::test]
    async fn throttling_backs_off_then_recovers() {
        let (layout, fake) = setup();
        let mut agent = Agent::new(InstanceId("i-a".into()), fake, "f".into(), layout);
        ready(&mut agent);
        agent
            .ec2
            .failures
            .borrow_mut()
            .push_back(Some(Ec2Error::Throttled("RequestLimitExceeded".into())));
        let done = agent.poll(at(0)).await;
        assert_eq!(done.errors, vec!["throttled"]);
        // Inside the backoff no call is made at all.
        let calls = agent.ec2.calls.borrow().len();
        assert_eq!(agent.poll(at(500)).await, Done::default());
        assert_eq!(agent.ec2.calls.borrow().len(), calls);
        // After it, the round goes through.
        let done = agent.poll(at(1300)).await;
        assert!(done.read && done.published, "{done:?}");
    }

    #[tokio::test]
    async fn failed_route_call_is_retried_on_the_next_poll() {
        let (layout, fake) = setup();
        let mut agent = Agent::new(InstanceId("i-a".into()), fake, "f".into(), layout);
        ready(&mut agent);
        agent.poll(at(0)).await;
        // The fleet is read, then the first route call times out.
        agent
            .ec2
            .failures
            .borrow_mut()
            .extend([None, Some(Ec2Error::Timeout)]);
        let done = agent.poll(at(2000)).await;
        assert_eq!(done.errors, vec!["unreachable"]);
        let done = agent.poll(at(4000)).await;
        assert_eq!(done.took.len(), 2, "{done:?}");
    }

    #[tokio::test]
    async fn two_agents_split_from_each_other_move_no_route() {
        let (layout, fake) = setup();
        {
            let mut fleet = fake.fleet.borrow_mut();
            for g in fleet.gateways.iter_mut() {
                g.state = Some(Stated {
                    phase: Phase::Ready,
                    since: Millis(T0),
                });
                g.alive = Some(Millis(T0));
            }
            fleet.routes[0].target = Target::Eni(EniId("eni-i-a".into()));
            fleet.routes[1].target = Target::Eni(EniId("eni-i-b".into()));
        }
        // Both agents share one API, as real ones do.
        let mut a = Agent::new(
            InstanceId("i-a".into()),
            fake.clone(),
            "f".into(),
            layout.clone(),
        );
        let mut b = Agent::new(InstanceId("i-b".into()), fake, "f".into(), layout);
        ready(&mut a);
        ready(&mut b);
        let mut moves = 0;
        let mut challenges = 0;
        let mut now = 20_000;
        // Two minutes of every probe failing both ways.
        while now < 140_000 {
            for agent in [&mut a, &mut b] {
                let other = if agent.brain.me().0 == "i-a" {
                    "i-b"
                } else {
                    "i-a"
                };
                agent.brain.probe(&InstanceId(other.into()), false);
                let done = agent.poll(at(now)).await;
                moves += done.took.len();
                challenges += done.challenged.len();
            }
            now += ANSWER_WINDOW.as_millis() as u64 / 6;
        }
        assert_eq!(moves, 0);
        // One challenge each, then one each after the 30 s backoff, then
        // after 60 s more.
        assert_eq!(challenges, 6);
    }
}
