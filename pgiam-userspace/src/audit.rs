//! The audit log: JSON Lines, one record per decision, tamper-evident through a hash chain.
//!
//! Each line ends with `"hash":"<sha256>"`, the digest of the line as written without that
//! field; each line's `"prev"` is the previous line's hash (the first line's is all zeros).
//! Editing, inserting or deleting a line breaks the chain at that point, which
//! `pgiam audit verify` reports. (Without a secret, someone who can rewrite the file can also
//! recompute the tail; shipping lines to the log pipeline as they are written is what anchors
//! them.)
//!
//! One writer thread owns the file. Records arrive over a channel; the writer takes every
//! record waiting, writes them in one go and, with durability `always`, syncs before it
//! acknowledges any of them (group commit), through the write-ahead [`ring`] next to the log. A
//! caller that needs its record on disk before it proceeds awaits the acknowledgement; if the
//! write fails, the caller fails closed.

mod ring;

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;
use tokio::sync::oneshot;

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// Synced to disk before the decision has an effect: before a statement that can change
    /// something is forwarded, before the answer to one that cannot reaches the client.
    #[default]
    Always,
    /// Written in order, synced by the operating system when it chooses.
    Buffered,
}

#[derive(Debug, thiserror::Error, Clone)]
pub enum AuditError {
    #[error("cannot open the audit log {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("writing the audit log failed: {0}")]
    Write(String),
    #[error("the audit writer has stopped")]
    Stopped,
}

/// An audit record as it is written: a JSON object whose fields are serialized as they are
/// added, in that order (no tree of values built first: a statement's record costs one pass).
pub struct Record(Vec<u8>);

impl Default for Record {
    fn default() -> Self {
        Self::new()
    }
}

impl Record {
    pub fn new() -> Record {
        let mut json = Vec::with_capacity(512);
        json.push(b'{');
        Record(json)
    }

    /// Appends a field. `name` is a plain field name of pgiam's own, written as it is; the
    /// writer adds `ts`, `prev` and `hash`.
    pub fn add(&mut self, name: &str, value: &(impl serde::Serialize + ?Sized)) {
        debug_assert!(name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
        debug_assert!(!["ts", "prev", "hash"].contains(&name));
        self.push(name, value);
    }

    fn push(&mut self, name: &str, value: &(impl serde::Serialize + ?Sized)) {
        let mark = self.0.len();
        if mark > 1 {
            self.0.push(b',');
        }
        self.0.push(b'"');
        self.0.extend_from_slice(name.as_bytes());
        self.0.extend_from_slice(b"\":");
        if serde_json::to_writer(&mut self.0, value).is_err() {
            // Only maps with keys that are not strings fail, and pgiam writes none; a value
            // that did would leave half a field.
            self.0.truncate(mark);
        }
    }

    /// The record with its timestamp, left open (no closing brace) for the chain.
    fn open(mut self) -> Vec<u8> {
        let ts = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        self.push("ts", &ts);
        self.0
    }
}

struct Pending {
    /// The record as serialized by its caller, without the closing brace: the writer only
    /// adds the chain, so the group commit's critical section stays short. Empty for a flush.
    open: Vec<u8>,
    ack: Option<oneshot::Sender<Result<(), AuditError>>>,
}

/// A record on its way to the disk.
pub struct Written(oneshot::Receiver<Result<(), AuditError>>);

impl Written {
    pub async fn wait(self) -> Result<(), AuditError> {
        self.0.await.map_err(|_| AuditError::Stopped)?
    }
}

/// A handle to the audit writer; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Pending>,
    run_id: String,
    seq: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl AuditLog {
    /// Opens (or continues) the log at `path` and starts its writer thread.
    pub fn open(path: &Path, durability: Durability) -> Result<AuditLog, AuditError> {
        Self::open_with_ring(path, durability, ring::DEFAULT_SIZE)
    }

    fn open_with_ring(
        path: &Path,
        durability: Durability,
        ring_size: u64,
    ) -> Result<AuditLog, AuditError> {
        let open_err = |e: std::io::Error| AuditError::Open {
            path: path.to_owned(),
            message: e.to_string(),
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(open_err)?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(open_err)?;
        // A device such as /dev/full (tests) gets no ring beside it.
        let regular = file.metadata().map_err(open_err)?.file_type().is_file();
        let ring_path = ring::path_for(path);
        let prev =
            recover(&mut file, regular.then_some(ring_path.as_path())).map_err(|message| {
                AuditError::Open {
                    path: path.to_owned(),
                    message,
                }
            })?;
        let ring = match durability {
            Durability::Always if regular => match ring::Ring::open(&ring_path, ring_size) {
                Ok(r) => Some(r),
                Err(e) => {
                    // Durability is the same without it; each sync costs more.
                    tracing::warn!(
                        "audit: no write-ahead ring at {} ({e}): every sync commits the log itself",
                        ring_path.display()
                    );
                    let _ = std::fs::remove_file(&ring_path);
                    None
                }
            },
            _ => None,
        };
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("pgiam-audit".into())
            .spawn(move || writer(file, prev, durability, ring, rx))
            .map_err(open_err)?;
        Ok(AuditLog {
            tx,
            run_id: format!("{:08x}", rand::random::<u32>()),
            seq: Default::default(),
        })
    }

    /// A fresh record id, unique across restarts of pgiam (a random run id and a sequence).
    pub fn next_id(&self) -> String {
        let n = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("{}-{n}", self.run_id)
    }

    /// Appends a record and waits until it is written (and synced, with `always`).
    pub async fn record(&self, record: Record) -> Result<(), AuditError> {
        self.record_acked(record).wait().await
    }

    /// Appends a record now; the returned handle reports when it is written (and synced, with
    /// `always`), and with it every record appended before it.
    pub fn record_acked(&self, record: Record) -> Written {
        self.send_acked(record.open())
    }

    /// Writes (and syncs, with `always`) every record appended so far, lingering ones too;
    /// for a shutdown, which must not lose the last completions.
    pub fn flush(&self) -> Written {
        self.send_acked(Vec::new())
    }

    fn send_acked(&self, open: Vec<u8>) -> Written {
        let (ack, done) = oneshot::channel();
        // Without a writer the message, and the sender in it, is dropped: `wait` says so.
        let _ = self.tx.send(Pending {
            open,
            ack: Some(ack),
        });
        Written(done)
    }

    /// Appends a record without waiting (completions: nothing depends on them being on disk
    /// first, and the writer keeps their order). It is written with the next record that is
    /// waited for (and synced with it, with `always`), or after [`LINGER`] at the latest.
    pub fn record_later(&self, record: Record) {
        let _ = self.tx.send(Pending {
            open: record.open(),
            ack: None,
        });
    }
}

const NOT_A_RECORD: &str = "the last line is not a pgiam audit record; refusing to append";

/// Brings the log up to date from its ring (records lost with the page cache, a torn last
/// line) and returns the hash of its last line, or the genesis value for an empty log.
fn recover(file: &mut File, ring: Option<&Path>) -> Result<String, String> {
    let io = |e: std::io::Error| e.to_string();
    let len = file.seek(SeekFrom::End(0)).map_err(io)?;
    if len == 0 {
        // A new chain: an empty log is a rotated (or new) one, and what the ring holds belongs
        // to the log before it. (Not read either: a device such as /dev/full never ends.)
        return Ok(GENESIS.to_owned());
    }
    // The tail from the start of the last complete line: read backwards until it is whole
    // (a line holds a statement's text, which can be long).
    let mut window = 64 * 1024u64;
    let (tail_start, tail) = loop {
        let start = len.saturating_sub(window);
        file.seek(SeekFrom::Start(start)).map_err(io)?;
        let mut tail = Vec::new();
        file.read_to_end(&mut tail).map_err(io)?;
        let whole = start == 0 || {
            let end = tail.iter().rposition(|b| *b == b'\n');
            end.is_some_and(|end| tail[..end].contains(&b'\n'))
        };
        if whole {
            break (start, tail);
        }
        window *= 4;
    };
    // `complete`: up to and including the last newline; `torn`: what follows it.
    let complete = tail.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let torn = &tail[complete..];
    let prev = if complete == 0 {
        GENESIS.to_owned()
    } else {
        let lines = &tail[..complete - 1];
        let last = lines.rsplit(|b| *b == b'\n').next().unwrap_or_default();
        std::str::from_utf8(last)
            .ok()
            .and_then(split_hash)
            .map(|(_, h)| h.to_owned())
            .ok_or(NOT_A_RECORD)?
    };
    let found = match ring {
        Some(ring) => ring::continuation(ring, &prev).map_err(io)?,
        None => Vec::new(),
    };
    if !torn.is_empty() {
        // A torn line is the start of the record that follows, or not ours to touch.
        if !found
            .first()
            .is_some_and(|(line, _)| line.as_bytes().starts_with(torn))
        {
            return Err(NOT_A_RECORD.into());
        }
        file.set_len(tail_start + complete as u64).map_err(io)?;
    }
    let Some((_, last)) = found.last() else {
        return Ok(prev);
    };
    let last = last.clone();
    let mut text = String::new();
    for (line, _) in &found {
        text.push_str(line);
        text.push('\n');
    }
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_data().map_err(io)?;
    tracing::warn!(
        "audit: {} record(s) the log had lost were recovered from its write-ahead ring",
        found.len()
    );
    Ok(last)
}

fn sha256_hex(data: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(64);
    for b in d.as_ref() {
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 0xf)] as char);
    }
    out
}

/// Splits a line into the part that is hashed and its `hash` value.
fn split_hash(line: &str) -> Option<(&str, &str)> {
    const SUFFIX_LEN: usize = ",\"hash\":\"\"}".len() + 64;
    if line.len() < SUFFIX_LEN || !line.ends_with("\"}") {
        return None;
    }
    let (body, suffix) = line.split_at(line.len() - SUFFIX_LEN);
    let hash = suffix.strip_prefix(",\"hash\":\"")?.strip_suffix("\"}")?;
    (hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit())).then_some((body, hash))
}

/// Appends one record onto the chain after `prev` (`prev`, then the hash of everything
/// before it, as the last fields) and a newline to `out`; returns the record's hash.
fn seal(open: &[u8], prev: &str, out: &mut Vec<u8>) -> String {
    let start = out.len();
    out.extend_from_slice(open);
    if open.len() > 1 {
        out.push(b',');
    }
    out.extend_from_slice(b"\"prev\":\"");
    out.extend_from_slice(prev.as_bytes());
    out.push(b'"');
    let hash = sha256_hex(&out[start..]);
    out.extend_from_slice(b",\"hash\":\"");
    out.extend_from_slice(hash.as_bytes());
    out.extend_from_slice(b"\"}\n");
    hash
}

/// How long a record nobody waits for (a completion, a session's end) may stay in memory
/// before it is written. Held back until a record that is waited for comes, it is written (and
/// synced) with it: under load it costs neither a write of its own nor a wake-up of the writer.
const LINGER: Duration = Duration::from_millis(2);

/// Records written in one go at most.
const MAX_BATCH: usize = 1024;

fn writer(
    mut file: File,
    mut prev: String,
    durability: Durability,
    mut ring: Option<ring::Ring>,
    rx: mpsc::Receiver<Pending>,
) {
    let mut batch = Vec::new();
    let mut buf = Vec::with_capacity(64 * 1024);
    // Once a write fails the file's tail is unknown: every later record fails too, and the
    // callers fail closed.
    let mut broken: Option<AuditError> = None;
    // Until which the records in `batch`, none of them waited for, may wait.
    let mut deadline: Option<Instant> = None;
    loop {
        let next = match deadline {
            None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
            Some(d) => rx.recv_timeout(d.saturating_duration_since(Instant::now())),
        };
        let received = match next {
            Ok(first) => {
                batch.push(first);
                true
            }
            Err(mpsc::RecvTimeoutError::Disconnected) if batch.is_empty() => return,
            Err(_) => false,
        };
        while batch.len() < MAX_BATCH {
            let Ok(more) = rx.try_recv() else { break };
            batch.push(more);
        }
        let waited_for = batch.iter().any(|p| p.ack.is_some());
        if !waited_for && received && batch.len() < MAX_BATCH {
            let now = Instant::now();
            let d = *deadline.get_or_insert(now + LINGER);
            if now < d {
                continue;
            }
        }
        deadline = None;
        let result = match &broken {
            Some(e) => Err(e.clone()),
            None => {
                buf.clear();
                let mut next = prev.clone();
                // An empty entry is a flush: it writes no line of its own.
                for p in batch.iter().filter(|p| !p.open.is_empty()) {
                    next = seal(&p.open, &next, &mut buf);
                }
                let written = file
                    .write_all(&buf)
                    .and_then(|_| match (durability, &mut ring) {
                        // Everything goes to the ring, in order, so that it can rebuild the log's
                        // tail; only a batch someone waits for is synced.
                        (Durability::Always, Some(ring)) => {
                            ring.append(&buf, waited_for, || file.sync_data())
                        }
                        (Durability::Always, None) if waited_for => file.sync_data(),
                        _ => Ok(()),
                    });
                match written {
                    Ok(()) => {
                        prev = next;
                        Ok(())
                    }
                    Err(e) => {
                        let e = AuditError::Write(e.to_string());
                        tracing::error!("{e}: refusing everything that needs an audit record");
                        broken = Some(e.clone());
                        Err(e)
                    }
                }
            }
        };
        for p in batch.drain(..) {
            if let Some(ack) = p.ack {
                let _ = ack.send(result.clone());
            }
        }
    }
}

/// A line that matches its own hash: the hash, and the one it says comes before it.
struct Sealed {
    hash: String,
    prev: String,
}

impl Sealed {
    /// Checks one line (without its newline) on its own; the reason if it is not a record.
    fn check(line: &[u8]) -> Result<Sealed, &'static str> {
        let line = std::str::from_utf8(line).map_err(|_| "not UTF-8")?;
        let (body, hash) = split_hash(line).ok_or("no hash field at the end of the line")?;
        if sha256_hex(body.as_bytes()) != hash {
            return Err("the line does not match its hash (edited)");
        }
        let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(line) else {
            return Err("not a JSON object");
        };
        let prev = fields
            .get("prev")
            .and_then(Value::as_str)
            .unwrap_or_default();
        Ok(Sealed {
            hash: hash.to_owned(),
            prev: prev.to_owned(),
        })
    }
}

/// The outcome of checking a file.
#[derive(Debug, PartialEq, Eq)]
pub enum Verified {
    Intact { records: usize },
    Broken { line: usize, reason: String },
}

/// Checks every line's own hash and its link to the line before.
pub fn verify(path: &Path) -> std::io::Result<Verified> {
    let file = File::open(path)?;
    let mut prev = GENESIS.to_owned();
    let mut records = 0;
    for (i, line) in BufReader::new(file).split(b'\n').enumerate() {
        let line_no = i + 1;
        let line = line?;
        let broken = |reason: &str| {
            Ok(Verified::Broken {
                line: line_no,
                reason: reason.to_owned(),
            })
        };
        let sealed = match Sealed::check(&line) {
            Ok(sealed) => sealed,
            Err(reason) => return broken(reason),
        };
        if sealed.prev != prev {
            return broken("prev does not match the previous line's hash (lines removed, inserted or reordered)");
        }
        prev = sealed.hash;
        records += 1;
    }
    Ok(Verified::Intact { records })
}

/// Builds a [`Record`] from `name => value` pairs (any `Serialize` value).
#[macro_export]
macro_rules! audit_fields {
    ($($k:expr => $v:expr),* $(,)?) => {{
        let mut r = $crate::audit::Record::new();
        $( r.add($k, &$v); )*
        r
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn write_three(path: &Path) {
        let log = AuditLog::open(path, Durability::Always).unwrap();
        for i in 0..3 {
            log.record(crate::audit_fields! {"kind" => "test", "n" => i, "text" => "a\"b\n"})
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn chain_verifies_and_continues_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_three(&path).await;
        write_three(&path).await;
        assert_eq!(verify(&path).unwrap(), Verified::Intact { records: 6 });
    }

    #[tokio::test]
    async fn any_single_byte_edit_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_three(&path).await;
        let original = std::fs::read(&path).unwrap();
        for at in (0..original.len()).filter(|i| original[*i] != b'\n') {
            let mut edited = original.clone();
            edited[at] ^= 0x01;
            std::fs::write(&path, &edited).unwrap();
            assert!(
                matches!(verify(&path).unwrap(), Verified::Broken { .. }),
                "flipping byte {at} went unnoticed"
            );
        }
    }

    #[tokio::test]
    async fn removed_or_reordered_lines_are_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_three(&path).await;
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        std::fs::write(&path, format!("{}\n{}\n", lines[0], lines[2])).unwrap();
        assert_eq!(
            verify(&path).unwrap(),
            Verified::Broken {
                line: 2,
                reason: "prev does not match the previous line's hash (lines removed, inserted or reordered)".into()
            }
        );
        std::fs::write(&path, format!("{}\n{}\n{}\n", lines[1], lines[0], lines[2])).unwrap();
        assert!(matches!(
            verify(&path).unwrap(),
            Verified::Broken { line: 1, .. }
        ));
    }

    /// A record nobody waits for is not kept back for long: it is in the file soon after,
    /// with no other record to carry it, and a record waited for takes it along at once.
    #[tokio::test]
    async fn records_nobody_waits_for_are_written_soon_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path, Durability::Always).unwrap();
        log.record_later(crate::audit_fields! {"kind" => "later", "n" => 1});
        let mut waited = std::time::Duration::ZERO;
        while std::fs::read_to_string(&path).unwrap().lines().count() < 1 {
            assert!(waited < std::time::Duration::from_secs(10), "never written");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            waited += std::time::Duration::from_millis(5);
        }
        log.record_later(crate::audit_fields! {"kind" => "later", "n" => 2});
        log.record(crate::audit_fields! {"kind" => "waited", "n" => 3})
            .await
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let ns: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["n"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(ns, [1, 2, 3]);
        assert_eq!(verify(&path).unwrap(), Verified::Intact { records: 3 });
    }

    /// A flush (at shutdown) writes the records still held back, and no line of its own.
    #[tokio::test]
    async fn a_flush_writes_what_is_held_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path, Durability::Always).unwrap();
        log.record_later(crate::audit_fields! {"kind" => "completion", "n" => 1});
        log.flush().wait().await.unwrap();
        assert_eq!(verify(&path).unwrap(), Verified::Intact { records: 1 });
        log.flush().wait().await.unwrap();
        log.record(crate::audit_fields! {"kind" => "waited", "n" => 2})
            .await
            .unwrap();
        assert_eq!(verify(&path).unwrap(), Verified::Intact { records: 2 });
    }

    #[tokio::test]
    async fn a_failing_sink_fails_every_record() {
        let log = AuditLog::open(Path::new("/dev/full"), Durability::Always);
        // /dev/full accepts the open and fails every write.
        let log = log.unwrap();
        assert!(log
            .record(crate::audit_fields! {"kind" => "x"})
            .await
            .is_err());
        assert!(log
            .record(crate::audit_fields! {"kind" => "y"})
            .await
            .is_err());
    }

    async fn write_n(path: &Path, ring_size: u64, n: usize) {
        let log = AuditLog::open_with_ring(path, Durability::Always, ring_size).unwrap();
        for i in 0..n {
            log.record(
                crate::audit_fields! {"kind" => "test", "n" => i, "pad" => "x".repeat(i % 7 * 10)},
            )
            .await
            .unwrap();
        }
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// What a power failure can leave: the log's last records gone with the page cache, the
    /// one before them torn. They come back from the ring, and the chain goes on.
    #[tokio::test]
    async fn a_lost_tail_is_recovered_from_the_ring() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_n(&path, 64 * 1024, 6).await;
        let all = lines(&path);
        let torn = &all[3][..all[3].len() / 2];
        std::fs::write(&path, format!("{}\n{}\n{}\n{torn}", all[0], all[1], all[2])).unwrap();
        write_n(&path, 64 * 1024, 2).await;
        assert_eq!(verify(&path).unwrap(), Verified::Intact { records: 8 });
        assert_eq!(lines(&path)[..6], all[..]);
    }

    /// Records from before the ring wrapped are durable in the log; the ones after are found
    /// past the wrap, and stale entries the wrap half overwrote are never followed.
    #[tokio::test]
    async fn the_ring_wraps_and_still_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_n(&path, 2048, 40).await;
        let all = lines(&path);
        std::fs::write(&path, all[..38].join("\n") + "\n").unwrap();
        write_n(&path, 2048, 1).await;
        assert_eq!(verify(&path).unwrap(), Verified::Intact { records: 41 });
        assert_eq!(lines(&path)[..40], all[..]);
    }

    /// Rotation (the log moved away or truncated): the new log starts a new chain, and the
    /// ring's records, which belong to the old one, stay out of it.
    #[tokio::test]
    async fn an_empty_log_starts_a_new_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_n(&path, 64 * 1024, 4).await;
        std::fs::rename(&path, dir.path().join("audit.jsonl.1")).unwrap();
        write_n(&path, 64 * 1024, 1).await;
        assert_eq!(verify(&path).unwrap(), Verified::Intact { records: 1 });
        assert_eq!(lines(&path).len(), 1);
    }

    #[tokio::test]
    async fn a_torn_line_that_is_not_the_next_record_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_n(&path, 64 * 1024, 3).await;
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"forged\":");
        std::fs::write(&path, &text).unwrap();
        let Err(err) = AuditLog::open_with_ring(&path, Durability::Always, 64 * 1024) else {
            panic!("must refuse")
        };
        assert!(
            err.to_string().contains("not a pgiam audit record"),
            "{err}"
        );
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            text,
            "left as it was"
        );
    }

    #[test]
    fn a_foreign_file_is_not_appended_to() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::fs::write(&path, "hello\n").unwrap();
        let Err(err) = AuditLog::open(&path, Durability::Always) else {
            panic!("must refuse")
        };
        assert!(
            err.to_string().contains("not a pgiam audit record"),
            "{err}"
        );
    }
}
