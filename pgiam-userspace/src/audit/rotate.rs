//! Rotation inside pgiam, by size and by age. The current file is renamed to
//! `FILE.<UTC time to the microsecond>` (names sort in the order written), a new `FILE` starts
//! with a `log_continued` record naming the previous file and its last hash, and the chain
//! goes on through it: `pgiam audit verify --rotated FILE` checks the whole set, and no file can
//! be dropped from the middle of it, or swapped, unnoticed. The oldest rotated files beyond
//! `keep_rotated` are deleted.
//!
//! Renamed, never copied: a log shipper tailing the file (Vector, Fluent Bit) sees the rename
//! and follows the new file.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde_json::Value;

/// `[audit]` rotation settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policy {
    pub max_bytes: Option<u64>,
    pub max_age: Option<Duration>,
    /// Rotated files kept; `None`: all.
    pub keep: Option<usize>,
}

impl Policy {
    pub fn rotates(&self) -> bool {
        self.max_bytes.is_some() || self.max_age.is_some()
    }
}

/// The current file's size and age, against the policy.
#[derive(Debug)]
pub(super) struct Rotation {
    pub path: PathBuf,
    pub policy: Policy,
    pub bytes: u64,
    pub since: SystemTime,
}

impl Rotation {
    pub fn due(&self, now: SystemTime) -> bool {
        // An empty file is never rotated: a rotation must move records.
        self.bytes > 0
            && (self.policy.max_bytes.is_some_and(|max| self.bytes >= max)
                || self
                    .policy
                    .max_age
                    .is_some_and(|max| now.duration_since(self.since).unwrap_or_default() >= max))
    }
}

/// The kind of the record a rotated-into file starts with.
pub const CONTINUED: &str = "log_continued";

/// The name `path` is rotated to at `now`.
pub fn rotated_name(path: &Path, now: SystemTime) -> PathBuf {
    let stamp = time::OffsetDateTime::from(now);
    let name = format!(
        "{}.{:04}{:02}{:02}T{:02}{:02}{:02}.{:06}Z",
        path.file_name().unwrap_or_default().to_string_lossy(),
        stamp.year(),
        u8::from(stamp.month()),
        stamp.day(),
        stamp.hour(),
        stamp.minute(),
        stamp.second(),
        stamp.microsecond()
    );
    path.with_file_name(name)
}

/// Whether `name` is one of `base`'s rotated names.
fn is_rotated(base: &str, name: &str) -> bool {
    let Some(stamp) = name
        .strip_prefix(base)
        .and_then(|rest| rest.strip_prefix('.'))
    else {
        return false;
    };
    stamp.len() == 23
        && stamp.ends_with('Z')
        && stamp.as_bytes()[8] == b'T'
        && stamp.as_bytes()[15] == b'.'
        && stamp
            .bytes()
            .enumerate()
            .all(|(i, b)| matches!(i, 8 | 15 | 22) || b.is_ascii_digit())
}

/// `path`'s rotated files, oldest first.
pub fn rotated_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let base = path.file_name().unwrap_or_default().to_string_lossy();
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter(|e| is_rotated(&base, &e.file_name().to_string_lossy()))
        .map(|e| e.path())
        .collect();
    found.sort();
    Ok(found)
}

/// Deletes the oldest rotated files beyond `keep`; returns them.
pub fn prune(path: &Path, keep: usize) -> std::io::Result<Vec<PathBuf>> {
    let files = rotated_files(path)?;
    let excess = files.len().saturating_sub(keep);
    let gone: Vec<PathBuf> = files.into_iter().take(excess).collect();
    for f in &gone {
        std::fs::remove_file(f)?;
    }
    Ok(gone)
}

/// Makes a rename (or a creation) in `path`'s directory durable.
pub fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => std::fs::File::open(d)?.sync_all(),
        _ => std::fs::File::open(".")?.sync_all(),
    }
}

/// The chain a file starts from: the previous file's name and last hash for a rotated-into
/// file, `None` for a file that starts a chain.
pub fn continues_from(first_line: &[u8]) -> Option<(String, String)> {
    let Ok(Value::Object(r)) = serde_json::from_slice::<Value>(first_line) else {
        return None;
    };
    if r.get("kind").and_then(Value::as_str) != Some(CONTINUED) {
        return None;
    }
    Some((
        r.get("previous_file")?.as_str()?.to_owned(),
        r.get("previous_hash")?.as_str()?.to_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotated_names_sort_in_time_and_are_recognized() {
        let p = Path::new("/var/log/pgiam/audit.jsonl");
        let t = SystemTime::UNIX_EPOCH + Duration::from_micros(1_796_000_000_123_456);
        let a = rotated_name(p, t);
        let b = rotated_name(p, t + Duration::from_micros(1));
        assert!(a < b);
        let name = a.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("audit.jsonl.2026"), "{name}");
        assert!(is_rotated("audit.jsonl", &name), "{name}");
        for other in [
            "audit.jsonl",
            "audit.jsonl.wal",
            "audit.jsonl.1",
            "audit.jsonl.gz",
        ] {
            assert!(!is_rotated("audit.jsonl", other), "{other}");
        }
    }

    #[test]
    fn due_by_size_or_age_and_never_empty() {
        let now = SystemTime::now();
        let mut r = Rotation {
            path: "x".into(),
            policy: Policy {
                max_bytes: Some(100),
                max_age: Some(Duration::from_secs(60)),
                keep: None,
            },
            bytes: 0,
            since: now - Duration::from_secs(3600),
        };
        assert!(!r.due(now), "empty");
        r.bytes = 10;
        assert!(r.due(now), "old");
        r.since = now;
        assert!(!r.due(now));
        r.bytes = 100;
        assert!(r.due(now), "large");
    }
}

#[cfg(test)]
mod log_tests {
    //! Rotation as the log does it, end to end.
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use super::super::{verify, verify_set, AuditLog, Durability, Verified};
    use super::*;

    fn policy(max_bytes: u64, keep: Option<usize>) -> Policy {
        Policy {
            max_bytes: Some(max_bytes),
            max_age: None,
            keep,
        }
    }

    async fn fill(path: &Path, policy: Policy, n: usize) {
        // `always`: each record waits for the flush thread, which is where rotation happens.
        let log =
            AuditLog::open_rotating(path, Durability::Always, Duration::from_millis(10), policy)
                .unwrap();
        for i in 0..n {
            log.record(crate::audit_fields! {"kind" => "test", "n" => i, "pad" => "x".repeat(200)})
                .await
                .unwrap();
        }
        log.flush().wait().await.unwrap();
    }

    fn set(path: &Path) -> Vec<PathBuf> {
        let mut files = rotated_files(path).unwrap();
        files.push(path.to_owned());
        files
    }

    #[tokio::test]
    async fn the_chain_runs_through_every_rotated_file_and_a_gap_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        fill(&path, policy(4096, None), 60).await;
        let files = set(&path);
        assert!(files.len() >= 3, "{files:?}");
        assert_eq!(verify_set(&files).unwrap(), Ok(60 + files.len() - 1));
        // Each file alone verifies too (from the hash its first record names).
        for f in &files {
            assert!(
                matches!(verify(f).unwrap(), Verified::Intact { .. }),
                "{f:?}"
            );
        }
        // A file taken out of the middle, or two swapped, is found.
        let mut gap = files.clone();
        gap.remove(1);
        assert!(matches!(verify_set(&gap).unwrap(), Err((1, _))));
        let mut swapped = files.clone();
        swapped.swap(1, 2);
        assert!(verify_set(&swapped).unwrap().is_err());
        // Reopened, the log goes on in the current file.
        fill(&path, policy(1 << 30, None), 3).await;
        assert!(verify_set(&set(&path)).unwrap().is_ok());
    }

    #[tokio::test]
    async fn only_the_newest_rotated_files_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        fill(&path, policy(4096, Some(2)), 80).await;
        let rotated = rotated_files(&path).unwrap();
        assert_eq!(rotated.len(), 2, "{rotated:?}");
        // What is left still verifies as a set continuing one no longer there.
        assert!(verify_set(&set(&path)).unwrap().is_ok());
    }

    #[tokio::test]
    async fn an_empty_current_file_beside_rotated_ones_continues_their_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        fill(&path, policy(4096, None), 30).await;
        // As if pgiam stopped between a rotation's rename and the new file's first record.
        let last = rotated_name(&path, std::time::SystemTime::now());
        std::fs::rename(&path, &last).unwrap();
        std::fs::write(&path, b"").unwrap();
        fill(&path, policy(1 << 30, None), 2).await;
        let first = std::fs::read(&path).unwrap();
        let first = first.split(|b| *b == b'\n').next().unwrap();
        assert!(continues_from(first).is_some());
        assert!(verify_set(&set(&path)).unwrap().is_ok());
    }
}
