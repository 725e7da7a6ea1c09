//! The writing side of the audit log: a bounded queue that never blocks
//! the data path, drained by one thread into stdout or a file.

use metrics::Counter;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::time::{Duration, Instant};

/// Records queued for writing, at most (about 300 bytes each).
pub const QUEUE_RECORDS: usize = 64 * 1024;
/// How long the writer lets records gather after writing a burst. At
/// 100,000 connections a second that is 1,000 records, well within the
/// queue.
const GATHER: Duration = Duration::from_millis(10);
/// At most one warning about dropped records per this interval.
const WARN_EVERY: Duration = Duration::from_secs(10);

enum Message {
    Line(Vec<u8>),
    /// Answered once everything queued before it is written.
    Flush(mpsc::Sender<()>),
}

/// Records lost at a full queue or a broken output.
struct Dropped {
    count: AtomicU64,
    /// `portcullis_audit_records_dropped_total`.
    metric: Counter,
}

impl Dropped {
    fn one(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.metric.increment(1);
    }

    fn so_far(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// The sending side; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    queue: SyncSender<Message>,
    dropped: Arc<Dropped>,
    /// Set by [`AuditLog::reopen`]; the writer reopens its file at its
    /// next burst (a flag rather than a message: a full queue must not
    /// lose it).
    reopen: Arc<AtomicBool>,
}

impl AuditLog {
    /// Starts the writer thread on `out` with room for `capacity` records;
    /// each record lost is also counted in `dropped`.
    pub fn spawn<W: Write + Send + 'static>(
        out: W,
        capacity: usize,
        dropped: Counter,
    ) -> io::Result<AuditLog> {
        Self::start(Box::new(out), None, capacity, dropped)
    }

    /// Starts the writer thread appending to the file at `path` (created
    /// 0640 if missing), which [`AuditLog::reopen`] opens afresh.
    pub fn spawn_file(path: &Path, capacity: usize, dropped: Counter) -> io::Result<AuditLog> {
        let file = open_append(path)?;
        Self::start(Box::new(file), Some(path.to_owned()), capacity, dropped)
    }

    fn start(
        out: Box<dyn Write + Send>,
        path: Option<PathBuf>,
        capacity: usize,
        dropped: Counter,
    ) -> io::Result<AuditLog> {
        let (queue, received) = mpsc::sync_channel(capacity);
        let dropped = Arc::new(Dropped {
            count: AtomicU64::new(0),
            metric: dropped,
        });
        let reopen = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            out: BufWriter::with_capacity(64 * 1024, out),
            path,
            reopen: reopen.clone(),
            dropped: dropped.clone(),
            broken: false,
        };
        std::thread::Builder::new()
            .name("audit".into())
            .spawn(move || writer.run(received))?;
        Ok(AuditLog {
            queue,
            dropped,
            reopen,
        })
    }

    /// Has the writer reopen its file (after logrotate moved it away);
    /// records queued meanwhile go to the new file. No-op on stdout.
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Release);
        // Wake an idle writer, so the old file is let go of at once.
        let (done, _) = mpsc::channel();
        let _ = self.queue.try_send(Message::Flush(done));
    }

    /// Queues a record without ever waiting; a full queue drops it.
    pub fn record(&self, line: Vec<u8>) {
        if self.queue.try_send(Message::Line(line)).is_err() {
            self.dropped.one();
        }
    }

    /// Records dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.so_far()
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

fn open_append(path: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}

struct Writer {
    out: BufWriter<Box<dyn Write + Send>>,
    /// The audit file, if records go to one rather than stdout.
    path: Option<PathBuf>,
    reopen: Arc<AtomicBool>,
    dropped: Arc<Dropped>,
    /// Set after a write error: the output is gone, so later records are
    /// counted as dropped rather than retried (until a reopen succeeds).
    broken: bool,
}

impl Writer {
    /// Swaps in a fresh handle on the audit file. If it cannot be opened
    /// the old handle stays: records keep going to the rotated file rather
    /// than nowhere.
    fn reopen_if_asked(&mut self) {
        if !self.reopen.swap(false, Ordering::AcqRel) {
            return;
        }
        let Some(path) = self.path.clone() else {
            return;
        };
        if !self.broken && self.out.flush().is_err() {
            self.fail();
        }
        match open_append(&path) {
            Ok(file) => {
                self.out = BufWriter::with_capacity(64 * 1024, Box::new(file));
                self.broken = false;
                tracing::info!(path = %path.display(), "audit file reopened");
            }
            Err(e) => tracing::error!(
                path = %path.display(),
                error = %e,
                "cannot reopen the audit file; writing on to the old one"
            ),
        }
    }

    fn run(mut self, received: Receiver<Message>) {
        let mut reported = 0;
        let mut last_warning: Option<Instant> = None;
        // Write whatever is queued, then flush once: one syscall per burst.
        // Idle, the writer blocks in recv; a record wakes it.
        while let Ok(first) = received.recv() {
            self.reopen_if_asked();
            let mut flushes = Vec::new();
            let mut next = Some(first);
            while let Some(message) = next {
                match message {
                    Message::Line(line) => self.write(&line),
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
            let dropped = self.dropped.so_far();
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
            self.dropped.one();
        }
    }

    fn fail(&mut self) {
        let to = self
            .path
            .as_ref()
            .map_or_else(|| "stdout".to_owned(), |p| p.display().to_string());
        tracing::error!("cannot write the audit log to {to}; counting records as dropped");
        self.broken = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

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
        let log = AuditLog::spawn(out.clone(), 4, Counter::noop()).unwrap();
        log.record(b"first\n".to_vec());
        while !out.reached.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        // The writer is stuck in the output: four more fit in the queue.
        let start = Instant::now();
        for i in 0..100 {
            log.record(format!("{i}\n").into_bytes());
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
        let log = AuditLog::spawn(out.clone(), 1024, Counter::noop()).unwrap();
        let mut expected = String::new();
        for i in 0..500 {
            log.record(format!("{i}\n").into_bytes());
            expected.push_str(&format!("{i}\n"));
        }
        assert!(log.flush(Duration::from_secs(5)));
        assert_eq!(*out.written.lock().unwrap(), expected.as_bytes());
        assert_eq!(log.dropped(), 0);
    }

    #[test]
    fn a_rotated_file_is_let_go_of_on_reopen_and_nothing_is_lost() {
        let dir = std::env::temp_dir().join(format!("portcullis-audit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.log");
        let log = AuditLog::spawn_file(&path, 1024, Counter::noop()).unwrap();
        for i in 0..100 {
            log.record(format!("{i}\n").into_bytes());
        }
        assert!(log.flush(Duration::from_secs(5)));
        // logrotate moves the file away; records keep going to it until
        // the reopen, then to a new file at the same path.
        std::fs::rename(&path, dir.join("audit.log.1")).unwrap();
        for i in 100..150 {
            log.record(format!("{i}\n").into_bytes());
        }
        assert!(log.flush(Duration::from_secs(5)));
        log.reopen();
        for i in 150..200 {
            log.record(format!("{i}\n").into_bytes());
        }
        assert!(log.flush(Duration::from_secs(5)));
        let old = std::fs::read_to_string(dir.join("audit.log.1")).unwrap();
        let new = std::fs::read_to_string(&path).unwrap();
        let expected: String = (0..200).map(|i| format!("{i}\n")).collect();
        assert_eq!(old + &new, expected);
        assert!(new.starts_with("150\n"), "{new}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640);
        assert_eq!(log.dropped(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
