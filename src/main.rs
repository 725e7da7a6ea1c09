//! Command line: parse flags, set up logging, map results to exit codes.
#![forbid(unsafe_code)]

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use portcullis::allowlist::{Allowlist, Source, load_once, shared_suffixes, system_suffixes};
use portcullis::config::Settings;
use portcullis::discover::Tally;
use portcullis::name::HostName;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Every connection allocates its task and a few small buffers; glibc's
/// allocator spent a sixth of the user time on them, mimalloc's thread
/// caches a fraction of that.
#[cfg(not(feature = "dhat-heap"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The heap profiler's build (`--features dhat-heap`, used by
/// benches/netns/profile.sh): every allocation is recorded, and
/// dhat-heap.json is written to the working directory when the process
/// exits cleanly.
#[cfg(feature = "dhat-heap")]
#[global_allocator]
static ALLOCATOR: dhat::Alloc = dhat::Alloc;

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
    /// Be an AWS Gateway Load Balancer target: GENEVE on UDP 6081 into the host's stack, where `run` serves it (with `GWLB=1 iptables/portcullis-iptables.sh apply`).
    Gwlb(GwlbArgs),
    /// Show how an allowlist decides names: exit 0 if all are allowed, 1 if any is denied.
    Match {
        /// The allowlist: a file or s3://bucket/key.
        source: String,
        /// Names to decide.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

/// Flags of `gwlb`; defaults are in brackets.
#[derive(Args)]
struct GwlbArgs {
    /// Where GWLB's GENEVE datagrams arrive.
    #[arg(long, default_value = "0.0.0.0:6081")]
    listen: std::net::SocketAddrV4,
    /// The tun device the inner packets enter the host by.
    #[arg(long, default_value = "gwlb0")]
    device: String,
    /// The device's IPv4 address (iptables REDIRECT needs one): link-local, so it collides with no VPC.
    #[arg(long, default_value = "169.254.60.81/30")]
    device_v4: String,
    /// The device's IPv6 address.
    #[arg(long, default_value = "fd00:6081::1/64")]
    device_v6: String,
    /// Flows tracked at most (about 150 bytes each); a new flow past it is dropped and counted.
    #[arg(long, default_value_t = 262_144)]
    max_flows: usize,
    /// `/metrics`, `/healthz`, and `/readyz` (200 while the tunnel serves).
    #[arg(long, default_value = "0.0.0.0:9093")]
    metrics_listen: std::net::SocketAddr,
}

/// Flags of `run`. Each overrides the config file; defaults are in brackets.
#[derive(Args)]
struct RunArgs {
    /// TOML file with any of these settings (keys are the flag names).
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: Settings,
}

fn main() -> ExitCode {
    #[cfg(feature = "dhat-heap")]
    let _profiler = dhat::Profiler::new_heap();
    // The matches are kept: `run` lays the flags given over its config file.
    let parsed = Cli::command()
        .try_get_matches()
        .and_then(|matches| Cli::from_arg_matches(&matches).map(|cli| (cli, matches)));
    let (cli, matches) = match parsed {
        Ok(parsed) => parsed,
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
        Command::Run(args) => {
            let flags = matches.subcommand_matches("run").unwrap_or(&matches);
            run(*args, flags)
        }
        Command::Check {
            source,
            config,
            strict,
        } => check(source, config, strict),
        Command::Match { source, names } => match_names(&source, &names),
        Command::Discover { logs, policy } => discover(&logs, policy.as_deref()),
        Command::Ha { config } => ha(&config),
        Command::Ship { config } => ship(&config),
        Command::Gwlb(args) => gwlb(args),
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

fn gwlb(args: GwlbArgs) -> anyhow::Result<ExitCode> {
    let config = portcullis_gwlb::tunnel::Config {
        listen: args.listen,
        device: args.device,
        device_v4: prefix(&args.device_v4, "--device-v4")?,
        device_v6: prefix(&args.device_v6, "--device-v6")?,
        max_flows: args.max_flows,
    };
    helper(portcullis::gwlb::run(config, args.metrics_listen))
}

/// `ADDRESS/LENGTH` as its parts.
fn prefix<A: std::str::FromStr>(text: &str, flag: &str) -> anyhow::Result<(A, u8)> {
    let parsed = text
        .split_once('/')
        .and_then(|(a, l)| Some((a.parse().ok()?, l.parse().ok()?)));
    parsed.ok_or_else(|| anyhow::anyhow!("{flag}: {text:?} is not ADDRESS/LENGTH"))
}

/// Runs a helper process (`ha`, `ship`, `gwlb`) on one thread until it is done.
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

fn run(args: RunArgs, flags: &clap::ArgMatches) -> anyhow::Result<ExitCode> {
    init_logging();
    let settings = match &args.config {
        // Each flag given replaces the file's setting.
        Some(path) => {
            let mut file = Settings::from_file(path)?;
            file.overlay(flags)?;
            file
        }
        None => args.settings,
    };
    let config = settings.into_config()?;
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
