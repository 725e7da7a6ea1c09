//! EC2's per-instance network allowances, as the ENA driver counts them
//! (`ethtool -S`): packets queued or dropped because the instance went
//! over its bandwidth, packet rate, connection-tracking or link-local
//! allowance. A gateway over them drops traffic while every check passes;
//! these counters are the only sign. Parsing is pure; the agent runs
//! `ethtool` on the default route's interface.

use std::time::Duration;

/// The allowance counters, and their metric label.
pub const EXCEEDED: [(&str, &str); 5] = [
    ("bw_in_allowance_exceeded", "bw_in"),
    ("bw_out_allowance_exceeded", "bw_out"),
    ("pps_allowance_exceeded", "pps"),
    ("conntrack_allowance_exceeded", "conntrack"),
    ("linklocal_allowance_exceeded", "linklocal"),
];
/// Connections the instance may still track.
pub const CONNTRACK_AVAILABLE: &str = "conntrack_allowance_available";

/// How often the counters are read, and how long `ethtool` may take.
pub const READ_EVERY: Duration = Duration::from_secs(15);
pub const READ_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Allowances {
    /// (label, count) for each counter the driver has.
    pub exceeded: Vec<(&'static str, u64)>,
    pub conntrack_available: Option<u64>,
}

/// The allowance counters in `ethtool -S` output; none on an interface
/// that is not ENA.
pub fn parse(stats: &str) -> Allowances {
    let mut out = Allowances::default();
    for line in stats.lines() {
        let Some((key, value)) = line.trim().split_once(':') else {
            continue;
        };
        let Ok(value) = value.trim().parse::<u64>() else {
            continue;
        };
        if let Some((_, label)) = EXCEEDED.iter().find(|(k, _)| *k == key) {
            out.exceeded.push((label, value));
        } else if key == CONNTRACK_AVAILABLE {
            out.conntrack_available = Some(value);
        }
    }
    out
}

/// The interface of the IPv4 default route in `/proc/net/route`.
pub fn default_interface(routes: &str) -> Option<&str> {
    routes.lines().skip(1).find_map(|line| {
        let mut fields = line.split_whitespace();
        let (iface, destination) = (fields.next()?, fields.next()?);
        let mask = fields.nth(5)?;
        (destination == "00000000" && mask == "00000000").then_some(iface)
    })
}

/// Runs `ethtool -S` on the default route's interface, within the bound.
pub async fn read() -> Option<Allowances> {
    let routes = std::fs::read_to_string("/proc/net/route").ok()?;
    let iface = default_interface(&routes)?.to_owned();
    let run = tokio::process::Command::new("ethtool")
        .args(["-S", &iface])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(READ_TIMEOUT, run).await.ok()?.ok()?;
    out.status
        .success()
        .then(|| parse(&String::from_utf8_lossy(&out.stdout)))
}

/// Reads the counters every [`READ_EVERY`] into the agent's metrics, for
/// as long as the agent runs; an interface without them exports nothing.
pub async fn watch() {
    use crate::telemetry::{ENA_CONNTRACK_AVAILABLE, ENA_EXCEEDED};
    let mut every = tokio::time::interval(READ_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut said = false;
    loop {
        every.tick().await;
        let Some(a) = read().await else { continue };
        if a.exceeded.is_empty() && !said {
            tracing::info!("no ENA allowance counters on the default route's interface (not ENA?)");
        }
        said = true;
        for (label, count) in &a.exceeded {
            metrics::counter!(ENA_EXCEEDED, "allowance" => *label).absolute(*count);
        }
        if let Some(n) = a.conntrack_available {
            metrics::gauge!(ENA_CONNTRACK_AVAILABLE).set(n as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of `ethtool -S ens5` on an ENA interface (trimmed).
    const ENA: &str = "NIC statistics:
     tx_timeout: 0
     suspend: 0
     bw_in_allowance_exceeded: 12
     bw_out_allowance_exceeded: 0
     pps_allowance_exceeded: 3
     conntrack_allowance_exceeded: 0
     linklocal_allowance_exceeded: 0
     conntrack_allowance_available: 136812
     queue_0_tx_cnt: 2961
";

    #[test]
    fn reads_the_allowance_counters_and_nothing_else() {
        let a = parse(ENA);
        assert_eq!(
            a.exceeded,
            [
                ("bw_in", 12),
                ("bw_out", 0),
                ("pps", 3),
                ("conntrack", 0),
                ("linklocal", 0)
            ]
        );
        assert_eq!(a.conntrack_available, Some(136_812));
        // A veth (the tests' namespaces) has none of them.
        assert_eq!(
            parse("NIC statistics:\n     peer_ifindex: 7\n"),
            Allowances::default()
        );
        assert_eq!(
            parse("garbage\n: :\nbw_in_allowance_exceeded: lots"),
            Allowances::default()
        );
    }

    #[test]
    fn finds_the_default_routes_interface() {
        let routes =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
ens6\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
ens5\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
";
        assert_eq!(default_interface(routes), Some("ens5"));
        assert_eq!(default_interface("Iface\tDestination\n"), None);
        assert_eq!(default_interface(""), None);
    }
}
