//! Follows the audit file by path, across rotation: complete lines from
//! where the last shipped one ended, and the position to resume from.
//!
//! logrotate renames the file to `NAME.1` and signals portcullis, which
//! opens a new `NAME`; records written just before the signal land in the
//! old file. So the old file is read to its end, and left only once it has
//! been quiet for [`ROTATE_QUIET`] with a new file in its place. A file
//! shorter than the position was truncated in place (copytruncate): it is
//! read again from the start.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A rotated file is let go of after this long without growing.
pub const ROTATE_QUIET: Duration = Duration::from_secs(2);
/// A line longer than this (no newline in sight) is handed out as it is,
/// so a file that is not line-oriented cannot grow the buffer without end.
pub const MAX_LINE: usize = 1 << 20;

/// Where shipping stopped: a file (by inode) and the byte after the last
/// line shipped from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Position {
    pub inode: u64,
    pub offset: u64,
}

pub struct Follower {
    path: PathBuf,
    open: Option<Open>,
}

struct Open {
    file: File,
    inode: u64,
    /// After the last complete line handed out.
    offset: u64,
    /// Read past `offset`: the start of a line not yet complete.
    partial: Vec<u8>,
    /// When this file (no longer at the path) was last seen growing.
    quiet_since: Option<Instant>,
}

/// What one read found.
#[derive(Debug, Default)]
pub struct Lines {
    pub lines: Vec<Vec<u8>>,
    /// A file was rotated away and is now finished with.
    pub rotated: bool,
    /// The file was truncated in place and is read again from its start.
    pub truncated: bool,
}

impl Follower {
    /// Follows `path` from `resume` if it still names the file there (or
    /// the one rotated to `NAME.1`), else from the start of the file at
    /// `path`. The second value says the resume position was lost.
    pub fn new(path: &Path, resume: Option<Position>) -> (Follower, bool) {
        let mut follower = Follower {
            path: path.to_owned(),
            open: None,
        };
        let Some(at) = resume else {
            return (follower, false);
        };
        let rotated = rotated_name(path);
        for candidate in [path, rotated.as_path()] {
            if let Ok(file) = File::open(candidate)
                && let Ok(meta) = file.metadata()
                && meta.ino() == at.inode
            {
                let offset = if at.offset <= meta.len() {
                    at.offset
                } else {
                    0
                };
                follower.open = Some(Open::at(file, at.inode, offset));
                return (follower, false);
            }
        }
        (follower, true)
    }

    /// Complete lines, up to about `max` bytes of them.
    pub fn read(&mut self, max: usize) -> io::Result<Lines> {
        let mut out = Lines::default();
        if self.open.is_none() {
            match File::open(&self.path) {
                Ok(file) => {
                    let inode = file.metadata()?.ino();
                    self.open = Some(Open::at(file, inode, 0));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
                Err(e) => return Err(e),
            }
        }
        let Some(open) = self.open.as_mut() else {
            return Ok(out);
        };
        let len = open.file.metadata()?.len();
        if len < open.offset {
            open.file.seek(SeekFrom::Start(0))?;
            open.offset = 0;
            open.partial.clear();
            out.truncated = true;
        }
        let got = open.fill(max, &mut out.lines)?;
        if got > 0 {
            open.quiet_since = None;
            return Ok(out);
        }
        // At the end: is this still the file at the path?
        let current = std::fs::metadata(&self.path).map(|m| m.ino()).ok();
        if current.is_none() || current == Some(open.inode) {
            return Ok(out);
        }
        let quiet = *open.quiet_since.get_or_insert_with(Instant::now);
        if quiet.elapsed() < ROTATE_QUIET {
            return Ok(out);
        }
        // Rotated away and finished: a line never completed is shipped
        // as it is, then the new file from its start.
        if !open.partial.is_empty() {
            out.lines.push(std::mem::take(&mut open.partial));
        }
        self.open = None;
        out.rotated = true;
        Ok(out)
    }

    /// Where to resume after everything handed out so far is shipped.
    pub fn position(&self) -> Option<Position> {
        self.open.as_ref().map(|o| Position {
            inode: o.inode,
            offset: o.offset,
        })
    }

    /// Bytes written to the file at the path and not yet handed out: how
    /// far shipping is behind (the rest of a rotated file not counted).
    pub fn behind(&self) -> u64 {
        let Ok(meta) = std::fs::metadata(&self.path) else {
            return 0;
        };
        match &self.open {
            Some(o) if meta.ino() == o.inode => meta.len().saturating_sub(o.offset),
            _ => meta.len(),
        }
    }
}

impl Open {
    fn at(mut file: File, inode: u64, offset: u64) -> Open {
        let offset = match file.seek(SeekFrom::Start(offset)) {
            Ok(_) => offset,
            Err(_) => 0,
        };
        Open {
            file,
            inode,
            offset,
            partial: Vec::new(),
            quiet_since: None,
        }
    }

    /// Reads on until about `max` bytes of complete lines are out or the
    /// file ends; returns the bytes read.
    fn fill(&mut self, max: usize, lines: &mut Vec<Vec<u8>>) -> io::Result<usize> {
        let mut total = 0;
        let mut handed = 0;
        let mut chunk = vec![0; 64 * 1024];
        while handed < max {
            let n = self.file.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            total += n;
            let mut start = 0;
            for end in memchr_all(&chunk[..n]) {
                let mut line = std::mem::take(&mut self.partial);
                line.extend_from_slice(&chunk[start..end]);
                self.offset += (line.len() + 1) as u64;
                handed += line.len() + 1;
                lines.push(line);
                start = end + 1;
            }
            self.partial.extend_from_slice(&chunk[start..n]);
            if self.partial.len() > MAX_LINE {
                let line = std::mem::take(&mut self.partial);
                self.offset += line.len() as u64;
                handed += line.len();
                lines.push(line);
            }
        }
        Ok(total)
    }
}

fn memchr_all(bytes: &[u8]) -> impl Iterator<Item = usize> + '_ {
    bytes
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .map(|(i, _)| i)
}

/// logrotate's first rotated name: `NAME.1`.
fn rotated_name(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    struct Dir(PathBuf);
    impl Dir {
        fn new(tag: &str) -> Dir {
            let d = std::env::temp_dir()
                .join(format!("portcullis-follow-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            Dir(d)
        }
        fn file(&self) -> PathBuf {
            self.0.join("audit.log")
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn append(path: &Path, text: &str) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    fn texts(read: &Lines) -> Vec<String> {
        read.lines
            .iter()
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect()
    }

    #[test]
    fn hands_out_complete_lines_only_and_resumes_where_it_stopped() {
        let dir = Dir::new("lines");
        let path = dir.file();
        let (mut f, lost) = Follower::new(&path, None);
        assert!(!lost);
        assert!(f.read(1 << 20).unwrap().lines.is_empty(), "no file yet");
        append(&path, "a\nb\nhalf");
        assert_eq!(texts(&f.read(1 << 20).unwrap()), ["a", "b"]);
        assert_eq!(f.behind(), 4);
        append(&path, "-done\nc\n");
        assert_eq!(texts(&f.read(1 << 20).unwrap()), ["half-done", "c"]);
        let at = f.position().unwrap();
        assert_eq!(at.offset, std::fs::metadata(&path).unwrap().len());
        // A restart resumes at the position.
        append(&path, "d\n");
        let (mut again, lost) = Follower::new(&path, Some(at));
        assert!(!lost);
        assert_eq!(texts(&again.read(1 << 20).unwrap()), ["d"]);
    }

    #[test]
    fn a_rotated_file_is_read_to_its_end_before_the_new_one() {
        let dir = Dir::new("rotate");
        let path = dir.file();
        append(&path, "1\n2\n");
        let (mut f, _) = Follower::new(&path, None);
        assert_eq!(texts(&f.read(1 << 20).unwrap()), ["1", "2"]);
        // Rotated; the writer still puts a record in the old file, then
        // reopens.
        std::fs::rename(&path, dir.0.join("audit.log.1")).unwrap();
        append(&dir.0.join("audit.log.1"), "3\n");
        append(&path, "4\n");
        assert_eq!(texts(&f.read(1 << 20).unwrap()), ["3"]);
        let r = f.read(1 << 20).unwrap();
        assert!(r.lines.is_empty() && !r.rotated, "quiet for a moment first");
        std::thread::sleep(ROTATE_QUIET + Duration::from_millis(100));
        let r = f.read(1 << 20).unwrap();
        assert!(r.rotated);
        assert_eq!(texts(&f.read(1 << 20).unwrap()), ["4"]);
    }

    #[test]
    fn a_restart_during_rotation_finishes_the_rotated_file() {
        let dir = Dir::new("restart");
        let path = dir.file();
        append(&path, "1\n");
        let (mut f, _) = Follower::new(&path, None);
        f.read(1 << 20).unwrap();
        let at = f.position().unwrap();
        assert_eq!(at.offset, 2, "after the first line");
        // Stopped; one more record, then rotation, before it starts again.
        drop(f);
        append(&path, "2\n");
        std::fs::rename(&path, dir.0.join("audit.log.1")).unwrap();
        append(&path, "3\n");
        let (mut again, lost) = Follower::new(&path, Some(at));
        assert!(!lost);
        assert_eq!(texts(&again.read(1 << 20).unwrap()), ["2"]);
        // A position whose file is gone is reported lost.
        let (_, lost) = Follower::new(
            &path,
            Some(Position {
                inode: 1,
                offset: 5,
            }),
        );
        assert!(lost);
    }

    #[test]
    fn a_truncated_file_is_read_from_its_start() {
        let dir = Dir::new("truncate");
        let path = dir.file();
        append(&path, "old-1\nold-2\n");
        let (mut f, _) = Follower::new(&path, None);
        f.read(1 << 20).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        append(&path, "new\n");
        let r = f.read(1 << 20).unwrap();
        assert!(r.truncated);
        assert_eq!(texts(&r), ["new"]);
    }

    #[test]
    fn a_line_without_end_is_handed_out_at_the_cap() {
        let dir = Dir::new("endless");
        let path = dir.file();
        append(&path, &"y".repeat(MAX_LINE + 70_000));
        let (mut f, _) = Follower::new(&path, None);
        let r = f.read(1 << 20).unwrap();
        assert_eq!(r.lines.len(), 1);
        assert!(r.lines[0].len() > MAX_LINE);
        assert_eq!(f.position().unwrap().offset, r.lines[0].len() as u64);
    }

    #[test]
    fn reads_are_bounded() {
        let dir = Dir::new("bounded");
        let path = dir.file();
        let line = "x".repeat(99) + "\n";
        append(&path, &line.repeat(10_000));
        let (mut f, _) = Follower::new(&path, None);
        let first = f.read(100_000).unwrap().lines.len();
        assert!((1_000..=1_700).contains(&first), "{first} lines");
        let mut total = first;
        loop {
            let n = f.read(100_000).unwrap().lines.len();
            if n == 0 {
                break;
            }
            total += n;
        }
        assert_eq!(total, 10_000);
    }
}
