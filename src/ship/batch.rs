//! Audit lines as CloudWatch Logs events, in batches within PutLogEvents'
//! limits. Pure.

/// PutLogEvents takes at most this many events per call,
pub const MAX_EVENTS: usize = 10_000;
/// and this many bytes, counting each message's UTF-8 plus
pub const MAX_BATCH_BYTES: usize = 1_048_576;
/// this much per event.
pub const EVENT_OVERHEAD: usize = 26;
/// One event's message, at most (256 KiB with its overhead).
pub const MAX_MESSAGE_BYTES: usize = 262_144 - EVENT_OVERHEAD;
/// A batch may span at most a day.
pub const MAX_SPAN_MS: i64 = 24 * 3600 * 1000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Milliseconds since the Unix epoch.
    pub timestamp: i64,
    pub message: String,
}

impl Event {
    /// `line` (no newline) as an event: at the time its record says
    /// (`{"ts":"…"` leads every audit line), else at `now`. A message too
    /// long for CloudWatch is cut at a character boundary.
    pub fn from_line(line: &[u8], now: i64) -> (Event, bool) {
        let text = String::from_utf8_lossy(line);
        let timestamp = record_time(&text).unwrap_or(now);
        let mut message = text.into_owned();
        let cut = message.len() > MAX_MESSAGE_BYTES;
        if cut {
            let mut end = MAX_MESSAGE_BYTES;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        (Event { timestamp, message }, cut)
    }

    fn size(&self) -> usize {
        self.message.len() + EVENT_OVERHEAD
    }
}

/// The `ts` an audit line starts with, as Unix milliseconds.
pub fn record_time(line: &str) -> Option<i64> {
    let ts = line.strip_prefix("{\"ts\":\"")?;
    let ts = &ts[..ts.find('"')?];
    let at = humantime::parse_rfc3339(ts).ok()?;
    let ms = at.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis();
    i64::try_from(ms).ok()
}

/// Splits `events` into batches PutLogEvents accepts: each within the
/// count, size and time-span limits, each in time order (the API's rule;
/// records of connections that end together may be written a moment out
/// of order). The order of events with equal times is kept.
pub fn batches(mut events: Vec<Event>) -> Vec<Vec<Event>> {
    events.sort_by_key(|e| e.timestamp);
    let mut out: Vec<Vec<Event>> = Vec::new();
    let mut current: Vec<Event> = Vec::new();
    let mut bytes = 0;
    for event in events {
        let full = current.len() == MAX_EVENTS
            || bytes + event.size() > MAX_BATCH_BYTES
            || current
                .first()
                .is_some_and(|first| event.timestamp - first.timestamp > MAX_SPAN_MS);
        if full {
            out.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += event.size();
        current.push(event);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(timestamp: i64, len: usize) -> Event {
        Event {
            timestamp,
            message: "x".repeat(len),
        }
    }

    #[test]
    fn reads_the_records_own_time_and_falls_back_to_now() {
        // Every kind of record alike, an HTTP request's included: shipped
        // whole, at its own time.
        for kind in ["end", "request", "interim", "open"] {
            let line = format!(r#"{{"ts":"2026-12-01T18:23:10.766Z","kind":"{kind}"}}"#);
            let (e, cut) = Event::from_line(line.as_bytes(), 5);
            assert_eq!(e.timestamp, 1_796_149_390_766);
            assert!(!cut);
            assert_eq!(e.message, line);
        }
        for odd in [
            &b"not json"[..],
            b"{\"ts\":\"yesterday\"}",
            b"{\"ts\":\"2026",
            b"",
        ] {
            assert_eq!(Event::from_line(odd, 5).0.timestamp, 5, "{odd:?}");
        }
    }

    #[test]
    fn a_message_too_long_is_cut_at_a_character() {
        let mut line = "é".repeat(MAX_MESSAGE_BYTES).into_bytes();
        line.push(b'\xff');
        let (e, cut) = Event::from_line(&line, 0);
        assert!(cut);
        assert!(e.message.len() <= MAX_MESSAGE_BYTES);
        assert!(e.message.len() > MAX_MESSAGE_BYTES - 2);
    }

    #[test]
    fn batches_keep_every_limit_and_time_order() {
        // Count.
        let many: Vec<Event> = (0..25_000).map(|i| event(i, 10)).collect();
        let split = batches(many);
        assert_eq!(
            split.iter().map(Vec::len).collect::<Vec<_>>(),
            [10_000, 10_000, 5_000]
        );
        // Bytes: 1000-byte messages, 1026 with overhead, 1021 per batch.
        let big: Vec<Event> = (0..2_500).map(|i| event(i, 1_000)).collect();
        let split = batches(big);
        assert_eq!(split[0].len(), MAX_BATCH_BYTES / 1_026);
        for b in &split {
            assert!(b.iter().map(Event::size).sum::<usize>() <= MAX_BATCH_BYTES);
        }
        assert_eq!(split.iter().map(Vec::len).sum::<usize>(), 2_500);
        // Span and order: out-of-order records are sorted, and a day apart
        // go in separate batches.
        let day = MAX_SPAN_MS;
        let mixed = vec![event(3, 1), event(1, 1), event(day + 2, 1), event(2, 1)];
        let split = batches(mixed);
        let times: Vec<Vec<i64>> = split
            .iter()
            .map(|b| b.iter().map(|e| e.timestamp).collect())
            .collect();
        assert_eq!(times, vec![vec![1, 2, 3], vec![day + 2]]);
        assert!(batches(Vec::new()).is_empty());
    }

    #[test]
    fn equal_times_keep_their_order() {
        let events: Vec<Event> = (0..50)
            .map(|i| Event {
                timestamp: 7,
                message: i.to_string(),
            })
            .collect();
        let out: Vec<String> = batches(events.clone())
            .concat()
            .into_iter()
            .map(|e| e.message)
            .collect();
        let expected: Vec<String> = events.into_iter().map(|e| e.message).collect();
        assert_eq!(out, expected);
    }
}
