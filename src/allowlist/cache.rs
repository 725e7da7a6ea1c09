//! The last good list of a remote source, kept on disk so a restart during
//! an outage starts with it. The file is itself a valid list: its header
//! lines, naming the source and version, are comments.

use super::source::Source;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

const HEADER: &str = "# portcullis cache of ";
const VERSION: &str = "# version: ";

/// What a cache file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cached {
    pub text: String,
    pub version: Option<String>,
    /// When the file was written: the list was current with its source
    /// then, and is not known to be since.
    pub written: Option<std::time::SystemTime>,
}

#[derive(Debug, Clone)]
pub struct Cache {
    path: PathBuf,
    source: String,
}

impl Cache {
    pub fn new(dir: &Path, source: &Source) -> Cache {
        let source = source.to_string();
        let name: String = source
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        Cache {
            path: dir.join(format!("{name}.cache")),
            source,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cached list, if there is one for this source.
    pub fn load(&self) -> io::Result<Option<Cached>> {
        let all = match std::fs::read_to_string(&self.path) {
            Ok(all) => all,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let written = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        let mut lines = all.splitn(3, '\n');
        let (Some(header), Some(version), Some(text)) = (lines.next(), lines.next(), lines.next())
        else {
            return Ok(None);
        };
        if header.strip_prefix(HEADER) != Some(self.source.as_str()) {
            return Ok(None);
        }
        let Some(version) = version.strip_prefix(VERSION) else {
            return Ok(None);
        };
        Ok(Some(Cached {
            text: text.to_string(),
            version: (!version.is_empty()).then(|| version.to_string()),
            written,
        }))
    }

    /// Replaces the cache atomically: a crash leaves the old file or the
    /// new one, never a torn one.
    pub fn store(&self, text: &str, version: Option<&str>) -> io::Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = self
            .path
            .with_extension(format!("tmp.{}", std::process::id()));
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            write!(
                f,
                "{HEADER}{}\n{VERSION}{}\n",
                self.source,
                version.unwrap_or("")
            )?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            File::open(dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("portcullis-cache-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn round_trips_text_and_version_and_is_itself_a_valid_list() {
        let d = dir("roundtrip");
        let source: Source = "s3://bucket/lists/prod.txt".parse().unwrap();
        let cache = Cache::new(&d, &source);
        assert_eq!(cache.load().unwrap(), None);
        cache
            .store("a.example.com\n.b.example.com\n", Some("\"etag-1\""))
            .unwrap();
        let cached = cache.load().unwrap().unwrap();
        assert_eq!(cached.text, "a.example.com\n.b.example.com\n");
        assert_eq!(cached.version.as_deref(), Some("\"etag-1\""));
        let whole = std::fs::read_to_string(cache.path()).unwrap();
        assert_eq!(crate::allowlist::parse(&whole).unwrap().len(), 2);
        cache.store("c.example.com\n", None).unwrap();
        assert_eq!(cache.load().unwrap().unwrap().version, None);
        let leftovers = std::fs::read_dir(&d).unwrap().count();
        assert_eq!(leftovers, 1, "no temporary files left behind");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn ignores_the_cache_of_another_source() {
        let d = dir("other");
        let a = Cache::new(&d, &"s3://bucket/a.txt".parse().unwrap());
        a.store("a.example.com\n", None).unwrap();
        let b = Cache {
            path: a.path().to_path_buf(),
            source: "s3://bucket/b.txt".into(),
        };
        assert_eq!(b.load().unwrap(), None);
        let _ = std::fs::remove_dir_all(&d);
    }
}
