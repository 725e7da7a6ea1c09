//! Where a list comes from, and fetching it only when it changed.
//!
//! A file is re-read when its size or mtime moved and its content hash
//! differs. An S3 object is fetched with `If-None-Match: <etag>`, so an
//! unchanged list costs one 304 and no body.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Largest list accepted, file or object: a truncated or runaway upload
/// must not exhaust the gateway's memory.
pub const MAX_LIST_BYTES: u64 = 128 << 20;
/// Bound on one S3 request, retries included.
const S3_OPERATION_TIMEOUT: Duration = Duration::from_secs(30);
const S3_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A list location: a path or `s3://bucket/key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    S3 { bucket: String, key: String },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an S3 URL of the form s3://bucket/key")]
pub struct SourceError(String);

impl std::str::FromStr for Source {
    type Err = SourceError;

    fn from_str(s: &str) -> Result<Source, SourceError> {
        let Some(rest) = s.strip_prefix("s3://") else {
            return Ok(Source::File(PathBuf::from(s)));
        };
        match rest.split_once('/') {
            Some((bucket, key)) if !bucket.is_empty() && !key.is_empty() => Ok(Source::S3 {
                bucket: bucket.to_string(),
                key: key.to_string(),
            }),
            _ => Err(SourceError(s.to_string())),
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(path) => write!(f, "{}", path.display()),
            Source::S3 { bucket, key } => write!(f, "s3://{bucket}/{key}"),
        }
    }
}

/// Why a fetch produced no list.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot read: {0}")]
    Io(#[from] std::io::Error),
    #[error("S3: {0}")]
    S3(String),
    #[error("larger than {MAX_LIST_BYTES} bytes")]
    TooLarge,
    #[error("not UTF-8 text")]
    NotText,
    #[error("timed out")]
    Timeout,
}

/// A fetch's result.
#[derive(Debug, PartialEq, Eq)]
pub enum Fetched {
    Unchanged,
    Updated {
        text: String,
        version: Option<String>,
    },
}

/// Fetches one source, remembering what it last saw.
pub struct Fetcher {
    source: Source,
    s3: Option<aws_sdk_s3::Client>,
    /// File: what it looked like at the last read.
    file_seen: Option<FileSeen>,
    /// S3: ETag of the last object taken.
    etag: Option<String>,
}

impl Fetcher {
    /// For S3 sources this loads the AWS configuration (credential chain,
    /// region, `AWS_ENDPOINT_URL[_S3]`).
    pub async fn new(source: Source) -> Fetcher {
        let s3 = match source {
            Source::S3 { .. } => Some(s3_client().await),
            Source::File(_) => None,
        };
        Fetcher {
            source,
            s3,
            file_seen: None,
            etag: None,
        }
    }

    pub fn source(&self) -> &Source {
        &self.source
    }

    /// The version (ETag) of the list last taken, if the source has one.
    pub fn version(&self) -> Option<&str> {
        self.etag.as_deref()
    }

    /// Takes `version` as already held (e.g. from the cache), so the next
    /// fetch is conditional on it.
    pub fn assume_version(&mut self, version: Option<String>) {
        self.etag = version;
    }

    /// Forgets what the file looked like, so the next fetch reads it whole.
    pub fn forget_file(&mut self) {
        self.file_seen = None;
    }

    /// Fetches the list if it changed since the last fetch. `force` skips
    /// the cheap file check (SIGHUP); S3 stays conditional either way, as a
    /// 304 proves the held copy current.
    pub async fn fetch(&mut self, force: bool) -> Result<Fetched, FetchError> {
        match &self.source {
            Source::File(path) => {
                let path = path.clone();
                let seen = self.file_seen;
                let (fetched, now_seen) =
                    tokio::task::spawn_blocking(move || read_file(&path, seen, force))
                        .await
                        .map_err(|e| FetchError::Io(std::io::Error::other(e)))??;
                self.file_seen = Some(now_seen);
                Ok(fetched)
            }
            Source::S3 { bucket, key } => {
                let client = self.s3.as_ref().expect("S3 source has a client");
                let request = client
                    .get_object()
                    .bucket(bucket)
                    .key(key)
                    .set_if_none_match(self.etag.clone());
                let fetched = tokio::time::timeout(S3_OPERATION_TIMEOUT, get_object(request))
                    .await
                    .map_err(|_| FetchError::Timeout)??;
                if let Fetched::Updated { version, .. } = &fetched {
                    self.etag = version.clone();
                }
                Ok(fetched)
            }
        }
    }
}

/// What a file looked like when last read.
#[derive(Debug, Clone, Copy)]
struct FileSeen {
    size: u64,
    mtime: Option<SystemTime>,
    hash: u64,
    read_at: SystemTime,
}

/// File timestamps are coarse (a few ms): a file written again within
/// that window can keep its mtime. The stat shortcut is only trusted for a
/// file that was already this old when it was read.
const MTIME_SETTLED: Duration = Duration::from_secs(2);

impl FileSeen {
    fn still_current(&self, size: u64, mtime: Option<SystemTime>) -> bool {
        let settled = self
            .mtime
            .is_some_and(|m| m + MTIME_SETTLED <= self.read_at);
        settled && self.size == size && self.mtime == mtime
    }
}

fn read_file(
    path: &Path,
    seen: Option<FileSeen>,
    force: bool,
) -> Result<(Fetched, FileSeen), FetchError> {
    let meta = std::fs::metadata(path)?;
    let (size, mtime) = (meta.len(), meta.modified().ok());
    if let Some(seen) = seen.filter(|s| !force && s.still_current(size, mtime)) {
        return Ok((Fetched::Unchanged, seen));
    }
    if size > MAX_LIST_BYTES {
        return Err(FetchError::TooLarge);
    }
    let read_at = SystemTime::now();
    let bytes = std::fs::read(path)?;
    let now_seen = FileSeen {
        size,
        mtime,
        hash: content_hash(&bytes),
        read_at,
    };
    if seen.is_some_and(|s| s.hash == now_seen.hash) {
        return Ok((Fetched::Unchanged, now_seen));
    }
    let text = String::from_utf8(bytes).map_err(|_| FetchError::NotText)?;
    Ok((
        Fetched::Updated {
            text,
            version: None,
        },
        now_seen,
    ))
}

fn content_hash(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

async fn get_object(
    request: aws_sdk_s3::operation::get_object::builders::GetObjectFluentBuilder,
) -> Result<Fetched, FetchError> {
    let response = match request.send().await {
        Ok(response) => response,
        Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 304) => {
            return Ok(Fetched::Unchanged);
        }
        Err(e) => {
            return Err(FetchError::S3(
                aws_sdk_s3::error::DisplayErrorContext(e).to_string(),
            ));
        }
    };
    if response
        .content_length()
        .is_some_and(|n| n < 0 || n as u64 > MAX_LIST_BYTES)
    {
        return Err(FetchError::TooLarge);
    }
    let version = response.e_tag().map(str::to_string);
    let bytes = response
        .body
        .collect()
        .await
        .map_err(|e| FetchError::S3(e.to_string()))?
        .into_bytes();
    if bytes.len() as u64 > MAX_LIST_BYTES {
        return Err(FetchError::TooLarge);
    }
    let text = String::from_utf8(bytes.to_vec()).map_err(|_| FetchError::NotText)?;
    Ok(Fetched::Updated { text, version })
}

/// An S3 client from the standard AWS configuration chain. With an
/// endpoint override (a local S3-compatible server, a VPC endpoint URL)
/// requests use path-style addressing, which such endpoints expect.
async fn s3_client() -> aws_sdk_s3::Client {
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(S3_CONNECT_TIMEOUT)
        .operation_timeout(S3_OPERATION_TIMEOUT)
        .build();
    let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(crate::aws::https_client())
        .timeout_config(timeouts)
        .load()
        .await;
    let endpoint_override = ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|v| !v.is_empty()));
    let config = aws_sdk_s3::config::Builder::from(&shared)
        .force_path_style(endpoint_override)
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources() {
        assert_eq!(
            "/etc/list.txt".parse(),
            Ok(Source::File("/etc/list.txt".into()))
        );
        assert_eq!(
            "s3://bucket/path/to/list.txt".parse(),
            Ok(Source::S3 {
                bucket: "bucket".into(),
                key: "path/to/list.txt".into()
            })
        );
        for bad in ["s3://", "s3://bucket", "s3://bucket/", "s3:///key"] {
            assert!(bad.parse::<Source>().is_err(), "{bad}");
        }
        assert_eq!(
            Source::S3 {
                bucket: "b".into(),
                key: "k/l".into()
            }
            .to_string(),
            "s3://b/k/l"
        );
    }

    #[tokio::test]
    async fn file_is_read_again_only_when_its_content_changed() {
        let dir = std::env::temp_dir().join(format!("portcullis-src-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("list.txt");
        std::fs::write(&path, "a.example.com\n").unwrap();
        let mut f = Fetcher::new(Source::File(path.clone())).await;
        assert!(matches!(
            f.fetch(false).await.unwrap(),
            Fetched::Updated { .. }
        ));
        assert_eq!(f.fetch(false).await.unwrap(), Fetched::Unchanged);
        // Same content rewritten (new mtime): hash says unchanged.
        std::fs::write(&path, "a.example.com\n").unwrap();
        assert_eq!(f.fetch(true).await.unwrap(), Fetched::Unchanged);
        std::fs::write(&path, "b.example.com\n").unwrap();
        assert_eq!(
            f.fetch(false).await.unwrap(),
            Fetched::Updated {
                text: "b.example.com\n".into(),
                version: None
            }
        );
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        assert!(matches!(f.fetch(false).await, Err(FetchError::NotText)));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(f.fetch(false).await, Err(FetchError::Io(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
