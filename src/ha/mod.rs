//! `portcullis ha`: the agent beside each gateway that keeps every AZ's
//! private routes on a serving gateway.
//!
//! Each gateway checks itself (its proxy ready, the internet reachable)
//! and probes its siblings' readiness every second; every two seconds it
//! reads the fleet from the EC2 API, decides with [`decide`]'s rule, and
//! moves to itself the routes the rule gives it. It moves nothing else:
//! every gateway computes the same owners from the same API reading, so two
//! never fight over a route.
//!
//! - [`fleet`]: the fleet as values (gateways, HA tags, default routes).
//! - [`decide`]: the ownership rule, with no I/O.
//! - [`serving`]: which gateways can serve (ready, running, not dead).
//! - [`rollout`]: a rollout's new gateways say ready one AZ at a time.
//! - [`address`]: which Elastic IP of its AZ's pool a gateway holds.
//! - [`ec2`]: the EC2 query API calls, signed with the SDK's SigV4.
//! - [`ena`]: EC2's network allowance counters (`ethtool -S`), exported.
//! - [`xml`]: the element tree the API's answers are read with.
//! - [`agent`]: checks, probes, the poll, carrying out the plan.

pub mod address;
pub mod agent;
pub mod decide;
pub mod ec2;
pub mod ena;
pub mod fleet;
pub mod rollout;
pub mod serving;
pub mod xml;

use fleet::{Az, InstanceId, Layout, Millis, RouteTableId};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a leaving gateway waits for a sibling to take its routes
/// before it drains anyway (a fleet of one has nobody to hand over to).
pub const LEAVE_WAIT: Duration = Duration::from_secs(30);
/// After its routes have moved, connections already routed here keep
/// arriving for a moment: the drain starts after this.
pub const HANDOVER_SETTLE: Duration = Duration::from_secs(3);
/// The drain command's bound (portcullis's drain timeout, and a margin).
pub const DRAIN_WAIT: Duration = Duration::from_secs(90);
const IMDS_TIMEOUT: Duration = Duration::from_secs(3);
/// After the termination hook's wait is ended, EC2 shuts the instance
/// down within moments; the agent waits for it at most this long.
const TERMINATION_WAIT: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum HaError {
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("instance metadata: {0}")]
    Imds(String),
    #[error(transparent)]
    Ec2(#[from] ec2::Ec2Error),
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
    #[error("metrics listener {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// `/etc/portcullis/ha.toml`, written by cloud-init from the Terraform
/// module's inputs; the same on every gateway of the fleet.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct File {
    /// The value of every gateway's `portcullis:gateway` tag.
    fleet: String,
    /// AZ name => that AZ's private route tables.
    route_tables: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    ipv6: bool,
    /// This gateway's own admin endpoint (its `/readyz`).
    ready: Option<SocketAddr>,
    /// Siblings' admin port, probed at their private addresses.
    probe_port: Option<u16>,
    /// host:port this gateway must reach to count as able to serve.
    internet_check: String,
    /// Run once the routes have moved away, to drain the proxy.
    #[serde(default)]
    drain_command: Vec<String>,
    /// The agent's own `/metrics`.
    metrics_listen: Option<SocketAddr>,
    /// AZ name => that AZ's Elastic IP pool (allocation ids).
    #[serde(default)]
    eips: BTreeMap<String, Vec<String>>,
    /// The auto-scaling group's launch hook, ended once ready.
    launch_hook: Option<String>,
    /// Its termination hook, ended once drained.
    terminate_hook: Option<String>,
    /// `start PEER` / `stop` appended: routes flows of a sibling this
    /// gateway took over from on to it (ami/scripts/handoff.sh).
    #[serde(default)]
    handoff_command: Vec<String>,
    /// How long an earlier AZ must have been served by a new release
    /// before a later AZ's new gateway says it is ready (`rollout`).
    rollout_soak: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub fleet: String,
    pub layout: Layout,
    pub ready: SocketAddr,
    pub probe_port: u16,
    pub internet_check: String,
    pub drain_command: Vec<String>,
    pub metrics_listen: SocketAddr,
    pub eips: BTreeMap<Az, Vec<address::AllocationId>>,
    pub hooks: agent::Hooks,
    pub handoff_command: Vec<String>,
    pub rollout_soak: Duration,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, HaError> {
        let err = |message: String| HaError::Config {
            path: path.to_owned(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        Config::parse(&text).map_err(err)
    }

    pub fn parse(text: &str) -> Result<Config, String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        if file.fleet.trim().is_empty() {
            return Err("fleet must name the gateways' portcullis:gateway tag".into());
        }
        let mut tables = BTreeMap::new();
        let mut seen = std::collections::HashSet::new();
        for (az, ids) in file.route_tables {
            if az.is_empty() {
                return Err("route-tables: an AZ name is empty".into());
            }
            let mut list = Vec::new();
            for id in ids {
                let well_formed = id.strip_prefix("rtb-").is_some_and(|hex| {
                    !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit())
                });
                if !well_formed {
                    return Err(format!(
                        "route-tables.{az}: {id:?} is not a route table id (rtb-…)"
                    ));
                }
                if !seen.insert(id.clone()) {
                    return Err(format!("route-tables: {id} is listed for two AZs"));
                }
                list.push(RouteTableId(id));
            }
            tables.insert(Az(az), list);
        }
        let mut eips = BTreeMap::new();
        for (az, ids) in file.eips {
            let mut pool = Vec::new();
            for id in ids {
                if !id.starts_with("eipalloc-") {
                    return Err(format!(
                        "eips.{az}: {id:?} is not an allocation id (eipalloc-…)"
                    ));
                }
                pool.push(address::AllocationId(id));
            }
            eips.insert(Az(az), pool);
        }
        if !file.internet_check.contains(':') {
            return Err(format!(
                "internet-check: {:?} is not host:port",
                file.internet_check
            ));
        }
        let rollout_soak = match &file.rollout_soak {
            Some(s) => {
                crate::config::parse_duration(s).map_err(|e| format!("rollout-soak: {e}"))?
            }
            None => rollout::SOAK,
        };
        Ok(Config {
            fleet: file.fleet,
            layout: Layout {
                tables,
                ipv6: file.ipv6,
            },
            ready: file
                .ready
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9090))),
            probe_port: file.probe_port.unwrap_or(9090),
            internet_check: file.internet_check,
            drain_command: file.drain_command,
            metrics_listen: file
                .metrics_listen
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 9091))),
            eips,
            hooks: agent::Hooks {
                launch: file.launch_hook,
                terminate: file.terminate_hook,
            },
            handoff_command: file.handoff_command,
            rollout_soak,
        })
    }
}

/// The facts IMDS gives about this instance.
pub(crate) struct Identity {
    pub instance: InstanceId,
    pub region: String,
    imds: aws_config::imds::Client,
}

async fn imds_get(client: &aws_config::imds::Client, path: &str) -> Result<String, HaError> {
    tokio::time::timeout(IMDS_TIMEOUT, client.get(path))
        .await
        .map_err(|_| HaError::Imds(format!("{path}: no answer within {IMDS_TIMEOUT:?}")))?
        .map(|s| s.as_ref().to_owned())
        .map_err(|e| HaError::Imds(format!("{path}: {e}")))
}

/// IMDS answers within moments of boot; until it does, nothing can be done.
const IDENTITY_WAIT: Duration = Duration::from_secs(60);

pub(crate) async fn identity() -> Result<Identity, HaError> {
    let started = std::time::Instant::now();
    loop {
        match identity_once().await {
            Ok(id) => return Ok(id),
            Err(e) if started.elapsed() < IDENTITY_WAIT => {
                tracing::warn!(error = %e, "instance metadata not answering yet");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn identity_once() -> Result<Identity, HaError> {
    let provider = aws_config::provider_config::ProviderConfig::default()
        .with_http_client(crate::aws::https_client());
    let imds = aws_config::imds::Client::builder()
        .configure(&provider)
        .connect_timeout(Duration::from_secs(1))
        .read_timeout(Duration::from_secs(1))
        .max_attempts(2)
        .build();
    let instance = InstanceId(imds_get(&imds, "/latest/meta-data/instance-id").await?);
    let region = imds_get(&imds, "/latest/meta-data/placement/region").await?;
    Ok(Identity {
        instance,
        region,
        imds,
    })
}

/// Whether the auto-scaling group is taking this instance out (a rollout,
/// scale-in, instance lifetime): IMDS says so before the lifecycle hook's
/// wait ends.
async fn asg_terminating(imds: &aws_config::imds::Client) -> bool {
    imds_get(imds, "/latest/meta-data/autoscaling/target-lifecycle-state")
        .await
        .is_ok_and(|s| s.trim() == "Terminated")
}

/// Runs until the gateway has left: signalled, or taken out by its group.
pub async fn run(config: Config) -> Result<(), HaError> {
    let me = identity().await?;
    tracing::info!(instance = %me.instance, region = %me.region, fleet = %config.fleet, "HA agent starting");
    let exporter = crate::telemetry::Exporter::install_ha();
    crate::admin::spawn_metrics(config.metrics_listen, exporter).map_err(|source| {
        HaError::Metrics {
            addr: config.metrics_listen,
            source,
        }
    })?;
    tokio::spawn(ena::watch());
    let client = ec2::Client::new(&me.region).await?;
    let mut agent = agent::Agent::new(
        me.instance.clone(),
        client,
        config.fleet.clone(),
        config.layout.clone(),
    )
    .with_eips(config.eips.clone())
    .with_hooks(config.hooks.clone())
    .with_handoff(config.handoff_command.clone())
    .with_rollout_soak(config.rollout_soak);
    agent.reset_handoff().await;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(HaError::Signal)?;
    let mut every = tokio::time::interval(decide::PROBE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tick: u64 = 0;
    let mut left_at: Option<Millis> = None;
    // Taken out by the group, the agent drains the proxy itself and ends
    // the hook's wait. Stopped by systemd (a shutdown), it only hands over:
    // systemd stops portcullis next, which drains on its own SIGTERM, and a
    // stop job started from here would wait on the shutdown it is part of.
    let mut by_group = false;
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = term.recv() => {
                if !agent.brain.is_leaving() {
                    tracing::info!("SIGTERM: handing the routes over before the proxy stops");
                    agent.brain.leave();
                }
            }
        }
        tick += 1;
        check_everyone(&mut agent, &config).await;
        if tick.is_multiple_of(2) {
            if !agent.brain.is_leaving() && asg_terminating(&me.imds).await {
                tracing::info!(
                    "the auto-scaling group is taking this instance out: handing the routes over"
                );
                agent.brain.leave();
                by_group = true;
            }
            let now = Millis::now();
            agent.poll(now).await;
            report(&agent, &config.layout, now);
        }
        if agent.brain.is_leaving() {
            let now = Millis::now();
            let since = *left_at.get_or_insert(now);
            let said = agent
                .me()
                .and_then(|g| g.state)
                .is_some_and(|s| s.phase == fleet::Phase::Leaving);
            let handed_over = said && agent.holds_nothing(now);
            if handed_over || now.since(since) >= LEAVE_WAIT {
                if !handed_over {
                    tracing::warn!(
                        "no sibling took the routes within {LEAVE_WAIT:?}: draining anyway"
                    );
                }
                tokio::time::sleep(HANDOVER_SETTLE).await;
                agent.reset_handoff().await;
                if by_group {
                    drain(&config.drain_command).await;
                    agent.end_termination_wait().await;
                    // The instance is being terminated. Exiting now would
                    // have systemd start the agent again, over and over,
                    // until it is; wait for the shutdown's SIGTERM instead.
                    let _ = tokio::time::timeout(TERMINATION_WAIT, term.recv()).await;
                }
                return Ok(());
            }
        }
    }
}

/// Own check and sibling probes, all at once, each bounded.
async fn check_everyone<E: ec2::Ec2>(agent: &mut agent::Agent<E>, config: &Config) {
    // Only candidates are probed: a sibling still booting would pile up
    // failures and be challenged the moment it says it is ready.
    let now = Millis::now();
    let (siblings, others): (Vec<_>, Vec<_>) = agent
        .fleet(now)
        .map(|f| {
            f.gateways
                .iter()
                .filter(|g| &g.id != agent.brain.me())
                .map(|g| (g.id.clone(), g.ip, serving::candidate(g, now)))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .partition(|(_, _, candidate)| *candidate);
    for (id, _, _) in &others {
        agent.brain.forget(id);
    }
    let siblings: Vec<(InstanceId, SocketAddr)> = siblings
        .into_iter()
        .filter_map(|(id, ip, _)| Some((id, SocketAddr::new(ip?, config.probe_port))))
        .collect();
    let mut probes = tokio::task::JoinSet::new();
    for (id, addr) in siblings {
        probes.spawn(async move {
            let ok = agent::http_ok(addr, "/readyz", agent::PROBE_TIMEOUT).await;
            (id, ok)
        });
    }
    let bound = agent::SELF_CHECK_TIMEOUT;
    let (ready, online) = tokio::join!(
        agent::http_ok(config.ready, "/readyz", bound),
        agent::reaches(&config.internet_check, bound),
    );
    agent
        .brain
        .self_check(ready && online && agent.address_ok());
    // Each probe is bounded by PROBE_TIMEOUT, so this ends in time.
    while let Some(Ok((id, ok))) = probes.join_next().await {
        agent.brain.probe(&id, ok);
    }
}

fn report<E: ec2::Ec2>(agent: &agent::Agent<E>, layout: &Layout, now: Millis) {
    let Some(fleet) = agent.fleet(now) else {
        return;
    };
    metrics::gauge!(crate::telemetry::HA_UNSERVED_ROUTES).set(decide::unserved(fleet, now) as f64);
    let held = agent.routes_held(now).unwrap_or(0);
    metrics::gauge!(crate::telemetry::HA_ROUTES_HELD).set(held as f64);
    metrics::gauge!(crate::telemetry::HA_READY).set(if agent.brain.is_ready() { 1.0 } else { 0.0 });
    for (az, n) in decide::candidates_by_az(layout, fleet, now) {
        metrics::gauge!(crate::telemetry::HA_AZ_GATEWAYS, "az" => az.0.clone()).set(n as f64);
    }
}

async fn drain(command: &[String]) {
    let Some((program, args)) = command.split_first() else {
        return;
    };
    tracing::info!(command = %command.join(" "), "routes handed over: draining the proxy");
    let child = tokio::process::Command::new(program).args(args).status();
    match tokio::time::timeout(DRAIN_WAIT, child).await {
        Ok(Ok(status)) if status.success() => {}
        Ok(Ok(status)) => tracing::warn!(%status, "drain command failed"),
        Ok(Err(e)) => tracing::warn!(error = %e, "drain command did not start"),
        Err(_) => tracing::warn!("drain command still running after {DRAIN_WAIT:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_config_and_names_what_is_wrong() {
        let good = r#"
            fleet = "prod"
            internet-check = "s3.us-east-1.amazonaws.com:443"
            drain-command = ["systemctl", "stop", "portcullis.service"]
            [route-tables]
            us-east-1a = ["rtb-0a1"]
            us-east-1b = ["rtb-0b1", "rtb-0b2"]
        "#;
        let c = Config::parse(good).expect("valid");
        assert_eq!(c.layout.tables.len(), 2);
        assert_eq!(c.probe_port, 9090);
        assert_eq!(c.metrics_listen.port(), 9091);
        assert_eq!(c.rollout_soak, rollout::SOAK);
        let soak = format!("rollout-soak = \"5s\"\n{good}");
        assert_eq!(
            Config::parse(&soak).map(|c| c.rollout_soak),
            Ok(Duration::from_secs(5))
        );
        let bad = [
            (
                format!("rollout-soak = \"5\"\n{good}"),
                "rollout-soak: invalid duration",
            ),
            (good.replace("rtb-0b2", "rtb-0a1"), "listed for two AZs"),
            (good.replace("rtb-0b2", "subnet-1"), "not a route table id"),
            (good.replace("\"prod\"", "\" \""), "fleet must name"),
            (good.replace(":443", ""), "not host:port"),
            (good.replace("fleet =", "flete ="), "unknown field"),
        ];
        for (text, why) in bad {
            let e = Config::parse(&text).expect_err(why);
            assert!(e.contains(why), "{e}");
        }
    }

    #[tokio::test]
    async fn probe_of_a_peer_that_never_answers_gives_up_in_time() {
        // Accepts (the kernel's backlog does) but never answers.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = silent.local_addr().expect("addr");
        let started = std::time::Instant::now();
        assert!(!agent::http_ok(addr, "/readyz", agent::PROBE_TIMEOUT).await);
        assert!(started.elapsed() < agent::PROBE_TIMEOUT * 2);
    }
}
