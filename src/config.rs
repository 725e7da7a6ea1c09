//! Run-time settings: the config file and the flags fill one `Settings`
//! (flags laid over the file), which becomes a validated `Config`.

use crate::allowlist::{ReloadSettings, Source};
use crate::detect::tls::TlsVersion;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Everything `portcullis run` needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub reload: ReloadSettings,
    pub tls_listen: Vec<SocketAddr>,
    pub http_listen: Vec<SocketAddr>,
    pub metrics_listen: SocketAddr,
    pub limits: Limits,
    pub max_connections: usize,
    /// How long SIGTERM waits for live connections before exiting.
    pub drain_timeout: Duration,
    pub mode: Mode,
    pub verify_dst: VerifyDst,
}

/// `--verify-dst`: whether original destinations are checked against DNS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum VerifyDst {
    #[default]
    Off,
    Dns,
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
            max_hello_bytes: 16 * 1024,
            min_tls: TlsVersion::TLS1_2,
        }
    }
}

pub const DEFAULT_TLS_LISTEN: [&str; 2] = ["0.0.0.0:15443", "[::]:15443"];
pub const DEFAULT_HTTP_LISTEN: [&str; 2] = ["0.0.0.0:15080", "[::]:15080"];
pub const DEFAULT_METRICS_LISTEN: &str = "0.0.0.0:9090";
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(60);
pub const DEFAULT_CACHE_DIR: &str = "/var/lib/portcullis";
const MAX_HELLO_BYTES_RANGE: std::ops::RangeInclusive<u32> = 512..=(1 << 20);

/// Every run setting, each optional: read from the config file (keys are
/// the flag names) or from the flags.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Settings {
    pub allowlist: Option<String>,
    pub tls_listen: Option<Vec<SocketAddr>>,
    pub http_listen: Option<Vec<SocketAddr>>,
    pub metrics_listen: Option<SocketAddr>,
    #[serde(default, deserialize_with = "duration")]
    pub hello_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    pub connect_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    pub idle_timeout: Option<Duration>,
    pub max_connections: Option<u32>,
    pub max_hello_bytes: Option<u32>,
    #[serde(default, deserialize_with = "from_str")]
    pub min_tls: Option<TlsVersion>,
    #[serde(default, deserialize_with = "duration")]
    pub drain_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    pub refresh: Option<Duration>,
    pub cache_dir: Option<PathBuf>,
    pub allow_empty: Option<bool>,
    pub mode: Option<ModeName>,
    #[serde(default, deserialize_with = "time")]
    pub monitor_until: Option<SystemTime>,
    pub verify_dst: Option<VerifyDst>,
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
    let s = String::deserialize(d)?;
    s.parse().map(Some).map_err(serde::de::Error::custom)
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
    #[error("no allowlist: give --allowlist or set `allowlist` in the config file")]
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
}

impl Settings {
    /// Reads a TOML config file.
    pub fn from_file(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            line: e.span().map_or(1, |span| line_of(&text, span.start)),
            message: e.message().trim().replace('\n', " "),
        })
    }

    /// `self` with every setting that `over` has replaced by `over`'s.
    pub fn overlaid_with(self, over: Settings) -> Settings {
        Settings {
            allowlist: over.allowlist.or(self.allowlist),
            tls_listen: over.tls_listen.or(self.tls_listen),
            http_listen: over.http_listen.or(self.http_listen),
            metrics_listen: over.metrics_listen.or(self.metrics_listen),
            hello_timeout: over.hello_timeout.or(self.hello_timeout),
            connect_timeout: over.connect_timeout.or(self.connect_timeout),
            idle_timeout: over.idle_timeout.or(self.idle_timeout),
            max_connections: over.max_connections.or(self.max_connections),
            max_hello_bytes: over.max_hello_bytes.or(self.max_hello_bytes),
            min_tls: over.min_tls.or(self.min_tls),
            drain_timeout: over.drain_timeout.or(self.drain_timeout),
            refresh: over.refresh.or(self.refresh),
            cache_dir: over.cache_dir.or(self.cache_dir),
            allow_empty: over.allow_empty.or(self.allow_empty),
            mode: over.mode.or(self.mode),
            monitor_until: over.monitor_until.or(self.monitor_until),
            verify_dst: over.verify_dst.or(self.verify_dst),
        }
    }

    /// The allowlist source, if one is set.
    pub fn source(&self) -> Result<Source, ConfigError> {
        let raw = self.allowlist.as_deref().ok_or(ConfigError::NoAllowlist)?;
        Ok(raw.parse()?)
    }

    /// Applies defaults and validates.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let source = self.source()?;
        let defaults = Limits::default();
        let max_connections = self.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        if max_connections == 0 {
            return Err(ConfigError::OutOfRange {
                name: "max-connections",
                expected: "at least 1",
                value: 0,
            });
        }
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
        Ok(Config {
            reload: ReloadSettings {
                source,
                refresh,
                cache_dir: self
                    .cache_dir
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE_DIR)),
                allow_empty: self.allow_empty.unwrap_or(false),
            },
            tls_listen: listen(self.tls_listen, DEFAULT_TLS_LISTEN, "tls-listen")?,
            http_listen: listen(self.http_listen, DEFAULT_HTTP_LISTEN, "http-listen")?,
            metrics_listen: self
                .metrics_listen
                .unwrap_or_else(|| DEFAULT_METRICS_LISTEN.parse().expect("valid default")),
            limits: Limits {
                hello_timeout: self.hello_timeout.unwrap_or(defaults.hello_timeout),
                connect_timeout: self.connect_timeout.unwrap_or(defaults.connect_timeout),
                idle_timeout: self.idle_timeout.unwrap_or(defaults.idle_timeout),
                max_hello_bytes: max_hello_bytes as usize,
                min_tls: self.min_tls.unwrap_or(defaults.min_tls),
            },
            max_connections: max_connections as usize,
            drain_timeout: self.drain_timeout.unwrap_or(DEFAULT_DRAIN_TIMEOUT),
            mode,
            verify_dst: self.verify_dst.unwrap_or_default(),
        })
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

    #[test]
    fn the_shipped_example_config_sets_every_option() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/portcullis.toml");
        let s = Settings::from_file(&path).unwrap();
        // monitor-until only goes with mode = "monitor"; the example
        // enforces and shows it commented out.
        let debug = format!(
            "{:?}",
            s.clone().overlaid_with(Settings {
                monitor_until: Some(SystemTime::UNIX_EPOCH),
                ..Settings::default()
            })
        );
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
        let flags = Settings {
            hello_timeout: Some(Duration::from_millis(700)),
            ..Settings::default()
        };
        let c = Settings::from_file(&path)
            .unwrap()
            .overlaid_with(flags)
            .into_config()
            .unwrap();
        assert_eq!(c.limits.hello_timeout, Duration::from_millis(700));
        assert_eq!(c.reload.refresh, Duration::from_secs(10));
        assert_eq!(c.reload.source, "s3://b/k".parse().unwrap());
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(900));
        assert_eq!(c.tls_listen.len(), 2);
        assert_eq!(c.reload.cache_dir, PathBuf::from(DEFAULT_CACHE_DIR));
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
