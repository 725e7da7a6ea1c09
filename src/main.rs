//! Command line: parse flags, set up logging, map results to exit codes.

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use portcullis::allowlist::{self, Allowlist};
use portcullis::config::{Config, Limits, parse_duration};
use portcullis::name::HostName;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

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
    Run(RunArgs),
    /// Validate an allowlist: exit 0 if valid, 1 if not (naming the line).
    Check {
        /// The allowlist file.
        path: PathBuf,
    },
    /// Show how an allowlist decides names: exit 0 if all are allowed, 1 if any is denied.
    Match {
        /// The allowlist file.
        path: PathBuf,
        /// Names to decide.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Allowlist file (Squid dstdomain syntax).
    #[arg(long)]
    allowlist: PathBuf,
    /// Address for redirected TLS (repeatable).
    #[arg(long = "tls-listen", default_values = ["0.0.0.0:15443", "[::]:15443"])]
    tls_listen: Vec<SocketAddr>,
    /// Address for redirected plain HTTP (repeatable).
    #[arg(long = "http-listen", default_values = ["0.0.0.0:15080", "[::]:15080"])]
    http_listen: Vec<SocketAddr>,
    /// Address of the admin endpoint (/healthz).
    #[arg(long, default_value = "0.0.0.0:9090")]
    metrics_listen: SocketAddr,
    /// Time allowed from accept until the ClientHello or request head is complete.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    hello_timeout: Duration,
    /// Time allowed to connect to the original destination.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// Close a flow after this long with no byte in either direction.
    #[arg(long, default_value = "15m", value_parser = parse_duration)]
    idle_timeout: Duration,
    /// Most connections served at once; more are refused.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// Largest ClientHello or HTTP request head accepted, in bytes.
    #[arg(long, default_value_t = 16 * 1024, value_parser = clap::value_parser!(u32).range(512..=1 << 20))]
    max_hello_bytes: u32,
    /// On SIGTERM, how long live connections may take to finish.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    drain_timeout: Duration,
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
    match cli.command {
        Command::Run(args) => run(args),
        Command::Check { path } => check(&path),
        Command::Match { path, names } => match_names(&path, &names),
    }
}

fn run(args: RunArgs) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match serve(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portcullis: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: RunArgs) -> anyhow::Result<()> {
    let allowlist = load(&args.allowlist)?;
    let config = Config {
        allowlist: args.allowlist,
        tls_listen: args.tls_listen,
        http_listen: args.http_listen,
        metrics_listen: args.metrics_listen,
        limits: Limits {
            hello_timeout: args.hello_timeout,
            connect_timeout: args.connect_timeout,
            idle_timeout: args.idle_timeout,
            max_hello_bytes: args.max_hello_bytes as usize,
        },
        max_connections: args.max_connections as usize,
        drain_timeout: args.drain_timeout,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(portcullis::server::run(config, allowlist))?;
    // Connections still open after a drain timeout or SIGINT end here.
    runtime.shutdown_timeout(Duration::from_millis(100));
    Ok(())
}

/// Reads and parses a list; the error names the file and the line.
fn load(path: &Path) -> anyhow::Result<Allowlist> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    allowlist::parse(&text).with_context(|| format!("{}", path.display()))
}

fn check(path: &Path) -> ExitCode {
    match load(path) {
        Ok(list) => {
            println!("{}: ok, {} entries", path.display(), list.len());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("portcullis: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn match_names(path: &Path, names: &[String]) -> ExitCode {
    let list = match load(path) {
        Ok(list) => list,
        Err(e) => {
            eprintln!("portcullis: {e:#}");
            return ExitCode::from(2);
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
    if all_allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
