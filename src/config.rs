//! Run-time settings: the config file and the flags fill one `Settings`
//! (flags laid over the file), which becomes a validated `Config`.

use crate::allowlist::{ReloadSettings, Source};
use crate::detect::tls::TlsVersion;
use crate::policy::{Cidr, MAX_POLICIES, PolicyId, PolicyName, SourceTable};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Everything `portcullis run` needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// The default policy first (the top-level allowlist), then the named
    /// ones; a policy's index here is its [`PolicyId`].
    pub policies: Vec<PolicyConfig>,
    /// Client address → policy.
    pub sources: SourceTable,
    pub tls_listen: Vec<SocketAddr>,
    pub http_listen: Vec<SocketAddr>,
    pub metrics_listen: SocketAddr,
    pub limits: Limits,
    pub max_connections: usize,
    /// Most connections one client (an IPv4 address, an IPv6 /64) may
    /// hold at once.
    pub max_connections_per_source: usize,
    /// Write an audit record when a connection is admitted, too.
    pub audit_open: bool,
    /// Where the audit records go: this file (reopened on SIGUSR1, for
    /// log rotation), or stdout.
    pub audit_file: Option<PathBuf>,
    /// How long SIGTERM waits for live connections before exiting.
    pub drain_timeout: Duration,
    pub mode: Mode,
    pub verify_dst: VerifyDst,
    /// A GWLB target: the tunnel's admin address, whose `/readyz` this
    /// gateway's readiness includes.
    pub gwlb_ready: Option<SocketAddr>,
}

/// One policy: its name and how its list is kept current.
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    pub name: PolicyName,
    pub reload: ReloadSettings,
}

/// A `[policy.NAME]` table of the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PolicySettings {
    /// Client address blocks this policy decides for.
    #[serde(deserialize_with = "blocks")]
    pub sources: Vec<toml::Spanned<Cidr>>,
    /// A file path or s3://bucket/key, as the top-level `allowlist`.
    #[serde(deserialize_with = "parsed")]
    pub allowlist: Source,
}

fn blocks<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<toml::Spanned<Cidr>>, D::Error> {
    let blocks = Vec::<toml::Spanned<Cidr>>::deserialize(d)?;
    if blocks.is_empty() {
        return Err(serde::de::Error::custom(
            "sources is empty: a policy needs at least one address block",
        ));
    }
    Ok(blocks)
}

/// `--verify-dst`: what an admitted name's DNS says about where its bytes
/// may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum VerifyDst {
    /// To the original destination when it is one of the name's
    /// addresses, else to one of the name's own addresses: a spoofed
    /// destination is never contacted, and DNS rotation never refuses.
    #[default]
    Pin,
    /// Refuse when the original destination is not one of the name's
    /// addresses.
    Dns,
    /// Trust the client's destination: any host can send bytes anywhere
    /// by naming an allowed host.
    Off,
}

/// Whether policy refusals are carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    /// Forward what enforce mode would refuse for policy, noting it as
    /// `would_deny`; until the given time, if any, then enforce.
    Monitor {
        until: Option<SystemTime>,
    },
}

impl Mode {
    pub fn enforcing_at(self, now: SystemTime) -> bool {
        match self {
            Mode::Enforce => true,
            Mode::Monitor { until: None } => false,
            Mode::Monitor { until: Some(end) } => now >= end,
        }
    }
}

/// `--mode` as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ModeName {
    Enforce,
    Monitor,
}

/// A point in time as `--monitor-until` takes it: a date (midnight UTC) or
/// an RFC 3339 time such as `2026-12-31T18:00:00Z`.
pub fn parse_time(s: &str) -> Result<SystemTime, TimeError> {
    let s = s.trim();
    let full = if s.len() == 10 {
        format!("{s}T00:00:00Z")
    } else {
        s.to_string()
    };
    humantime::parse_rfc3339_weak(&full).map_err(|_| TimeError(s.to_string()))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid time {0:?}: expected a date such as 2026-12-31 or a time such as 2026-12-31T18:00:00Z"
)]
pub struct TimeError(String);

/// Per-connection bounds.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// From accept until the ClientHello or first request head is complete;
    /// also the time a later request head may take once it has begun.
    pub hello_timeout: Duration,
    pub connect_timeout: Duration,
    /// A flow with no byte either way for this long is closed.
    pub idle_timeout: Duration,
    /// Once one side has closed, a flow with no byte for this long is closed.
    pub half_closed_timeout: Duration,
    /// A live connection writes an interim audit record this often;
    /// `None`: only when it ends.
    pub audit_interval: Option<Duration>,
    /// Cap on a ClientHello (record headers included) or request head.
    pub max_hello_bytes: usize,
    /// A ClientHello whose highest offered version is lower is refused.
    pub min_tls: TlsVersion,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            hello_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(15 * 60),
            half_closed_timeout: Duration::from_secs(60),
            audit_interval: Some(Duration::from_secs(5 * 60)),
            max_hello_bytes: 16 * 1024,
            min_tls: TlsVersion::TLS1_2,
        }
    }
}

impl Limits {
    /// The timers of a forwarding flow.
    pub fn flow_clock(&self) -> crate::net::forward::FlowClock {
        crate::net::forward::FlowClock {
            idle: self.idle_timeout,
            half_closed: self.half_closed_timeout,
            every: self.audit_interval,
        }
    }
}

pub const DEFAULT_TLS_LISTEN: [&str; 2] = ["0.0.0.0:15443", "[::]:15443"];
pub const DEFAULT_HTTP_LISTEN: [&str; 2] = ["0.0.0.0:15080", "[::]:15080"];
pub const DEFAULT_METRICS_LISTEN: &str = "0.0.0.0:9090";
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;
/// Without `max-connections-per-source`, one client may hold this share of
/// `max-connections` (one in ten): a single host, or a few, can never
/// take every slot, and it is still far above what one server keeps open
/// through a NAT.
pub const DEFAULT_PER_SOURCE_DIVISOR: usize = 10;
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(60);
pub const DEFAULT_CACHE_DIR: &str = "/var/lib/portcullis";
const MAX_HELLO_BYTES_RANGE: std::ops::RangeInclusive<u32> = 512..=(1 << 20);

/// Every run setting, each optional, written once: the same struct is the
/// flags of `portcullis run` (clap) and the config file's table (serde;
/// keys are the flag names). Flags given are laid over the file
/// ([`Settings::overlay`]); [`Settings::into_config`] applies the
/// defaults, which the help text shows in brackets (a test holds the two
/// together, and README's table with them).
#[derive(Debug, Clone, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Settings {
    /// Allowlist: a file or s3://bucket/key (Squid dstdomain syntax).
    #[arg(long)]
    pub allowlist: Option<String>,
    /// Address for redirected TLS; repeatable [0.0.0.0:15443, [::]:15443]
    #[arg(long)]
    pub tls_listen: Option<Vec<SocketAddr>>,
    /// Address for redirected plain HTTP; repeatable [0.0.0.0:15080, [::]:15080]
    #[arg(long)]
    pub http_listen: Option<Vec<SocketAddr>>,
    /// Admin endpoint: /metrics, /healthz, /readyz [0.0.0.0:9090]
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// A GWLB target: /readyz is 200 only while the tunnel whose admin endpoint is here (`portcullis gwlb --metrics-listen`) serves too [no tunnel]
    #[arg(long)]
    pub gwlb_ready: Option<SocketAddr>,
    /// Time from accept until the ClientHello or request head is complete [5s]
    #[arg(long, value_parser = parse_duration)]
    #[serde(default, deserialize_with = "duration")]
    pub hello_timeout: Option<Duration>,
    /// Time to connect to the original destination [10s]
    #[arg(long, value_parser = parse_duration)]
    #[serde(default, deserialize_with = "duration")]
    pub connect_timeout: Option<Duration>,
    /// Close a flow after this long with no byte in either direction [15m]
    #[arg(long, value_parser = parse_duration)]
    #[serde(default, deserialize_with = "duration")]
    pub idle_timeout: Option<Duration>,
    /// Most connections served at once; more are refused [10000]
    #[arg(long)]
    pub max_connections: Option<u32>,
    /// Most connections one client (IPv4 address, IPv6 /64) may hold at once [a tenth of --max-connections]
    #[arg(long)]
    pub max_connections_per_source: Option<u32>,
    /// Once one side of a flow has closed, close it after this long with no byte moving [60s]
    #[arg(long, value_parser = parse_duration)]
    #[serde(default, deserialize_with = "duration")]
    pub half_closed_timeout: Option<Duration>,
    /// A connection still open writes an interim audit record this often; 0s: never [5m]
    #[arg(long, value_parser = parse_duration)]
    #[serde(default, deserialize_with = "duration")]
    pub audit_interval: Option<Duration>,
    /// Also write an audit record when a connection is admitted [only when it ends]
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub audit_open: Option<bool>,
    /// Write the audit records to this file, reopened on SIGUSR1 (log rotation), instead of stdout [stdout]
    #[arg(long)]
    pub audit_file: Option<PathBuf>,
    /// Largest ClientHello or HTTP request head accepted, in bytes [16384]
    #[arg(long)]
    pub max_hello_bytes: Option<u32>,
    /// Refuse TLS whose highest offered version is below this: 1.0, 1.1, 1.2 or 1.3 [1.2]
    #[arg(long)]
    #[serde(default, deserialize_with = "from_str")]
    pub min_tls: Option<TlsVersion>,
    /// On SIGTERM, how long live connections may take to finish [30s]
    #[arg(long, value_parser = parse_duration)]
    #[serde(default, deserialize_with = "duration")]
    pub drain_timeout: Option<Duration>,
    /// How often the allowlist source is checked, ±10% jitter [60s]
    #[arg(long, value_parser = parse_duration)]
    #[serde(default, deserialize_with = "duration")]
    pub refresh: Option<Duration>,
    /// Where the last good copy of a remote allowlist is kept [/var/lib/portcullis]
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Accept an empty list replacing a non-empty one [refused]
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub allow_empty: Option<bool>,
    /// Refuse a list with an entry that covers a shared public suffix such as .s3.amazonaws.com [warn]
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub strict: Option<bool>,
    /// enforce: refuse what the policy denies; monitor: forward it, and log and count it as would_deny [enforce]
    #[arg(long, value_enum)]
    pub mode: Option<ModeName>,
    /// With --mode monitor: enforce from this date (midnight UTC) or RFC 3339 time on [never]
    #[arg(long, value_parser = parse_time)]
    #[serde(default, deserialize_with = "time")]
    pub monitor_until: Option<SystemTime>,
    /// pin: an allowed name goes only to its own addresses (the dialled one if it is one, else one it resolves to); dns: refuse a dialled address the name does not resolve to; off: trust the client's address [pin]
    #[arg(long, value_enum)]
    pub verify_dst: Option<VerifyDst>,
    /// Per-source policies, `[policy.NAME]`; tables, so the config file only.
    #[arg(skip)]
    #[serde(default)]
    pub policy: BTreeMap<PolicyName, PolicySettings>,
}

fn time<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
    let s = String::deserialize(d)?;
    parse_time(&s).map(Some).map_err(serde::de::Error::custom)
}

fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn from_str<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr<Err: std::fmt::Display>,
{
    parsed(d).map(Some)
}

/// A value read from its text through `FromStr`, so that a bad one is
/// reported at its line of the config file.
pub(crate) fn parsed<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr<Err: std::fmt::Display>,
{
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

/// A configuration that cannot be used, in one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: line {line}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error(
        "no allowlist: give --allowlist or set `allowlist` in the config file (the default policy's list)"
    )]
    NoAllowlist,
    #[error(transparent)]
    Source(#[from] crate::allowlist::SourceError),
    #[error("{name} must be {expected}, not {value}")]
    OutOfRange {
        name: &'static str,
        expected: &'static str,
        value: u64,
    },
    #[error("{0} lists no address")]
    NoAddress(&'static str),
    #[error("monitor-until needs mode = monitor")]
    UntilWithoutMonitor,
    #[error("{block} is in both policy {first} and policy {second}: give each block to one policy")]
    SharedBlock {
        block: Cidr,
        first: PolicyName,
        second: PolicyName,
    },
    #[error("{block} is given twice in policy {policy}")]
    RepeatedBlock { block: Cidr, policy: PolicyName },
    #[error("{0} policies: at most {MAX_POLICIES} besides the default")]
    TooManyPolicies(usize),
}

impl Settings {
    /// Reads a TOML config file.
    pub fn from_file(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let at_line = |offset: usize, message: String| ConfigError::Syntax {
            path: path.to_path_buf(),
            line: line_of(&text, offset),
            message,
        };
        let settings: Settings = toml::from_str(&text).map_err(|e| {
            let offset = e.span().map_or(0, |span| span.start);
            at_line(offset, e.message().trim().replace('\n', " "))
        })?;
        // Checked here too, where the blocks' places in the file are known.
        settings
            .source_table()
            .map_err(|(offset, e)| at_line(offset, e.to_string()))?;
        Ok(settings)
    }

    /// Client address → policy, ids in `self.policy`'s order from 1. A
    /// block given twice is refused at its second place in the file.
    fn source_table(&self) -> Result<SourceTable, (usize, ConfigError)> {
        let mut blocks = Vec::new();
        for (i, (name, policy)) in self.policy.iter().enumerate() {
            if i == MAX_POLICIES {
                let offset = policy.sources.first().map_or(0, |b| b.span().start);
                return Err((offset, ConfigError::TooManyPolicies(self.policy.len())));
            }
            let id = PolicyId(u16::try_from(i + 1).expect("at most MAX_POLICIES"));
            blocks.extend(
                policy
                    .sources
                    .iter()
                    .map(|b| (b.span().start, *b.get_ref(), id, name)),
            );
        }
        blocks.sort_by_key(|(offset, ..)| *offset);
        let names: Vec<&PolicyName> = self.policy.keys().collect();
        let mut table = SourceTable::default();
        for (offset, block, id, name) in blocks {
            table.insert(block, id).map_err(|taken| {
                let error = if taken == id {
                    ConfigError::RepeatedBlock {
                        block,
                        policy: name.clone(),
                    }
                } else {
                    ConfigError::SharedBlock {
                        block,
                        first: names[taken.index() - 1].clone(),
                        second: name.clone(),
                    }
                };
                (offset, error)
            })?;
        }
        Ok(table)
    }

    /// Lays the flags in `matches` (of a command [`Settings`] was
    /// flattened into) over `self`: each flag given replaces the file's
    /// setting, the others stay.
    pub fn overlay(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        clap::FromArgMatches::update_from_arg_matches(self, matches)
    }

    /// The default policy's allowlist source, if one is set.
    pub fn source(&self) -> Result<Source, ConfigError> {
        let raw = self.allowlist.as_deref().ok_or(ConfigError::NoAllowlist)?;
        Ok(raw.parse()?)
    }

    /// Every policy's allowlist source, the default first.
    pub fn sources(&self) -> Result<Vec<(PolicyName, Source)>, ConfigError> {
        let default = (PolicyName::default_policy(), self.source()?);
        let named = self
            .policy
            .iter()
            .map(|(name, p)| (name.clone(), p.allowlist.clone()));
        Ok(std::iter::once(default).chain(named).collect())
    }

    /// Applies defaults and validates.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let sources = self.sources()?;
        let table = self.source_table().map_err(|(_, e)| e)?;
        let defaults = Limits::default();
        let max_connections = self.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        if max_connections == 0 {
            return Err(ConfigError::OutOfRange {
                name: "max-connections",
                expected: "at least 1",
                value: 0,
            });
        }
        let per_source = match self.max_connections_per_source {
            None => (max_connections as usize / DEFAULT_PER_SOURCE_DIVISOR).max(1),
            Some(n) if (1..=max_connections).contains(&n) => n as usize,
            Some(n) => {
                return Err(ConfigError::OutOfRange {
                    name: "max-connections-per-source",
                    expected: "between 1 and max-connections",
                    value: n.into(),
                });
            }
        };
        let audit_interval = match self.audit_interval {
            None => defaults.audit_interval,
            Some(Duration::ZERO) => None,
            Some(every) if every >= Duration::from_secs(1) => Some(every),
            Some(every) => {
                return Err(ConfigError::OutOfRange {
                    name: "audit-interval (ms)",
                    expected: "0s (never) or at least 1s",
                    value: every.as_millis() as u64,
                });
            }
        };
        let max_hello_bytes = self
            .max_hello_bytes
            .unwrap_or(defaults.max_hello_bytes as u32);
        if !MAX_HELLO_BYTES_RANGE.contains(&max_hello_bytes) {
            return Err(ConfigError::OutOfRange {
                name: "max-hello-bytes",
                expected: "between 512 and 1048576",
                value: max_hello_bytes.into(),
            });
        }
        let refresh = self.refresh.unwrap_or(DEFAULT_REFRESH);
        if refresh < Duration::from_secs(1) {
            return Err(ConfigError::OutOfRange {
                name: "refresh",
                expected: "at least 1s",
                value: refresh.as_millis() as u64,
            });
        }
        let mode = match (self.mode, self.monitor_until) {
            (None | Some(ModeName::Enforce), None) => Mode::Enforce,
            (Some(ModeName::Monitor), until) => Mode::Monitor { until },
            (_, Some(_)) => return Err(ConfigError::UntilWithoutMonitor),
        };
        let listen = |given: Option<Vec<SocketAddr>>, defaults: [&str; 2], name| {
            let addrs = given.unwrap_or_else(|| {
                defaults
                    .iter()
                    .map(|a| a.parse().expect("valid default"))
                    .collect()
            });
            if addrs.is_empty() {
                Err(ConfigError::NoAddress(name))
            } else {
                Ok(addrs)
            }
        };
        let cache_dir = self
            .cache_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE_DIR));
        let allow_empty = self.allow_empty.unwrap_or(false);
        let strict = self.strict.unwrap_or(false);
        let policies = sources
            .into_iter()
            .map(|(name, source)| PolicyConfig {
                reload: ReloadSettings {
                    source,
                    refresh,
                    cache_dir: policy_cache_dir(&cache_dir, &name),
                    allow_empty,
                    strict,
                },
                name,
            })
            .collect();
        Ok(Config {
            policies,
            sources: table,
            tls_listen: listen(self.tls_listen, DEFAULT_TLS_LISTEN, "tls-listen")?,
            http_listen: listen(self.http_listen, DEFAULT_HTTP_LISTEN, "http-listen")?,
            metrics_listen: self
                .metrics_listen
                .unwrap_or_else(|| DEFAULT_METRICS_LISTEN.parse().expect("valid default")),
            limits: Limits {
                hello_timeout: self.hello_timeout.unwrap_or(defaults.hello_timeout),
                connect_timeout: self.connect_timeout.unwrap_or(defaults.connect_timeout),
                idle_timeout: self.idle_timeout.unwrap_or(defaults.idle_timeout),
                half_closed_timeout: self
                    .half_closed_timeout
                    .unwrap_or(defaults.half_closed_timeout),
                audit_interval,
                max_hello_bytes: max_hello_bytes as usize,
                min_tls: self.min_tls.unwrap_or(defaults.min_tls),
            },
            max_connections: max_connections as usize,
            max_connections_per_source: per_source,
            audit_open: self.audit_open.unwrap_or(false),
            audit_file: self.audit_file,
            gwlb_ready: self.gwlb_ready,
            drain_timeout: self.drain_timeout.unwrap_or(DEFAULT_DRAIN_TIMEOUT),
            mode,
            verify_dst: self.verify_dst.unwrap_or_default(),
        })
    }
}

/// Where a policy's last good remote list is kept: the default policy's
/// in the cache directory itself, each named policy's in a directory of
/// its own, so two policies never write one file.
fn policy_cache_dir(base: &Path, policy: &PolicyName) -> PathBuf {
    if policy.as_str() == crate::policy::DEFAULT_POLICY {
        base.to_path_buf()
    } else {
        base.join("policies").join(policy.as_str())
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {0:?}: expected a number and a unit (ms, s, m, h), e.g. 500ms, 5s, 15m")]
pub struct DurationError(String);

/// Parses `500ms`, `5s`, `15m`, `1h`. A unit is required: a bare `5` is
/// ambiguous.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let err = || DurationError(s.to_string());
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
    let (number, unit) = s.split_at(split);
    let n: u64 = number.parse().map_err(|_| err())?;
    let unit_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(err()),
    };
    n.checked_mul(unit_ms)
        .map(Duration::from_millis)
        .ok_or_else(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations_with_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
    }

    fn file(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("portcullis-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// `run`'s flags as clap parses `args`.
    fn flags(args: &[&str]) -> clap::ArgMatches {
        run_command().get_matches_from(std::iter::once("run").chain(args.iter().copied()))
    }

    fn run_command() -> clap::Command {
        <Settings as clap::Args>::augment_args(clap::Command::new("run"))
    }

    #[test]
    fn a_flag_given_as_false_replaces_the_files_true() {
        let path = file(
            "strict.toml",
            "allowlist = \"/l\"\nstrict = true\naudit-open = true\n",
        );
        let mut settings = Settings::from_file(&path).unwrap();
        settings.overlay(&flags(&["--strict=false"])).unwrap();
        assert_eq!(
            (settings.strict, settings.audit_open),
            (Some(false), Some(true))
        );
        settings.overlay(&flags(&[])).unwrap();
        assert_eq!(
            (settings.strict, settings.audit_open),
            (Some(false), Some(true))
        );
    }

    /// What the last balanced `[…]` of `help` holds (`[::]` may be inside).
    fn bracketed_tail(help: &str) -> Option<&str> {
        let inner = help.strip_suffix(']')?;
        let mut depth = 1;
        for (i, c) in inner.char_indices().rev() {
            match c {
                ']' => depth += 1,
                '[' if depth == 1 => return Some(&inner[i + 1..]),
                '[' => depth -= 1,
                _ => {}
            }
        }
        None
    }

    /// The default each flag's help shows in brackets, and README's table,
    /// are what `into_config` applies.
    #[test]
    fn help_and_readme_state_the_defaults_that_apply() {
        let limits = Limits::default();
        let addrs = |t: &str| -> Vec<SocketAddr> {
            t.split(", ")
                .map(|a| a.trim_matches('`').parse().unwrap())
                .collect()
        };
        let listen = |given: [&str; 2]| -> Vec<SocketAddr> {
            given.iter().map(|a| a.parse().unwrap()).collect()
        };
        let is_duration = |d: Duration| move |t: &str| parse_duration(t) == Ok(d);
        type Holds = Box<dyn Fn(&str) -> bool>;
        let checks: Vec<(&str, Holds)> = vec![
            (
                "tls-listen",
                Box::new(move |t| addrs(t) == listen(DEFAULT_TLS_LISTEN)),
            ),
            (
                "http-listen",
                Box::new(move |t| addrs(t) == listen(DEFAULT_HTTP_LISTEN)),
            ),
            (
                "metrics-listen",
                Box::new(|t| t.parse() == DEFAULT_METRICS_LISTEN.parse::<SocketAddr>()),
            ),
            ("hello-timeout", Box::new(is_duration(limits.hello_timeout))),
            (
                "connect-timeout",
                Box::new(is_duration(limits.connect_timeout)),
            ),
            ("idle-timeout", Box::new(is_duration(limits.idle_timeout))),
            (
                "half-closed-timeout",
                Box::new(is_duration(limits.half_closed_timeout)),
            ),
            (
                "audit-interval",
                Box::new(move |t| limits.audit_interval == parse_duration(t).ok()),
            ),
            (
                "drain-timeout",
                Box::new(is_duration(DEFAULT_DRAIN_TIMEOUT)),
            ),
            ("refresh", Box::new(is_duration(DEFAULT_REFRESH))),
            (
                "max-connections",
                Box::new(|t| t.parse() == Ok(DEFAULT_MAX_CONNECTIONS)),
            ),
            (
                "max-hello-bytes",
                Box::new(move |t| t.parse() == Ok(limits.max_hello_bytes)),
            ),
            (
                "min-tls",
                Box::new(move |t| t.parse() == Ok(limits.min_tls)),
            ),
            ("cache-dir", Box::new(|t| t == DEFAULT_CACHE_DIR)),
            ("mode", Box::new(|t| t == "enforce")),
            (
                "verify-dst",
                Box::new(|t| {
                    <VerifyDst as clap::ValueEnum>::from_str(t, false) == Ok(VerifyDst::default())
                }),
            ),
        ];
        let command = run_command();
        let readme =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
                .unwrap();
        for (flag, holds) in &checks {
            let arg = command
                .get_arguments()
                .find(|a| a.get_long() == Some(flag))
                .unwrap_or_else(|| panic!("no --{flag}"));
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            let shown = bracketed_tail(&help)
                .unwrap_or_else(|| panic!("--{flag}: no [default] in {help:?}"));
            assert!(holds(shown), "--{flag}'s help says [{shown}]");
            let row = readme
                .lines()
                .find(|l| {
                    l.starts_with(&format!("| `--{flag} "))
                        || l.starts_with(&format!("| `--{flag}`"))
                })
                .unwrap_or_else(|| panic!("README has no row for --{flag}"));
            let cell = row.split(" | ").nth(1).unwrap_or_default().trim();
            assert!(
                holds(cell.trim_matches('`')) || holds(cell),
                "README's --{flag} says {cell}"
            );
        }
    }

    #[test]
    fn the_shipped_example_config_sets_every_option() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/portcullis.toml");
        let s = Settings::from_file(&path).unwrap();
        // monitor-until only goes with mode = "monitor"; the example
        // enforces and shows it commented out.
        let mut every = s.clone();
        every.monitor_until = Some(SystemTime::UNIX_EPOCH);
        // Only a GWLB target waits for its tunnel; the example shows it
        // commented out.
        every.gwlb_ready = Some(SocketAddr::from(([127, 0, 0, 1], 9093)));
        let debug = format!("{every:?}");
        assert!(
            !debug.contains("None"),
            "every setting appears in the example: {debug}"
        );
        s.into_config().unwrap();
    }

    #[test]
    fn monitor_mode_ends_at_its_time_and_needs_monitor() {
        let end = parse_time("2026-12-31").unwrap();
        assert_eq!(end, parse_time("2026-12-31T00:00:00Z").unwrap());
        assert!(parse_time("31/12/2026").is_err());
        let mode = Mode::Monitor { until: Some(end) };
        assert!(!mode.enforcing_at(end - Duration::from_secs(1)));
        assert!(mode.enforcing_at(end));
        assert!(!Mode::Monitor { until: None }.enforcing_at(end));
        assert!(Mode::Enforce.enforcing_at(SystemTime::UNIX_EPOCH));

        let path = file(
            "monitor.toml",
            "allowlist = \"/l\"\nmode = \"monitor\"\nmonitor-until = \"2026-12-31\"\n",
        );
        let c = Settings::from_file(&path).unwrap().into_config().unwrap();
        assert_eq!(c.mode, Mode::Monitor { until: Some(end) });
        let path = file(
            "until-alone.toml",
            "allowlist = \"/l\"\nmonitor-until = \"2026-12-31\"\n",
        );
        let err = Settings::from_file(&path)
            .unwrap()
            .into_config()
            .unwrap_err();
        assert_eq!(err.to_string(), "monitor-until needs mode = monitor");
    }

    #[test]
    fn flags_override_the_file_and_defaults_fill_the_rest() {
        let path = file(
            "over.toml",
            "allowlist = \"s3://b/k\"\nhello-timeout = \"2s\"\nrefresh = \"10s\"\n",
        );
        let mut settings = Settings::from_file(&path).unwrap();
        settings
            .overlay(&flags(&["--hello-timeout", "700ms", "--strict"]))
            .unwrap();
        assert_eq!(settings.strict, Some(true));
        let c = settings.into_config().unwrap();
        assert_eq!(c.limits.hello_timeout, Duration::from_millis(700));
        assert_eq!(c.policies[0].reload.refresh, Duration::from_secs(10));
        assert_eq!(c.policies[0].reload.source, "s3://b/k".parse().unwrap());
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(900));
        assert_eq!(c.tls_listen.len(), 2);
        assert_eq!(
            c.policies[0].reload.cache_dir,
            PathBuf::from(DEFAULT_CACHE_DIR)
        );
    }

    #[test]
    fn config_errors_are_one_line_naming_file_and_line() {
        let path = file("bad.toml", "allowlist = \"x\"\n\nhello-timeout = \"5\"\n");
        let e = Settings::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("bad.toml: line 3: ") && !e.contains('\n'), "{e}");
        let path = file("unknown.toml", "allowlist = \"x\"\nbogus = 1\n");
        let e = Settings::from_file(&path).unwrap_err().to_string();
        assert!(
            e.contains("unknown.toml: line 2: ") && e.contains("bogus"),
            "{e}"
        );
        assert!(matches!(
            Settings::default().into_config(),
            Err(ConfigError::NoAllowlist)
        ));
        let zero = Settings {
            allowlist: Some("x".into()),
            max_connections: Some(0),
            ..Settings::default()
        };
        assert!(matches!(
            zero.into_config(),
            Err(ConfigError::OutOfRange { .. })
        ));
    }

    #[test]
    fn one_client_gets_a_tenth_of_the_connections_unless_told_otherwise() {
        let with = |max: Option<u32>, per_source: Option<u32>| {
            Settings {
                allowlist: Some("x".into()),
                max_connections: max,
                max_connections_per_source: per_source,
                ..Settings::default()
            }
            .into_config()
        };
        let share = |c: Result<Config, ConfigError>| c.unwrap().max_connections_per_source;
        assert_eq!(share(with(None, None)), 1_000);
        assert_eq!(share(with(Some(50_000), None)), 5_000);
        assert_eq!(share(with(Some(4), None)), 1, "never zero");
        assert_eq!(share(with(Some(4), Some(4))), 4, "up to the total");
        for bad in [0, 5] {
            let e = with(Some(4), Some(bad)).unwrap_err().to_string();
            assert!(e.starts_with("max-connections-per-source must be"), "{e}");
        }
    }

    #[test]
    fn interim_records_come_every_five_minutes_or_never() {
        let every = |interval: Option<&str>| {
            Settings {
                allowlist: Some("x".into()),
                audit_interval: interval.map(|i| parse_duration(i).unwrap()),
                ..Settings::default()
            }
            .into_config()
            .map(|c| c.limits.audit_interval)
        };
        assert_eq!(every(None).unwrap(), Some(Duration::from_secs(300)));
        assert_eq!(every(Some("30s")).unwrap(), Some(Duration::from_secs(30)));
        assert_eq!(every(Some("0s")).unwrap(), None);
        assert!(every(Some("500ms")).is_err(), "more often than 1 s");
        let defaults = Limits::default();
        assert_eq!(defaults.half_closed_timeout, Duration::from_secs(60));
    }

    const POLICIES: &str = "\
allowlist = \"/etc/portcullis/default.txt\"
cache-dir = \"/var/lib/portcullis\"

[policy.ci]
sources = [\"192.0.2.128/25\", \"2001:db8:1:0:8000::/65\"]
allowlist = \"s3://bucket/ci.txt\"

[policy.ci-runner-7]
sources = [\"192.0.2.131\"]
allowlist = \"/etc/portcullis/runner-7.txt\"
";

    #[test]
    fn policies_get_their_own_lists_and_the_most_specific_block_wins() {
        let path = file("policies.toml", POLICIES);
        let c = Settings::from_file(&path).unwrap().into_config().unwrap();
        let names: Vec<&str> = c.policies.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["default", "ci", "ci-runner-7"]);
        let sources: Vec<String> = c
            .policies
            .iter()
            .map(|p| p.reload.source.to_string())
            .collect();
        assert_eq!(
            sources,
            [
                "/etc/portcullis/default.txt",
                "s3://bucket/ci.txt",
                "/etc/portcullis/runner-7.txt"
            ]
        );
        // Each named policy caches in a directory of its own.
        assert_eq!(
            c.policies[0].reload.cache_dir,
            PathBuf::from("/var/lib/portcullis")
        );
        assert_eq!(
            c.policies[1].reload.cache_dir,
            PathBuf::from("/var/lib/portcullis/policies/ci")
        );
        let of = |ip: &str| {
            c.policies[c.sources.policy_of(ip.parse().unwrap()).index()]
                .name
                .as_str()
        };
        assert_eq!(of("192.0.2.2"), "default");
        assert_eq!(of("192.0.2.130"), "ci");
        assert_eq!(of("192.0.2.131"), "ci-runner-7");
        assert_eq!(of("2001:db8:1:0:8000::2"), "ci");
        assert_eq!(of("2001:db8:1::2"), "default");
    }

    #[test]
    fn a_bad_policy_is_one_line_naming_the_file_and_its_line() {
        let cases = [
            (
                "sources = [\"192.0.2.128/25\", \"192.0.2.7/24\"]",
                5,
                "did you mean 192.0.2.0/24?",
            ),
            (
                "sources = [\"192.0.2.300/32\"]",
                5,
                "is not an address block",
            ),
            ("sources = []", 5, "sources is empty"),
            // The block's second place in the file is the one named.
            (
                "sources = [\"192.0.2.131\"]",
                9,
                "192.0.2.131/32 is in both policy ci and policy ci-runner-7",
            ),
            ("sources = [\"192.0.2.128/25\"]\nbogus = 1", 6, "bogus"),
            (
                "sources = [\"192.0.2.128/25\",\n  \"192.0.2.128/25\"]",
                6,
                "192.0.2.128/25 is given twice in policy ci",
            ),
        ];
        for (i, (sources, line, message)) in cases.into_iter().enumerate() {
            let text = POLICIES.replacen(
                "sources = [\"192.0.2.128/25\", \"2001:db8:1:0:8000::/65\"]",
                sources,
                1,
            );
            let path = file(&format!("bad-policy-{i}.toml"), &text);
            let e = Settings::from_file(&path).unwrap_err().to_string();
            assert!(
                e.contains(&format!("bad-policy-{i}.toml: line {line}: "))
                    && e.contains(message)
                    && !e.contains('\n'),
                "{sources}: {e}"
            );
        }
        for (header, message) in [
            ("[policy.CI]", "policy name \"CI\""),
            ("[policy.default]", "policy name \"default\" is taken"),
        ] {
            let path = file(
                "bad-name.toml",
                &POLICIES.replacen("[policy.ci]", header, 1),
            );
            let e = Settings::from_file(&path).unwrap_err().to_string();
            assert!(
                e.contains("bad-name.toml: line 4: ") && e.contains(message),
                "{e}"
            );
        }
        let path = file(
            "no-list.toml",
            &POLICIES.replacen("allowlist = \"s3://bucket/ci.txt\"", "", 1),
        );
        let e = Settings::from_file(&path).unwrap_err().to_string();
        assert!(
            e.contains("no-list.toml: line 4: ") && e.contains("allowlist"),
            "{e}"
        );
        // Policies need a default for everyone else.
        let path = file("no-default.toml", POLICIES.split_once('\n').unwrap().1);
        let e = Settings::from_file(&path)
            .unwrap()
            .into_config()
            .unwrap_err();
        assert!(matches!(e, ConfigError::NoAllowlist), "{e}");
    }

    #[test]
    fn policies_are_bounded_in_number() {
        let policies = |n: usize| {
            let mut text = String::from("allowlist = \"/l\"\n");
            for i in 0..n {
                text.push_str(&format!(
                    "[policy.p{i}]\nsources = [\"192.0.2.{i}\"]\nallowlist = \"/l{i}\"\n"
                ));
            }
            file(&format!("policies-{n}.toml"), &text)
        };
        let e = Settings::from_file(&policies(MAX_POLICIES + 1))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("33 policies: at most 32 besides the default"),
            "{e}"
        );
        let c = Settings::from_file(&policies(MAX_POLICIES))
            .unwrap()
            .into_config()
            .unwrap();
        assert_eq!(c.policies.len(), MAX_POLICIES + 1);
    }

    #[test]
    fn refuses_durations_without_a_known_unit() {
        for s in [
            "5",
            "",
            "s",
            "5 s",
            "1.5s",
            "5d",
            "-1s",
            "99999999999999999999h",
        ] {
            assert!(parse_duration(s).is_err(), "{s}");
        }
    }
}
