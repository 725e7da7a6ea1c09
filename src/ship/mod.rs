//! `portcullis ship`: the audit file to CloudWatch Logs, so the trail
//! leaves the instance (whose disk goes with it) within a second or two.
//!
//! portcullis writes its records to a file (`--audit-file`, reopened on
//! SIGUSR1 when logrotate moves it); this process follows the file by path
//! ([`follow`]), puts its lines as events in batches within the API's
//! limits ([`batch`], [`logs`]), and only then records how far it got in a
//! state file. So a restart, a crash or an API outage resumes where the
//! last shipped line ended: every line is shipped at least once (a crash
//! between a put and the state write ships a batch twice), and a backlog
//! waits on disk, never in memory. Nothing is dropped for being slow; what
//! CloudWatch refuses (events older than the group keeps) is counted.
//!
//! - [`follow`]: the file across rotation and truncation, and the resume
//!   position.
//! - [`batch`]: lines as events, batched (pure).
//! - [`logs`]: CreateLogStream and PutLogEvents.

pub mod batch;
pub mod follow;
pub mod logs;

use follow::{Follower, Position};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How often the file is checked for new lines when there were none.
pub const POLL_EVERY: Duration = Duration::from_millis(500);
/// Lines read per round: about one full batch.
const READ_BYTES: usize = 900 * 1024;
/// Retries of a failed call back off from the first to the last.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// After SIGTERM, what is in the file is still shipped for at most this
/// long (the unit allows 20 s): a drain's last records leave with it.
pub const FINAL_FLUSH: Duration = Duration::from_secs(10);

/// SIGTERM, and the final flush it starts.
struct Stopping {
    term: tokio::signal::unix::Signal,
    by: Option<std::time::Instant>,
}

impl Stopping {
    fn begin(&mut self) {
        if self.by.is_none() {
            tracing::info!("SIGTERM: shipping what is left, for at most {FINAL_FLUSH:?}");
            self.by = Some(std::time::Instant::now() + FINAL_FLUSH);
        }
    }

    fn over(&self) -> bool {
        self.by.is_some_and(|by| std::time::Instant::now() >= by)
    }

    /// Sleeps `d`, cut short by SIGTERM or by the end of the final flush;
    /// false once the flush's time is up.
    async fn sleep(&mut self, d: Duration) -> bool {
        match self.by {
            Some(by) => {
                let left = by.saturating_duration_since(std::time::Instant::now());
                tokio::time::sleep(d.min(left)).await;
            }
            None => tokio::select! {
                _ = tokio::time::sleep(d) => {}
                _ = self.term.recv() => self.begin(),
            },
        }
        !self.over()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{0}")]
    Identity(String),
    #[error(transparent)]
    Logs(#[from] logs::LogsError),
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
    #[error("metrics listener {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// `/etc/portcullis/ship.toml`, written by cloud-init.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct File {
    /// The audit file portcullis writes (`--audit-file`).
    file: PathBuf,
    log_group: String,
    /// Default: this instance's id, from instance metadata.
    log_stream: Option<String>,
    /// Default: this instance's region, from instance metadata.
    region: Option<String>,
    /// Where the resume position is kept.
    state: PathBuf,
    metrics_listen: Option<SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    pub log_group: String,
    pub log_stream: Option<String>,
    pub region: Option<String>,
    pub state: PathBuf,
    pub metrics_listen: SocketAddr,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ShipError> {
        let err = |message: String| ShipError::Config {
            path: path.to_owned(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        Config::parse(&text).map_err(err)
    }

    pub fn parse(text: &str) -> Result<Config, String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        // CloudWatch's own rule for group names.
        let group_ok = (1..=512).contains(&file.log_group.len())
            && file
                .log_group
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-/.#".contains(&b));
        if !group_ok {
            return Err(format!(
                "log-group: {:?} is not a CloudWatch Logs group name",
                file.log_group
            ));
        }
        if let Some(stream) = &file.log_stream
            && (stream.is_empty() || stream.len() > 512 || stream.contains([':', '*']))
        {
            return Err(format!(
                "log-stream: {stream:?} is not a CloudWatch Logs stream name"
            ));
        }
        Ok(Config {
            file: file.file,
            log_group: file.log_group,
            log_stream: file.log_stream,
            region: file.region,
            state: file.state,
            metrics_listen: file
                .metrics_listen
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 9092))),
        })
    }
}

/// The resume position, if a readable one was saved.
fn load_position(path: &Path) -> Option<Position> {
    let text = std::fs::read_to_string(path).ok()?;
    match serde_json::from_str(&text) {
        Ok(at) => Some(at),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "unreadable ship state: starting at the beginning of the file");
            None
        }
    }
}

/// Written whole or not at all (a new file renamed over the old).
fn save_position(path: &Path, at: Position) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let text = serde_json::to_string(&at).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Runs until SIGTERM, then ships what is left in the file for at most
/// [`FINAL_FLUSH`]; what is still unshipped is shipped by the next run.
pub async fn run(config: Config) -> Result<(), ShipError> {
    use crate::telemetry::{
        SHIP_BEHIND_BYTES, SHIP_ERRORS, SHIP_LAST_SUCCESS, SHIP_RECORDS, SHIP_TRUNCATED,
    };
    let (region, stream) = match (&config.region, &config.log_stream) {
        (Some(region), Some(stream)) => (region.clone(), stream.clone()),
        _ => {
            let me = crate::ha::identity()
                .await
                .map_err(|e| ShipError::Identity(e.to_string()))?;
            (
                config.region.clone().unwrap_or(me.region),
                config.log_stream.clone().unwrap_or(me.instance.0),
            )
        }
    };
    let group = config.log_group.clone();
    tracing::info!(file = %config.file.display(), %group, %stream, %region, "audit shipper starting");
    let exporter = crate::telemetry::Exporter::install_ship();
    crate::admin::spawn_metrics(config.metrics_listen, exporter).map_err(|source| {
        ShipError::Metrics {
            addr: config.metrics_listen,
            source,
        }
    })?;
    let mut stopping = Stopping {
        term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(ShipError::Signal)?,
        by: None,
    };
    // The series exist from the start, so "nothing shipped" can alert
    // before the first success.
    metrics::counter!(SHIP_RECORDS, "result" => "shipped").increment(0);
    metrics::counter!(SHIP_RECORDS, "result" => "rejected").increment(0);
    let logs = logs::Logs::new(&region).await?;
    let (mut follower, lost) = Follower::new(&config.file, load_position(&config.state));
    if lost {
        metrics::counter!(SHIP_ERRORS, "kind" => "position_lost").increment(1);
        tracing::error!(
            "the file shipping stopped in is gone (rotated away twice while stopped?): lines after its last shipped one are lost; shipping the current file from its start"
        );
    }
    let mut backoff = BACKOFF_FIRST;
    // Waits `backoff` (doubling it); false once a final flush is over.
    macro_rules! pause {
        () => {{
            let wait = backoff;
            backoff = (backoff * 2).min(BACKOFF_MAX);
            stopping.sleep(wait).await
        }};
    }
    loop {
        match logs.create_stream(&group, &stream).await {
            Ok(()) => break,
            Err(e) => {
                metrics::counter!(SHIP_ERRORS, "kind" => e.kind()).increment(1);
                tracing::warn!(error = %e, "cannot create the log stream; retrying");
                if !pause!() {
                    return Ok(());
                }
            }
        }
    }
    backoff = BACKOFF_FIRST;
    loop {
        metrics::gauge!(SHIP_BEHIND_BYTES).set(follower.behind() as f64);
        let read = follower
            .read(READ_BYTES)
            .map_err(|source| ShipError::File {
                path: config.file.clone(),
                source,
            })?;
        if read.truncated {
            tracing::warn!(file = %config.file.display(), "the audit file was truncated in place: shipping it from its start");
        }
        if read.rotated {
            tracing::info!(file = %config.file.display(), "rotated file shipped to its end; following the new one");
        }
        if read.lines.is_empty() {
            if stopping.by.is_some() {
                tracing::info!("everything in the audit file is shipped: stopping");
                return Ok(());
            }
            stopping.sleep(POLL_EVERY).await;
            continue;
        }
        let now = now_ms();
        let mut events = Vec::with_capacity(read.lines.len());
        for line in &read.lines {
            let (event, cut) = batch::Event::from_line(line, now);
            if cut {
                metrics::counter!(SHIP_TRUNCATED).increment(1);
            }
            events.push(event);
        }
        for events in batch::batches(events) {
            loop {
                match logs.put(&group, &stream, &events).await {
                    Ok(rejected) => {
                        let shipped = events.len() - rejected.count;
                        metrics::counter!(SHIP_RECORDS, "result" => "shipped")
                            .increment(shipped as u64);
                        if rejected.count > 0 {
                            metrics::counter!(SHIP_RECORDS, "result" => "rejected")
                                .increment(rejected.count as u64);
                            tracing::warn!(
                                rejected = rejected.count,
                                "CloudWatch did not take some records (older than the group keeps, or far in the future)"
                            );
                        }
                        metrics::gauge!(SHIP_LAST_SUCCESS).set(now_ms() as f64 / 1000.0);
                        backoff = BACKOFF_FIRST;
                        break;
                    }
                    Err(logs::LogsError::NotFound(message)) => {
                        metrics::counter!(SHIP_ERRORS, "kind" => "not_found").increment(1);
                        tracing::warn!(%message, "log stream gone: creating it again");
                        if let Err(e) = logs.create_stream(&group, &stream).await {
                            tracing::warn!(error = %e, "cannot create the log stream");
                            if !pause!() {
                                return Ok(());
                            }
                        }
                    }
                    Err(logs::LogsError::Api { code, .. })
                        if code == "DataAlreadyAcceptedException" =>
                    {
                        // Taken already (a retry of a put that succeeded).
                        backoff = BACKOFF_FIRST;
                        break;
                    }
                    Err(e @ logs::LogsError::Api { .. }) if e.batch_refused() => {
                        // A refusal that retrying cannot change (the batch
                        // itself is wrong): counted, and shipping goes on.
                        // Anything else (access denied, a missing key) is
                        // retried until someone fixes it: never dropped.
                        metrics::counter!(SHIP_ERRORS, "kind" => e.kind()).increment(1);
                        metrics::counter!(SHIP_RECORDS, "result" => "rejected")
                            .increment(events.len() as u64);
                        tracing::error!(error = %e, records = events.len(), "CloudWatch refused a batch");
                        break;
                    }
                    Err(e) => {
                        metrics::counter!(SHIP_ERRORS, "kind" => e.kind()).increment(1);
                        tracing::warn!(error = %e, "cannot put the batch; retrying");
                        if !pause!() {
                            return Ok(());
                        }
                    }
                }
            }
        }
        if let Some(at) = follower.position()
            && let Err(e) = save_position(&config.state, at)
        {
            metrics::counter!(SHIP_ERRORS, "kind" => "state").increment(1);
            tracing::warn!(path = %config.state.display(), error = %e, "cannot save the ship state: a restart would ship some records again");
        }
        if stopping.over() {
            tracing::warn!(
                "SIGTERM: stopping before the audit file was all shipped; the next start ships the rest"
            );
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_config_and_names_what_is_wrong() {
        let good = r#"
            file = "/var/log/portcullis/audit.log"
            log-group = "/portcullis/prod/audit"
            state = "/var/lib/portcullis/ship.json"
        "#;
        let c = Config::parse(good).expect("valid");
        assert_eq!(c.metrics_listen.port(), 9092);
        assert_eq!(c.log_stream, None);
        for (text, why) in [
            (
                good.replace("/portcullis/prod/audit", "a b"),
                "not a CloudWatch Logs group",
            ),
            (
                format!("log-stream = \"i-1:2\"\n{good}"),
                "not a CloudWatch Logs stream",
            ),
            (good.replace("state =", "sate ="), "unknown field"),
        ] {
            let e = Config::parse(&text).expect_err(why);
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn the_position_survives_a_restart_and_garbage_reads_as_none() {
        let path =
            std::env::temp_dir().join(format!("portcullis-ship-state-{}", std::process::id()));
        let at = Position {
            inode: 42,
            offset: 1_000,
        };
        save_position(&path, at).unwrap();
        assert_eq!(load_position(&path), Some(at));
        std::fs::write(&path, "{not json").unwrap();
        assert_eq!(load_position(&path), None);
        let _ = std::fs::remove_file(&path);
        assert_eq!(load_position(&path), None);
    }
}
