//! The audit log: one JSON object per connection, on stdout, written when
//! the connection ends (a refusal ends it at once). A dedicated thread does
//! the writing behind a bounded queue, so a slow or blocked stdout can
//! never stall the data path: when the queue is full a record is dropped
//! and counted instead.

use crate::proxy::Record;
use crate::telemetry;
use serde::Serialize;
use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::time::{Duration, Instant, SystemTime};

/// Records queued for writing, at most (about 300 bytes each).
pub const QUEUE_RECORDS: usize = 64 * 1024;
/// How long the writer lets records gather after writing a burst. At
/// 100,000 connections a second that is 1,000 records, well within the
/// queue.
const GATHER: Duration = Duration::from_millis(10);
/// At most one warning about dropped records per this interval.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The fields of one audit record, in the order they are written.
/// Addresses and the timestamp are formatted straight into the line, with
/// no string of their own: one allocation per record.
#[derive(Debug, Serialize)]
struct Line<'a> {
    #[serde(serialize_with = "as_text")]
    ts: humantime::Rfc3339Timestamp,
    src: SocketAddr,
    dst: Option<SocketAddr>,
    proto: &'static str,
    name: Option<&'a str>,
    verdict: &'static str,
    reason: Option<&'static str>,
    would_deny: Option<&'static str>,
    policy: &'a str,
    rule: Option<&'a str>,
    bytes_up: u64,
    bytes_down: u64,
    duration_ms: u64,
    ech: bool,
}

fn as_text<S: serde::Serializer>(
    value: &impl std::fmt::Display,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

/// Room for a typical record, so the line is not reallocated as it grows.
const LINE_CAPACITY: usize = 384;

/// One record as a JSON line (with its newline); `policy` is the name of
/// the policy that decided it, `at` when it ended. `reason` is the refusal
/// reason for a deny and the error kind for an error.
pub fn line(rec: &Record, policy: &str, at: SystemTime) -> String {
    use crate::verdict::Verdict;
    let reason = match rec.verdict {
        Verdict::Allow => None,
        Verdict::Deny(reason) => Some(reason.as_str()),
        Verdict::Error(kind) => Some(kind.as_str()),
    };
    let line = Line {
        ts: humantime::format_rfc3339_millis(at),
        src: rec.src,
        dst: rec.dst.map(|d| d.0),
        proto: rec.proto.as_str(),
        name: rec.name.as_ref().map(|n| n.as_str()),
        verdict: rec.verdict.as_str(),
        reason,
        would_deny: rec.would_deny.map(|r| r.as_str()),
        policy,
        rule: rec.rule.as_deref(),
        bytes_up: rec.moved.up,
        bytes_down: rec.moved.down,
        duration_ms: u64::try_from(rec.duration.as_millis()).unwrap_or(u64::MAX),
        ech: rec.ech,
    };
    let mut text = Vec::with_capacity(LINE_CAPACITY);
    serde_json::to_writer(&mut text, &line).expect("strings and numbers always serialise");
    text.push(b'\n');
    String::from_utf8(text).expect("serde_json writes UTF-8")
}

enum Message {
    Line(String),
    /// Answered once everything queued before it is written.
    Flush(mpsc::Sender<()>),
}

/// The sending side; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    queue: SyncSender<Message>,
    dropped: Arc<AtomicU64>,
}

impl AuditLog {
    /// Starts the writer thread on `out` with room for `capacity` records.
    pub fn spawn<W: Write + Send + 'static>(out: W, capacity: usize) -> io::Result<AuditLog> {
        let (queue, received) = mpsc::sync_channel(capacity);
        let dropped = Arc::new(AtomicU64::new(0));
        let writer = Writer {
            out: BufWriter::with_capacity(64 * 1024, out),
            dropped: dropped.clone(),
            broken: false,
        };
        std::thread::Builder::new()
            .name("audit".into())
            .spawn(move || writer.run(received))?;
        Ok(AuditLog { queue, dropped })
    }

    /// Queues a record without ever waiting; a full queue drops it.
    pub fn record(&self, line: String) {
        if self.queue.try_send(Message::Line(line)).is_err() {
            count_dropped(&self.dropped);
        }
    }

    /// Records dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits, at most `timeout`, until every record queued before this
    /// call is written out. Blocks: call it off the async workers.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (done, written) = mpsc::channel();
        let mut message = Message::Flush(done);
        loop {
            match self.queue.try_send(message) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                    message = m;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return false,
            }
        }
        written
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_ok()
    }
}

/// One record lost: counted for [`AuditLog::dropped`] and the metric.
fn count_dropped(dropped: &AtomicU64) {
    dropped.fetch_add(1, Ordering::Relaxed);
    telemetry::audit_dropped(1);
}

struct Writer<W: Write> {
    out: BufWriter<W>,
    dropped: Arc<AtomicU64>,
    /// Set after a write error: stdout is gone, so later records are
    /// counted as dropped rather than retried.
    broken: bool,
}

impl<W: Write> Writer<W> {
    fn run(mut self, received: Receiver<Message>) {
        let mut reported = 0;
        let mut last_warning: Option<Instant> = None;
        // Write whatever is queued, then flush once: one syscall per burst.
        // Idle, the writer blocks in recv; a record wakes it.
        while let Ok(first) = received.recv() {
            let mut flushes = Vec::new();
            let mut next = Some(first);
            while let Some(message) = next {
                match message {
                    Message::Line(line) => self.write(line.as_bytes()),
                    Message::Flush(done) => flushes.push(done),
                }
                next = received.try_recv().ok();
            }
            if !self.broken && self.out.flush().is_err() {
                self.fail();
            }
            let flushed_for_someone = !flushes.is_empty();
            for done in flushes {
                let _ = done.send(());
            }
            // Under load, let records gather before the next burst: a
            // writer blocked in recv costs every connection a thread
            // wake-up, one sleeping for a moment costs none.
            if !flushed_for_someone {
                std::thread::sleep(GATHER);
            }
            let dropped = self.dropped.load(Ordering::Relaxed);
            if dropped > reported && last_warning.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                tracing::warn!(
                    dropped = dropped - reported,
                    "audit records dropped: the audit log is not keeping up"
                );
                reported = dropped;
                last_warning = Some(Instant::now());
            }
        }
    }

    fn write(&mut self, line: &[u8]) {
        if !self.broken && self.out.write_all(line).is_err() {
            self.fail();
        }
        if self.broken {
            count_dropped(&self.dropped);
        }
    }

    fn fail(&mut self) {
        tracing::error!("cannot write the audit log to stdout; counting records as dropped");
        self.broken = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::name::HostName;
    use crate::net::forward::Transferred;
    use crate::verdict::{ErrorKind, Proto, Reason, Verdict};
    use std::sync::Mutex;

    fn record(verdict: Verdict) -> Record {
        let mut rec = Record::new(
            "192.0.2.10:40000".parse().unwrap(),
            crate::policy::PolicyId::DEFAULT,
            Proto::Tls,
        );
        rec.dst = Some(crate::net::orig_dst::OrigDst(
            "[2001:db8:3::20]:443".parse().unwrap(),
        ));
        rec.name = Some(HostName::from_wire(b"www.example.test").unwrap());
        rec.rule = Some(".example.test".into());
        rec.ech = true;
        rec.verdict = verdict;
        rec.moved = Transferred {
            up: 517,
            down: 4096,
        };
        rec.duration = Duration::from_millis(1234);
        rec
    }

    #[test]
    fn a_record_is_one_json_line_with_every_field() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_790_000_000_123);
        let text = line(&record(Verdict::Allow), "build-agents", at);
        assert!(text.ends_with('\n') && text.matches('\n').count() == 1);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "ts": "2026-09-21T14:13:20.123Z",
                "src": "192.0.2.10:40000",
                "dst": "[2001:db8:3::20]:443",
                "proto": "tls",
                "name": "www.example.test",
                "verdict": "allow",
                "reason": null,
                "would_deny": null,
                "policy": "build-agents",
                "rule": ".example.test",
                "bytes_up": 517,
                "bytes_down": 4096,
                "duration_ms": 1234,
                "ech": true,
            })
        );
    }

    #[test]
    fn reason_is_the_refusal_or_the_error_and_absent_facts_are_null() {
        let mut rec = record(Verdict::Deny(Reason::NotListed));
        rec.rule = None;
        let v: serde_json::Value =
            serde_json::from_str(&line(&rec, "default", SystemTime::UNIX_EPOCH)).unwrap();
        assert_eq!(v["verdict"], "deny");
        assert_eq!(v["reason"], "not_listed");
        assert_eq!(v["rule"], serde_json::Value::Null);

        let mut rec = record(Verdict::Error(ErrorKind::ConnectRefused));
        rec.dst = None;
        rec.name = None;
        let v: serde_json::Value =
            serde_json::from_str(&line(&rec, "default", SystemTime::UNIX_EPOCH)).unwrap();
        assert_eq!(
            (v["verdict"].as_str(), v["reason"].as_str()),
            (Some("error"), Some("connect_refused"))
        );
        assert_eq!((v["dst"].is_null(), v["name"].is_null()), (true, true));

        // Monitor mode: forwarded, with what enforce mode would have done.
        let mut rec = record(Verdict::Allow);
        rec.rule = None;
        rec.would_deny = Some(Reason::NotListed);
        let v: serde_json::Value =
            serde_json::from_str(&line(&rec, "default", SystemTime::UNIX_EPOCH)).unwrap();
        assert_eq!(
            (v["verdict"].as_str(), v["would_deny"].as_str()),
            (Some("allow"), Some("not_listed"))
        );
    }

    /// A writer that blocks until released, like a stdout pipe nobody reads.
    #[derive(Clone, Default)]
    struct Stalled {
        gate: Arc<Mutex<()>>,
        /// Set once the writer has reached the output (and may be stuck).
        reached: Arc<std::sync::atomic::AtomicBool>,
        written: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.reached.store(true, Ordering::SeqCst);
            let _open = self.gate.lock().unwrap();
            self.written.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            self.reached.store(true, Ordering::SeqCst);
            let _open = self.gate.lock().unwrap();
            Ok(())
        }
    }

    #[test]
    fn a_stalled_output_drops_and_counts_instead_of_blocking() {
        let out = Stalled::default();
        let held = out.gate.lock().unwrap();
        let log = AuditLog::spawn(out.clone(), 4).unwrap();
        log.record("first\n".into());
        while !out.reached.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        // The writer is stuck in the output: four more fit in the queue.
        let start = Instant::now();
        for i in 0..100 {
            log.record(format!("{i}\n"));
        }
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "recording blocked"
        );
        assert_eq!(log.dropped(), 96);
        drop(held);
        assert!(log.flush(Duration::from_secs(5)));
        let written = String::from_utf8(out.written.lock().unwrap().clone()).unwrap();
        assert_eq!(written, "first\n0\n1\n2\n3\n");
    }

    #[test]
    fn flush_waits_for_everything_queued_before_it() {
        let out = Stalled::default();
        let log = AuditLog::spawn(out.clone(), 1024).unwrap();
        let mut expected = String::new();
        for i in 0..500 {
            log.record(format!("{i}\n"));
            expected.push_str(&format!("{i}\n"));
        }
        assert!(log.flush(Duration::from_secs(5)));
        assert_eq!(*out.written.lock().unwrap(), expected.as_bytes());
        assert_eq!(log.dropped(), 0);
    }
}
