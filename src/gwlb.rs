//! `portcullis gwlb`: the GWLB tunnel (crate `portcullis-gwlb`) as a
//! program: its flags, its metrics and health endpoint, its exit.

use crate::telemetry::{self, Exporter};
use portcullis_gwlb::tunnel::{self, Dropped, Stats, TunnelError};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use thiserror::Error;

/// How often the tunnel's counts are published to its metrics.
const PUBLISH_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Error)]
pub enum GwlbError {
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
    #[error("cannot serve metrics on {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Runs the tunnel, with `/metrics`, `/healthz` and `/readyz` (200 while
/// the tunnel serves) on `metrics_listen`.
pub async fn run(config: tunnel::Config, metrics_listen: SocketAddr) -> Result<(), GwlbError> {
    let stats = Arc::new(Stats::default());
    let exporter = Exporter::install_gwlb();
    let serving = stats.clone();
    let ready = Arc::new(move || match serving.serving.load(Ordering::Acquire) {
        true => Ok(()),
        false => Err("the tunnel is not serving"),
    });
    crate::admin::spawn(metrics_listen, ready, exporter).map_err(|source| GwlbError::Admin {
        addr: metrics_listen,
        source,
    })?;
    let published = stats.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(PUBLISH_EVERY);
        loop {
            every.tick().await;
            publish(&published);
        }
    });
    let result = tunnel::run(&config, stats.clone()).await;
    publish(&stats);
    Ok(result?)
}

/// The tunnel's counts as its metric families.
fn publish(stats: &Stats) {
    for (direction, counts) in [("from_gwlb", &stats.from_gwlb), ("to_gwlb", &stats.to_gwlb)] {
        let packets = counts.packets.load(Ordering::Relaxed);
        let bytes = counts.bytes.load(Ordering::Relaxed);
        metrics::counter!(telemetry::GWLB_PACKETS, "direction" => direction).absolute(packets);
        metrics::counter!(telemetry::GWLB_BYTES, "direction" => direction).absolute(bytes);
    }
    for (why, count) in Dropped::ALL.iter().zip(&stats.dropped) {
        metrics::counter!(telemetry::GWLB_DROPPED, "reason" => why.as_str())
            .absolute(count.load(Ordering::Relaxed));
    }
    metrics::gauge!(telemetry::GWLB_FLOWS).set(stats.flows.load(Ordering::Relaxed) as f64);
    let serving = stats.serving.load(Ordering::Relaxed);
    metrics::gauge!(telemetry::GWLB_SERVING).set(f64::from(u8::from(serving)));
}
