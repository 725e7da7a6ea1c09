//! Keeping the list current: poll the source (with jitter, so a fleet does
//! not poll in lockstep), reload at once on SIGHUP, validate completely off
//! the data path, then swap. Nothing that goes wrong opens the gateway:
//! a failed fetch, an invalid list or a suspiciously empty one leaves the
//! last good list in force; with no list at all everything is denied.

use super::cache::Cache;
use super::live::Live;
use super::source::{FetchError, Fetched, Fetcher, Source};
use super::{Allowlist, ParseError, ParseErrorKind, PrivateSuffixes, parse, shared_suffixes};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;

/// First retry delay while no list is loaded; doubles up to the refresh.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Refresh intervals vary by ± this fraction.
const JITTER: f64 = 0.1;

/// How the list is kept current.
#[derive(Debug, Clone)]
pub struct ReloadSettings {
    pub source: Source,
    pub refresh: Duration,
    /// Where the last good copy of a remote list is kept.
    pub cache_dir: PathBuf,
    /// Accept an empty list replacing a non-empty one.
    pub allow_empty: bool,
    /// Refuse a list with an entry that covers a shared public suffix
    /// (otherwise each is a warning).
    pub strict: bool,
}

/// Why a list could not be had.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{origin}: {error}")]
    Fetch { origin: Source, error: FetchError },
    #[error("{origin}: {error}")]
    Invalid { origin: Source, error: ParseError },
}

/// Parses a list and reports each entry that covers a shared public
/// suffix: a warning naming the source and the line, or, with `strict`,
/// the first one as the list's error.
pub fn parse_checked(text: &str, origin: &Source, strict: bool) -> Result<Allowlist, ParseError> {
    let list = parse(text)?;
    for shared in shared_suffixes(&list, system_suffixes()) {
        if strict {
            return Err(ParseError {
                line: shared.line,
                kind: ParseErrorKind::SharedSuffix(shared),
            });
        }
        tracing::warn!("{origin}: line {}: {shared}", shared.line);
    }
    Ok(list)
}

/// The system's Public Suffix List, read once: it only changes with a
/// package upgrade, which restarts the service anyway.
pub fn system_suffixes() -> &'static PrivateSuffixes {
    static SYSTEM: std::sync::OnceLock<PrivateSuffixes> = std::sync::OnceLock::new();
    SYSTEM.get_or_init(PrivateSuffixes::system)
}

/// Fetches and validates a list once: for `check`, `match` and start-up.
pub async fn load_once(source: &Source) -> Result<Allowlist, LoadError> {
    let mut fetcher = Fetcher::new(source.clone()).await;
    let fetch_error = |error| LoadError::Fetch {
        origin: source.clone(),
        error,
    };
    match fetcher.fetch(true).await.map_err(fetch_error)? {
        Fetched::Updated { text, .. } => parse(&text).map_err(|error| LoadError::Invalid {
            origin: source.clone(),
            error,
        }),
        Fetched::Unchanged => unreachable!("a first fetch has nothing to compare with"),
    }
}

/// The outcome of one reload attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Updated {
        entries: usize,
    },
    Unchanged,
    /// The reason, in one line; the previous list stays in force.
    Failed(String),
}

pub struct Reloader {
    settings: ReloadSettings,
    fetcher: Fetcher,
    live: Arc<Live>,
    cache: Option<Cache>,
    /// Version of the list in force, to fall back to after a rejection.
    in_force: Option<String>,
}

impl Reloader {
    /// Prepares the list before the gateway serves. A file source must load
    /// now (a bad local list is an operator error: exit, naming the line).
    /// A remote source starts from its cache if there is one, and is fetched
    /// by [`Self::run`] at once; until a list loads, everything is denied.
    pub async fn start(settings: ReloadSettings, live: Arc<Live>) -> Result<Reloader, LoadError> {
        let fetcher = Fetcher::new(settings.source.clone()).await;
        let cache = match settings.source {
            Source::S3 { .. } => Some(Cache::new(&settings.cache_dir, &settings.source)),
            Source::File(_) => None,
        };
        let mut reloader = Reloader {
            settings,
            fetcher,
            live,
            cache,
            in_force: None,
        };
        match reloader.settings.source {
            Source::File(_) => {
                let origin = reloader.settings.source.clone();
                match reloader.fetcher.fetch(true).await {
                    Ok(Fetched::Updated { text, .. }) => {
                        let strict = reloader.settings.strict;
                        let list = parse_checked(&text, &origin, strict)
                            .map_err(|error| LoadError::Invalid { origin, error })?;
                        tracing::info!(source = %reloader.settings.source, entries = list.len(), "allowlist loaded");
                        reloader.install(list, None);
                    }
                    Ok(Fetched::Unchanged) => {
                        unreachable!("a first fetch has nothing to compare with")
                    }
                    Err(error) => return Err(LoadError::Fetch { origin, error }),
                }
            }
            Source::S3 { .. } => reloader.load_cache().await,
        }
        Ok(reloader)
    }

    async fn load_cache(&mut self) {
        let Some(cache) = &self.cache else { return };
        let cached = match cache.load() {
            Ok(Some(cached)) => cached,
            Ok(None) => {
                return tracing::info!(path = %cache.path().display(), "no cached allowlist");
            }
            Err(e) => {
                return tracing::warn!(path = %cache.path().display(), error = %e, "cannot read the cached allowlist");
            }
        };
        match parse_checked(&cached.text, &self.settings.source, self.settings.strict) {
            Ok(list) => {
                tracing::info!(path = %cache.path().display(), entries = list.len(), version = cached.version.as_deref().unwrap_or(""), "starting from the cached allowlist");
                self.fetcher.assume_version(cached.version.clone());
                self.live.install(list, cached.version.clone());
                self.in_force = cached.version;
                // Current when the cache was written, not now: a restart
                // during an outage must not hide a stale list from the
                // alert on this timestamp.
                if let Some(written) = cached.written {
                    self.mark_success_at(written);
                }
            }
            Err(e) => {
                tracing::warn!(path = %cache.path().display(), error = %e, "ignoring an invalid cached allowlist")
            }
        }
    }

    fn install(&mut self, list: Allowlist, version: Option<String>) {
        self.live.install(list, version.clone());
        self.in_force = version;
        self.mark_success();
    }

    fn mark_success(&self) {
        self.mark_success_at(SystemTime::now());
    }

    /// The list in force was known to be current with its source at `at`.
    fn mark_success_at(&self, at: SystemTime) {
        let unix = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        self.live
            .stats
            .last_success_unix
            .store(unix.as_secs(), Ordering::Relaxed);
    }

    /// Polls until the task is dropped: every refresh interval (jittered),
    /// at once when `reload_now` changes (SIGHUP), and with backoff while
    /// no list is loaded. A remote source is fetched immediately on entry.
    pub async fn run(mut self, mut reload_now: watch::Receiver<()>) {
        let mut retry = FIRST_RETRY;
        let mut force = matches!(self.settings.source, Source::S3 { .. });
        let mut first = force;
        loop {
            if !first {
                let wait = if self.live.is_loaded() {
                    jittered(self.settings.refresh)
                } else {
                    retry
                };
                // Once the sender is gone the second branch never matches
                // and only the timer is left.
                force = tokio::select! {
                    () = tokio::time::sleep(wait) => false,
                    Ok(()) = reload_now.changed() => true,
                };
            }
            first = false;
            self.reload(force).await;
            retry = if self.live.is_loaded() {
                FIRST_RETRY
            } else {
                (retry * 2).min(self.settings.refresh)
            };
        }
    }

    /// One attempt: fetch if changed, validate, guard, swap, persist.
    pub async fn reload(&mut self, force: bool) -> Outcome {
        let outcome = self.try_reload(force).await;
        let stats = &self.live.stats;
        match &outcome {
            Outcome::Updated { entries } => {
                stats.updated.fetch_add(1, Ordering::Relaxed);
                tracing::info!(source = %self.settings.source, entries, version = self.in_force.as_deref().unwrap_or(""), "allowlist updated");
            }
            Outcome::Unchanged => {
                stats.unchanged.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(source = %self.settings.source, "allowlist unchanged");
            }
            Outcome::Failed(reason) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                let state = if self.live.is_loaded() {
                    "keeping the list in force"
                } else {
                    "no list yet: denying everything"
                };
                tracing::warn!(source = %self.settings.source, "allowlist reload failed: {reason}; {state}");
            }
        }
        outcome
    }

    async fn try_reload(&mut self, force: bool) -> Outcome {
        // The fetcher only remembers versions that are in force (a
        // rejection resets it), so "unchanged" means the list in force is
        // current.
        let (text, version) = match self.fetcher.fetch(force).await {
            Ok(Fetched::Unchanged) => {
                self.mark_success();
                return Outcome::Unchanged;
            }
            Ok(Fetched::Updated { text, version }) => (text, version),
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        // Parsing a large list takes a while: keep it off the runtime's
        // worker threads so accepts and forwarding never wait for it.
        let (origin, strict) = (self.settings.source.clone(), self.settings.strict);
        let parsed = tokio::task::spawn_blocking(move || {
            parse_checked(&text, &origin, strict).map(|list| (list, text))
        })
        .await;
        let (list, text) = match parsed {
            Ok(Ok(parsed)) => parsed,
            Ok(Err(e)) => return self.reject(format!("invalid list: {e}")),
            Err(e) => return self.reject(format!("validation failed: {e}")),
        };
        let previous = self.live.current().list.len();
        if list.is_empty() && previous > 0 && !self.settings.allow_empty {
            return self.reject(format!(
                "the new list is empty and the one in force has {previous} entries (truncated upload?); --allow-empty permits this"
            ));
        }
        let entries = list.len();
        self.install(list, version);
        self.persist(text).await;
        Outcome::Updated { entries }
    }

    /// Refuses a fetched list; the next poll fetches it again, so a bad
    /// list keeps being reported until it is fixed.
    fn reject(&mut self, reason: String) -> Outcome {
        self.fetcher.assume_version(self.in_force.clone());
        self.fetcher.forget_file();
        Outcome::Failed(reason)
    }

    async fn persist(&self, text: String) {
        let Some(cache) = self.cache.clone() else {
            return;
        };
        let version = self.in_force.clone();
        let path = cache.path().to_path_buf();
        let stored =
            tokio::task::spawn_blocking(move || cache.store(&text, version.as_deref())).await;
        if let Err(e) = stored.map_err(std::io::Error::other).and_then(|r| r) {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the allowlist cache");
        }
    }
}

fn jittered(refresh: Duration) -> Duration {
    let factor = 1.0 + JITTER * (2.0 * fastrand::f64() - 1.0);
    refresh.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_ten_percent() {
        for _ in 0..1000 {
            let d = jittered(Duration::from_secs(60));
            assert!(
                d >= Duration::from_secs(54) && d <= Duration::from_secs(66),
                "{d:?}"
            );
        }
    }

    fn settings(path: PathBuf) -> ReloadSettings {
        ReloadSettings {
            source: Source::File(path),
            refresh: Duration::from_secs(60),
            cache_dir: std::env::temp_dir(),
            allow_empty: false,
            strict: false,
        }
    }

    #[tokio::test]
    async fn keeps_the_last_good_list_through_bad_and_empty_updates() {
        let dir = std::env::temp_dir().join(format!("portcullis-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("list.txt");
        std::fs::write(&path, "a.example.com\n").unwrap();
        let live = Arc::new(Live::empty());
        let mut r = Reloader::start(settings(path.clone()), live.clone())
            .await
            .unwrap();
        assert!(live.is_loaded());
        assert!(live.current().list.lookup("a.example.com").is_some());

        std::fs::write(&path, "b.example.com\n.com\n").unwrap();
        assert!(
            matches!(r.reload(true).await, Outcome::Failed(reason) if reason.contains("line 2"))
        );
        assert!(
            live.current().list.lookup("a.example.com").is_some(),
            "old list stays"
        );
        // Still refused on the next poll, not mistaken for "unchanged".
        assert!(matches!(r.reload(false).await, Outcome::Failed(_)));

        std::fs::write(&path, "# nothing left\n").unwrap();
        assert!(
            matches!(r.reload(true).await, Outcome::Failed(reason) if reason.contains("empty"))
        );
        assert!(live.current().list.lookup("a.example.com").is_some());

        std::fs::write(&path, "b.example.com\n").unwrap();
        assert_eq!(r.reload(true).await, Outcome::Updated { entries: 1 });
        assert!(live.current().list.lookup("a.example.com").is_none());
        assert_eq!(live.stats.failed.load(Ordering::Relaxed), 3);

        let mut permissive = settings(path.clone());
        permissive.allow_empty = true;
        let mut r = Reloader::start(permissive, live.clone()).await.unwrap();
        std::fs::write(&path, "").unwrap();
        assert_eq!(r.reload(true).await, Outcome::Updated { entries: 0 });
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_bad_file_at_start_is_an_error_naming_the_line() {
        let dir =
            std::env::temp_dir().join(format!("portcullis-reload-start-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("list.txt");
        std::fs::write(&path, "ok.example.com\n192.0.2.1\n").unwrap();
        let err = Reloader::start(settings(path.clone()), Arc::new(Live::empty()))
            .await
            .err()
            .unwrap();
        assert!(
            err.to_string()
                .ends_with("list.txt: line 2: \"192.0.2.1\": is an IP address, not a name"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
