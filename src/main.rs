//! Command line: parse flags, set up logging, map results to exit codes.
#![forbid(unsafe_code)]

use clap::{Args, Parser, Subcommand};
use portcullis::allowlist::{Allowlist, Source, load_once, shared_suffixes, system_suffixes};
use portcullis::config::{ModeName, Settings, VerifyDst, parse_duration, parse_time};
use portcullis::detect::tls::TlsVersion;
use portcullis::discover::Tally;
use portcullis::name::HostName;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

/// Every connection allocates its task and a few small buffers; glibc's
/// allocator spent a sixth of the user time on them, mimalloc's thread
/// caches a fraction of that.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    version,
    about = "Transparent egress gateway: SNI/Host allowlisting with zero-copy forwarding"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Run(Box<RunArgs>),
    /// Validate an allowlist: exit 0 if valid, 1 if not (naming the line).
    Check {
        /// The allowlist: a file or s3://bucket/key [default: every policy's list in the config file]
        source: Option<String>,
        /// Take the allowlists from this config file (and check the file itself).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Exit 1 on entries that cover a shared public suffix (anyone can create names under it), not only warn.
        #[arg(long)]
        strict: bool,
    },
    /// Propose an allowlist from audit logs (e.g. a week of --mode monitor), on stdout.
    Discover {
        /// Audit logs: files of JSON lines, as `run` writes on stdout.
        #[arg(required = true)]
        logs: Vec<PathBuf>,
        /// Only connections this per-source policy decided ("default": clients in no policy) [all]
        #[arg(long)]
        policy: Option<String>,
    },
    /// Keep every AZ's private routes on a serving gateway (runs beside `run` on each gateway instance).
    Ha {
        /// TOML file: fleet, route-tables, internet-check, drain-command, …
        #[arg(long, default_value = "/etc/portcullis/ha.toml")]
        config: PathBuf,
    },
    /// Ship the audit file (`run --audit-file`) to CloudWatch Logs, resuming where it stopped.
    Ship {
        /// TOML file: file, log-group, state, …
        #[arg(long, default_value = "/etc/portcullis/ship.toml")]
        config: PathBuf,
    },
    /// Show how an allowlist decides names: exit 0 if all are allowed, 1 if any is denied.
    Match {
        /// The allowlist: a file or s3://bucket/key.
        source: String,
        /// Names to decide.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

/// Flags of `run`. Each overrides the config file; defaults are in brackets.
#[derive(Args)]
struct RunArgs {
    /// TOML file with any of these settings (keys are the flag names).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Allowlist: a file or s3://bucket/key (Squid dstdomain syntax).
    #[arg(long)]
    allowlist: Option<String>,
    /// Address for redirected TLS; repeatable [0.0.0.0:15443, [::]:15443]
    #[arg(long = "tls-listen")]
    tls_listen: Vec<SocketAddr>,
    /// Address for redirected plain HTTP; repeatable [0.0.0.0:15080, [::]:15080]
    #[arg(long = "http-listen")]
    http_listen: Vec<SocketAddr>,
    /// Admin endpoint: /healthz, /readyz [0.0.0.0:9090]
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Time from accept until the ClientHello or request head is complete [5s]
    #[arg(long, value_parser = parse_duration)]
    hello_timeout: Option<Duration>,
    /// Time to connect to the original destination [10s]
    #[arg(long, value_parser = parse_duration)]
    connect_timeout: Option<Duration>,
    /// Close a flow after this long with no byte in either direction [15m]
    #[arg(long, value_parser = parse_duration)]
    idle_timeout: Option<Duration>,
    /// Most connections served at once; more are refused [10000]
    #[arg(long)]
    max_connections: Option<u32>,
    /// Most connections one client (IPv4 address, IPv6 /64) may hold at once [a tenth of --max-connections]
    #[arg(long)]
    max_connections_per_source: Option<u32>,
    /// Once one side of a flow has closed, close it after this long with no byte moving [60s]
    #[arg(long, value_parser = parse_duration)]
    half_closed_timeout: Option<Duration>,
    /// A connection still open writes an interim audit record this often; 0s: never [5m]
    #[arg(long, value_parser = parse_duration)]
    audit_interval: Option<Duration>,
    /// Also write an audit record when a connection is admitted [only when it ends]
    #[arg(long)]
    audit_open: bool,
    /// Write the audit records to this file, reopened on SIGUSR1 (log rotation), instead of stdout [stdout]
    #[arg(long)]
    audit_file: Option<PathBuf>,
    /// Largest ClientHello or HTTP request head accepted, in bytes [16384]
    #[arg(long)]
    max_hello_bytes: Option<u32>,
    /// Refuse TLS whose highest offered version is below this: 1.0, 1.1, 1.2 or 1.3 [1.2]
    #[arg(long)]
    min_tls: Option<TlsVersion>,
    /// On SIGTERM, how long live connections may take to finish [30s]
    #[arg(long, value_parser = parse_duration)]
    drain_timeout: Option<Duration>,
    /// How often the allowlist source is checked, ±10% jitter [60s]
    #[arg(long, value_parser = parse_duration)]
    refresh: Option<Duration>,
    /// Where the last good copy of a remote allowlist is kept [/var/lib/portcullis]
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Accept an empty list replacing a non-empty one [refused]
    #[arg(long)]
    allow_empty: bool,
    /// Refuse a list with an entry that covers a shared public suffix such as .s3.amazonaws.com [warn]
    #[arg(long)]
    strict: bool,
    /// enforce: refuse what the policy denies; monitor: forward it, and log and count it as would_deny [enforce]
    #[arg(long, value_enum)]
    mode: Option<ModeName>,
    /// With --mode monitor: enforce from this date (midnight UTC) or RFC 3339 time on [never]
    #[arg(long, value_parser = parse_time)]
    monitor_until: Option<SystemTime>,
    /// pin: an allowed name goes only to its own addresses (the dialled one if it is one, else one it resolves to); dns: refuse a dialled address the name does not resolve to; off: trust the client's address [pin]
    #[arg(long, value_enum)]
    verify_dst: Option<VerifyDst>,
}

impl RunArgs {
    fn settings(self) -> Settings {
        let some = |v: Vec<SocketAddr>| (!v.is_empty()).then_some(v);
        Settings {
            allowlist: self.allowlist,
            tls_listen: some(self.tls_listen),
            http_listen: some(self.http_listen),
            metrics_listen: self.metrics_listen,
            hello_timeout: self.hello_timeout,
            connect_timeout: self.connect_timeout,
            idle_timeout: self.idle_timeout,
            max_connections: self.max_connections,
            max_connections_per_source: self.max_connections_per_source,
            half_closed_timeout: self.half_closed_timeout,
            audit_interval: self.audit_interval,
            audit_open: self.audit_open.then_some(true),
            audit_file: self.audit_file,
            max_hello_bytes: self.max_hello_bytes,
            min_tls: self.min_tls,
            drain_timeout: self.drain_timeout,
            refresh: self.refresh,
            cache_dir: self.cache_dir,
            allow_empty: self.allow_empty.then_some(true),
            strict: self.strict.then_some(true),
            mode: self.mode,
            monitor_until: self.monitor_until,
            verify_dst: self.verify_dst,
            // Policies are tables: the config file only.
            policy: Default::default(),
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line, not clap's usage screen.
            let text = e.render().to_string();
            let line = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("portcullis: {}", line.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Check {
            source,
            config,
            strict,
        } => check(source, config, strict),
        Command::Match { source, names } => match_names(&source, &names),
        Command::Discover { logs, policy } => discover(&logs, policy.as_deref()),
        Command::Ha { config } => ha(&config),
        Command::Ship { config } => ship(&config),
    };
    result.unwrap_or_else(|e| {
        eprintln!("portcullis: {e:#}");
        ExitCode::FAILURE
    })
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn ha(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let config = portcullis::ha::Config::load(path)?;
    helper(portcullis::ha::run(config))
}

fn ship(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let config = portcullis::ship::Config::load(path)?;
    helper(portcullis::ship::run(config))
}

/// Runs a helper process (`ha`, `ship`) on one thread until it is done.
fn helper<E>(run: impl std::future::Future<Output = Result<(), E>>) -> anyhow::Result<ExitCode>
where
    E: std::error::Error + Send + Sync + 'static,
{
    init_logging();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run)?;
    Ok(ExitCode::SUCCESS)
}

fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    init_logging();
    let file = match &args.config {
        Some(path) => Settings::from_file(path)?,
        None => Settings::default(),
    };
    let config = file.overlaid_with(args.settings()).into_config()?;
    // Connections are served on the workers' own runtimes (see `server`);
    // this one only loads lists, handles signals and drains.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(portcullis::server::run(config))?;
    // Connections still open after a drain timeout or SIGINT end here.
    runtime.shutdown_timeout(Duration::from_millis(100));
    Ok(ExitCode::SUCCESS)
}

/// Fetches and validates a list once (file or S3).
fn load(source: &Source) -> anyhow::Result<Allowlist> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(runtime.block_on(load_once(source))?)
}

fn check(
    source: Option<String>,
    config: Option<PathBuf>,
    strict: bool,
) -> anyhow::Result<ExitCode> {
    let file = match &config {
        Some(path) => Settings::from_file(path)?,
        None => Settings::default(),
    };
    let sources = match source {
        Some(source) => vec![(None, source.parse()?)],
        None => {
            let all = file.sources()?;
            all.into_iter().map(|(name, s)| (Some(name), s)).collect()
        }
    };
    let mut shared = 0;
    for (policy, source) in sources {
        let list = load(&source)?;
        for entry in shared_suffixes(&list, system_suffixes()) {
            shared += 1;
            eprintln!(
                "portcullis: warning: {source}: line {}: {entry}",
                entry.line
            );
        }
        match policy {
            Some(policy) => println!("{source}: ok, {} entries (policy {policy})", list.len()),
            None => println!("{source}: ok, {} entries", list.len()),
        }
    }
    if strict && shared > 0 {
        eprintln!("portcullis: {shared} entries cover a shared public suffix (--strict)");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn discover(logs: &[PathBuf], policy: Option<&str>) -> anyhow::Result<ExitCode> {
    let mut tally = policy.map_or_else(Tally::default, Tally::for_policy);
    for path in logs {
        let file =
            std::fs::File::open(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        tally
            .read(std::io::BufReader::new(file))
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    if tally.distinct_names() == 0 {
        let of = policy
            .map(|p| format!(" of policy {p}"))
            .unwrap_or_default();
        anyhow::bail!("no audit record{of} with a name in {} file(s)", logs.len());
    }
    if tally.skipped > 0 {
        eprintln!(
            "portcullis: skipped {} lines without a name (refusals before one was read, or not audit records)",
            tally.skipped
        );
    }
    print!("{}", tally.render());
    Ok(ExitCode::SUCCESS)
}

fn match_names(source: &str, names: &[String]) -> anyhow::Result<ExitCode> {
    let list = match source
        .parse()
        .map_err(anyhow::Error::from)
        .and_then(|s| load(&s))
    {
        Ok(list) => list,
        Err(e) => {
            eprintln!("portcullis: {e:#}");
            return Ok(ExitCode::from(2));
        }
    };
    let mut all_allowed = true;
    for raw in names {
        match HostName::from_config(raw) {
            Ok(name) => match list.lookup(name.as_str()) {
                Some(entry) => println!("{raw} allow {entry}"),
                None => {
                    all_allowed = false;
                    println!("{raw} deny");
                }
            },
            Err(e) => {
                all_allowed = false;
                println!("{raw} deny (not a valid name: {e})");
            }
        }
    }
    Ok(if all_allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
