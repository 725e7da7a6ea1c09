//! The admin endpoint (`--metrics-listen`): `/metrics` (Prometheus text
//! format), `/healthz` (the process runs) and `/readyz` (it can serve: a
//! list is loaded and the listeners are bound). It runs on its own thread
//! and runtime so a saturated data path cannot starve it.

use crate::detect::Detect;
use crate::telemetry::Exporter;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MAX_REQUEST: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often histogram samples are folded into their buckets.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Answers whether the gateway is ready, or why not.
pub type Readiness = Arc<dyn Fn() -> Result<(), &'static str> + Send + Sync>;

/// For a helper process (`portcullis ha`, `ship`): its metrics, and
/// `/readyz` always 200, since it has no readiness of its own to report.
pub fn spawn_metrics(addr: SocketAddr, exporter: Exporter) -> io::Result<SocketAddr> {
    spawn(addr, Arc::new(|| Ok(())), exporter)
}

/// Binds now (so a busy port fails start-up) and serves on a new thread.
pub fn spawn(addr: SocketAddr, ready: Readiness, exporter: Exporter) -> io::Result<SocketAddr> {
    let std_listener = std::net::TcpListener::bind(addr)?;
    std_listener.set_nonblocking(true)?;
    let local = std_listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match TcpListener::from_std(std_listener) {
                    Ok(l) => l,
                    Err(e) => return tracing::error!(error = %e, "admin listener failed"),
                };
                let upkeep = exporter.clone();
                tokio::spawn(async move {
                    let mut every = tokio::time::interval(UPKEEP_EVERY);
                    loop {
                        every.tick().await;
                        upkeep.upkeep();
                    }
                });
                loop {
                    match listener.accept().await {
                        Ok((stream, _)) => {
                            let (ready, exporter) = (ready.clone(), exporter.clone());
                            tokio::spawn(async move {
                                let answer = answer(stream, &ready, &exporter);
                                let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer).await;
                            });
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            })
        })?;
    Ok(local)
}

async fn answer(mut stream: TcpStream, ready: &Readiness, exporter: &Exporter) -> io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let path = loop {
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        match request_path(&buf) {
            Detect::Done(path) => break path,
            Detect::Invalid(()) => return respond(&mut stream, 400, "bad request\n").await,
            Detect::Incomplete if buf.len() >= MAX_REQUEST => {
                return respond(&mut stream, 431, "too large\n").await;
            }
            Detect::Incomplete => {}
        }
    };
    match path.as_str() {
        "/metrics" => {
            exporter.upkeep();
            let text = exporter.render();
            respond_with(&mut stream, 200, METRICS_TYPE, &text).await
        }
        "/healthz" => respond(&mut stream, 200, "ok\n").await,
        "/readyz" => match ready() {
            Ok(()) => respond(&mut stream, 200, "ready\n").await,
            Err(why) => respond(&mut stream, 503, &format!("not ready: {why}\n")).await,
        },
        _ => respond(&mut stream, 404, "not found\n").await,
    }
}

fn request_path(buf: &[u8]) -> Detect<String, ()> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => match req.path {
            Some(path) => Detect::Done(path.split('?').next().unwrap_or(path).to_string()),
            None => Detect::Invalid(()),
        },
        Ok(httparse::Status::Partial) => Detect::Incomplete,
        Err(_) => Detect::Invalid(()),
    }
}

/// The content type of the Prometheus text format.
const METRICS_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

async fn respond(stream: &mut TcpStream, status: u16, body: &str) -> io::Result<()> {
    respond_with(stream, status, "text/plain", body).await
}

async fn respond_with(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &str,
) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        match status {
            200 => "OK",
            404 => "Not Found",
            503 => "Service Unavailable",
            _ => "Error",
        },
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// How often, and how long at most each time, another process's `/readyz`
/// is asked ([`follow_readiness`]).
const FOLLOW_EVERY: Duration = Duration::from_secs(1);
const FOLLOW_TIMEOUT: Duration = Duration::from_millis(500);

/// Keeps `up` saying whether the admin endpoint at `at` (another process
/// of this gateway's, such as the GWLB tunnel) answers `/readyz` with 200,
/// asking every second; no answer within half a second is not ready.
pub async fn follow_readiness(at: SocketAddr, up: Arc<std::sync::atomic::AtomicBool>) {
    let mut every = tokio::time::interval(FOLLOW_EVERY);
    let mut was = None;
    loop {
        every.tick().await;
        let ready = matches!(
            tokio::time::timeout(FOLLOW_TIMEOUT, ask_ready(at)).await,
            Ok(Ok(true))
        );
        up.store(ready, std::sync::atomic::Ordering::Release);
        if was != Some(ready) {
            match ready {
                true => tracing::info!(%at, "the GWLB tunnel serves"),
                false => tracing::warn!(%at, "the GWLB tunnel is not serving: not ready"),
            }
            was = Some(ready);
        }
    }
}

async fn ask_ready(at: SocketAddr) -> io::Result<bool> {
    let mut stream = TcpStream::connect(at).await?;
    stream
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: portcullis\r\nConnection: close\r\n\r\n")
        .await?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await?;
    Ok(&head[9..12] == b"200")
}
