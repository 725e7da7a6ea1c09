//! Upstream servers in the upstream namespace: a threaded TCP server with
//! a handler per test, a keep-alive HTTP server that logs what it is
//! asked, and a real TLS server (`openssl s_server`).

use super::netns::Netns;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type Handler = Arc<dyn Fn(TcpStream) + Send + Sync>;

/// Accepts on some addresses and runs a handler per connection.
pub struct Server {
    listeners: Vec<TcpListener>,
    accepted: Arc<AtomicUsize>,
}

impl Server {
    pub fn start(
        ns: &Netns,
        addrs: &[SocketAddr],
        handler: impl Fn(TcpStream) + Send + Sync + 'static,
    ) -> Server {
        let addrs = addrs.to_vec();
        let listeners: Vec<TcpListener> = ns.enter(move || {
            addrs
                .iter()
                .map(|a| TcpListener::bind(a).expect("bind upstream"))
                .collect()
        });
        let accepted = Arc::new(AtomicUsize::new(0));
        let handler: Handler = Arc::new(handler);
        for l in &listeners {
            let l = l.try_clone().unwrap();
            let (accepted, handler) = (accepted.clone(), handler.clone());
            std::thread::spawn(move || {
                // Ends when the listener is shut down in Drop.
                while let Ok((s, _)) = l.accept() {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let handler = handler.clone();
                    std::thread::spawn(move || handler(s));
                }
            });
        }
        Server {
            listeners,
            accepted,
        }
    }

    /// Connections that reached this server.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        for l in &self.listeners {
            let _ = socket2::SockRef::from(l).shutdown(std::net::Shutdown::Read);
        }
    }
}

/// A server that records every byte each connection sends until EOF.
pub fn recorder(ns: &Netns, addrs: &[SocketAddr]) -> (Server, Arc<Mutex<Vec<Vec<u8>>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let server = Server::start(ns, addrs, move |mut s| {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut all = Vec::new();
        let _ = s.read_to_end(&mut all);
        sink.lock().unwrap().push(all);
    });
    (server, seen)
}

/// A keep-alive HTTP/1.1 server answering `200 <host><path>`; it logs each
/// request as `host path`.
pub fn http_server(ns: &Netns, addrs: &[SocketAddr]) -> (Server, Arc<Mutex<Vec<String>>>) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = log.clone();
    let server = Server::start(ns, addrs, move |mut s| {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = Vec::new();
        loop {
            let Some(end) = find(&buf, b"\r\n\r\n") else {
                let mut chunk = [0u8; 4096];
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                continue;
            };
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            req.parse(&buf[..end + 4])
                .expect("test server got a bad request");
            let host = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("host"))
                .map(|h| String::from_utf8_lossy(h.value).into_owned())
                .unwrap_or_default();
            let path = req.path.unwrap_or("").to_string();
            // A body is read and dropped (only Content-Length framing).
            let body_len: usize = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
                .unwrap_or(0);
            sink.lock().unwrap().push(format!("{host} {path}"));
            buf.drain(..end + 4);
            let mut chunk = vec![0u8; 64 * 1024];
            while buf.len() < body_len {
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            buf.drain(..body_len);
            let body = format!("{host}{path}\n");
            let reply = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            if s.write_all(reply.as_bytes()).is_err() {
                return;
            }
        }
    });
    (server, log)
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A CA and a certificate for `*.example.test` / `example.test`, made with
/// the openssl command line.
pub fn make_certs(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=portcullis test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        "/CN=example.test",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=DNS:example.test,DNS:*.example.test,DNS:exact.allowed.test,DNS:www.allowed.test\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
    ]);
}

/// `openssl s_server -www` on the web host's `port` in the upstream ns.
pub struct TlsServer {
    child: Child,
}

impl TlsServer {
    pub fn start(ns: &Netns, dir: &Path, v6: bool, port: u16) -> TlsServer {
        let host = if v6 {
            "[2001:db8:3::20]"
        } else {
            "203.0.113.20"
        };
        let accept = format!("{host}:{port}");
        let child = ns
            .command("openssl")
            .args([
                "s_server",
                "-quiet",
                "-www",
                "-accept",
                &accept,
                "-cert",
                "server.pem",
                "-key",
                "server.key",
            ])
            .arg(if v6 { "-6" } else { "-4" })
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let server = TlsServer { child };
        let probe: SocketAddr = accept.parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ns
            .enter(move || TcpStream::connect_timeout(&probe, Duration::from_millis(200)).is_ok())
        {
            assert!(Instant::now() < deadline, "openssl s_server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
