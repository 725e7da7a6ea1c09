//! The audit trail leaves the gateway: portcullis writes its records to
//! `--audit-file`, `portcullis ship` puts them to CloudWatch Logs (moto's,
//! on the gateway namespace's loopback), across a logrotate-style rotation
//! (rename, SIGUSR1) and a SIGKILL of the shipper, and every record arrives.
//! Needs root and moto_server.
#![forbid(unsafe_code)]

mod support;

use nix::sys::signal::Signal;
use portcullis_core::hello;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;
use support::netns::{RAW_V4, Topology, require_root};
use support::s3::{self, Moto, require_moto};
use support::{addr, wait_until};
use support::{repo, venv_python};

const CURL_HELLO: &[u8] = include_bytes!("../testdata/clienthellos/curl-7.88-openssl-3.0.bin");
const GROUP: &str = "/portcullis/test/audit";
const STREAM: &str = "gw-test";

/// `tests/support/aws_logs.py ARGS` in the gateway namespace, against
/// moto: what it printed and how it exited.
fn try_aws_logs(t: &Topology, args: &[&str]) -> std::process::Output {
    t.gateway
        .command(&venv_python())
        .arg(repo("tests/support/aws_logs.py"))
        .args(args)
        .envs(s3::ENV)
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .output()
        .unwrap()
}

/// [`try_aws_logs`], which must succeed.
fn aws_logs(t: &Topology, args: &[&str]) {
    let out = try_aws_logs(t, args);
    assert!(
        out.status.success(),
        "aws_logs.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every message in the stream, in order.
fn shipped(t: &Topology) -> Vec<String> {
    let out = t.dir.join("shipped.txt");
    aws_logs(t, &["dump", GROUP, STREAM, out.to_str().unwrap()]);
    lines(&out)
}

/// The shipper's config for `audit`, in the topology's directory.
fn ship_config(t: &Topology, audit: &Path) -> PathBuf {
    let config = t.dir.join("ship.toml");
    std::fs::write(
        &config,
        format!(
            "file = \"{}\"\nlog-group = \"{GROUP}\"\nlog-stream = \"{STREAM}\"\nregion = \"us-east-1\"\nstate = \"{}\"\nmetrics-listen = \"127.0.0.1:9092\"\n",
            audit.display(),
            t.dir.join("ship.json").display()
        ),
    )
    .unwrap();
    config
}

struct Shipper {
    child: Child,
}

impl Shipper {
    fn start(t: &Topology, config: &Path) -> Shipper {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(t.dir.join("ship.log"))
            .unwrap();
        let child = t
            .gateway
            .command(env!("CARGO_BIN_EXE_portcullis"))
            .args(["ship", "--config", config.to_str().unwrap()])
            .envs(s3::ENV)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Shipper { child }
    }

    /// SIGTERM, and its exit (within the final flush and a margin).
    fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, Signal::SIGTERM).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the shipper did not stop"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Shipper {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `n` connections the gateway refuses at once: one record each.
fn refused(t: &Topology, n: usize, tag: &str) {
    for i in 0..n {
        let name = format!("r{i}-{tag}.refused.test");
        let reply = t.exchange(
            addr(RAW_V4, 443),
            &hello::with_server_name(CURL_HELLO, &name),
        );
        assert!(!reply.is_empty(), "an alert for {name}");
    }
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_audit_record_reaches_cloudwatch_across_rotation_and_a_killed_shipper() {
    if !require_root() || !require_moto() {
        return;
    }
    let mut t = Topology::new();
    let _moto = Moto::start(&t);
    aws_logs(&t, &["create-group", GROUP]);
    let audit: PathBuf = t.dir.join("audit.log");
    t.start_portcullis(
        ".allowed.test\n",
        &["--audit-file", audit.to_str().unwrap()],
    );
    let config = ship_config(&t, &audit);
    let mut shipper = Shipper::start(&t, &config);

    refused(&t, 200, "a");
    wait_until("the first records shipped", Duration::from_secs(20), || {
        shipped(&t).len() >= 200
    });

    // logrotate: the file moves away, portcullis is told, records go on.
    std::fs::rename(&audit, t.dir.join("audit.log.1")).unwrap();
    refused(&t, 50, "b");
    t.signal_portcullis(Signal::SIGUSR1);
    wait_until(
        "portcullis reopens its audit file",
        Duration::from_secs(5),
        || audit.exists(),
    );
    refused(&t, 150, "c");

    // The shipper dies mid-stream; records keep coming; a new one resumes.
    shipper.kill();
    refused(&t, 100, "d");
    let mut shipper = Shipper::start(&t, &config);

    let written = || [lines(&t.dir.join("audit.log.1")), lines(&audit)].concat();
    wait_until(
        "portcullis wrote every record",
        Duration::from_secs(10),
        || written().len() == 500,
    );
    let written = written();
    assert!(t.audit().is_empty(), "nothing on stdout with --audit-file");
    wait_until("every record shipped", Duration::from_secs(30), || {
        let got = shipped(&t);
        written.iter().all(|w| got.contains(w))
    });
    let got = shipped(&t);
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for m in &got {
        *seen.entry(m.as_str()).or_default() += 1;
    }
    for w in &written {
        assert!(seen.contains_key(w.as_str()), "not shipped: {w}");
    }
    // At least once: the kill may ship one read's lines twice, no more.
    let twice = seen.values().filter(|n| **n > 1).count();
    assert!(twice <= 100, "{twice} records shipped twice");
    assert!(got.len() <= written.len() + twice);
    // A stop ships what is left: records written just before SIGTERM
    // arrive with no shipper left to run.
    refused(&t, 40, "e");
    wait_until("portcullis wrote them", Duration::from_secs(10), || {
        lines(&audit)
            .iter()
            .filter(|l| l.contains("-e.refused.test"))
            .count()
            == 40
    });
    assert!(shipper.terminate().success());
    let last = shipped(&t);
    let flushed = last
        .iter()
        .filter(|m| m.contains("-e.refused.test"))
        .count();
    assert!(
        flushed >= 40,
        "{flushed} of the last 40 shipped before the stop"
    );
    let log = std::fs::read_to_string(t.dir.join("ship.log")).unwrap();
    assert!(log.contains("rotated file shipped to its end"), "{log}");
    assert!(!log.contains("lost"), "{log}");
}

#[test]
fn a_missing_group_is_retried_not_dropped() {
    if !require_root() || !require_moto() {
        return;
    }
    let mut t = Topology::new();
    let _moto = Moto::start(&t);
    let audit = t.dir.join("audit.log");
    t.start_portcullis(
        ".allowed.test\n",
        &["--audit-file", audit.to_str().unwrap()],
    );
    let config = ship_config(&t, &audit);
    let _shipper = Shipper::start(&t, &config);
    refused(&t, 20, "early");
    // The group appears late (the module's apply still running): the
    // records wait on disk and go once it exists.
    std::thread::sleep(Duration::from_secs(2));
    aws_logs(&t, &["create-group", GROUP]);
    wait_until(
        "the records shipped once the group exists",
        Duration::from_secs(60),
        || shipped_or_none(&t) >= 20,
    );
    let metrics = t.gateway.enter(|| {
        let mut s = std::net::TcpStream::connect("127.0.0.1:9092").unwrap();
        use std::io::Write;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        support::read_all(&mut s)
    });
    let text = String::from_utf8_lossy(&metrics);
    assert!(
        text.contains("portcullis_ship_records_total{result=\"shipped\"} 20"),
        "{text}"
    );
    assert!(
        text.contains("portcullis_ship_errors_total{kind=\"not_found\"}"),
        "{text}"
    );
}

/// How many messages the stream has; none while it does not exist.
fn shipped_or_none(t: &Topology) -> usize {
    let out = t.dir.join("shipped.txt");
    if !try_aws_logs(t, &["dump", GROUP, STREAM, out.to_str().unwrap()])
        .status
        .success()
    {
        return 0;
    }
    lines(&out).len()
}
