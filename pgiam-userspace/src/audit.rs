//! The audit log: JSON Lines, one record per decision, tamper-evident through a hash chain.
//!
//! Each line ends with `"hash":"<sha256>"`: the digest of the previous line's hash followed by
//! the line as written without that field (the first line follows all zeros). Editing,
//! inserting, deleting or reordering lines breaks the chain at that point, which
//! `pgiam audit verify` reports. (Without a secret, someone who can rewrite the file can also
//! recompute the tail; shipping lines to the log pipeline as they are written is what anchors
//! them.) Lines of format 1 carried the previous hash as a `prev` field and hashed the line
//! alone; they still verify.
//!
//! Records are sealed onto the chain and written (`write(2)`, in chain order) by the caller
//! itself, under one lock: once [`AuditLog::append`] returns, the records are in the kernel
//! and killing pgiam loses none of them. Getting them onto the device is a separate step, a
//! group flush on the `pgiam-audit` thread (through the write-ahead [`ring`] next to the log):
//! [`Durability`] says which decisions wait for it. A record nobody waits for (a completion)
//! may linger in memory for [`LINGER`] and goes out with the next record written. If a write
//! or a flush fails, every later record fails and the callers fail closed.

mod flush;
pub mod read;
mod ring;
pub mod rotate;

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;
use tokio::sync::watch;

/// The record format written: each record's first field, `v` (see README, "Audit record
/// format"). Format 1 records have no `v`.
pub const FORMAT: u32 = 2;

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// When a decision's record must be on the device (synced), as opposed to in the kernel.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// Every record is on the device before its decision has an effect: before a statement
    /// that can change something is forwarded, before the answer to one that cannot reaches
    /// the client. A host's power loss loses nothing anyone saw an effect of.
    Always,
    /// Every record is in the kernel before its statement is forwarded; a statement that can
    /// change something (anything not provably a read, and COMMIT) waits for the device too.
    /// Reads never wait for a flush; a group flush runs every `flush_interval_ms`. A host's
    /// power loss can lose the records of reads (and of the COMMIT itself) of the last
    /// interval, never one of a change.
    #[default]
    Changes,
    /// Records stay in memory up to `flush_interval_ms`, then are written; the operating
    /// system syncs them when it chooses. Killing pgiam can lose the last interval's records.
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
        let mut r = Record(Vec::with_capacity(256));
        r.0.push(b'{');
        r.push("v", &FORMAT);
        r
    }

    /// Appends a field. `name` is a plain field name of pgiam's own, written as it is; the
    /// writer adds `ts` and `hash`.
    pub fn add(&mut self, name: &str, value: &(impl serde::Serialize + ?Sized)) {
        debug_assert!(name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
        debug_assert!(!["v", "ts", "prev", "hash"].contains(&name));
        self.push(name, value);
    }

    /// Whether this is the record with `id` (added first after the format version, as the
    /// decision records add theirs).
    /// (Asked at an Execute: nothing is allocated. An id with a character JSON escapes is never
    /// matched; pgiam's ids have none.)
    pub fn id_is(&self, id: &str) -> bool {
        static HEAD: std::sync::LazyLock<String> =
            std::sync::LazyLock::new(|| format!("{{\"v\":{FORMAT},\"id\":\""));
        self.0
            .strip_prefix(HEAD.as_bytes())
            .and_then(|rest| rest.strip_prefix(id.as_bytes()))
            .is_some_and(|rest| rest.first() == Some(&b'"'))
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
    fn open(mut self, clock: &mut Clock) -> Vec<u8> {
        self.0.extend_from_slice(b",\"ts\":\"");
        clock.stamp(&mut self.0);
        self.0.push(b'"');
        self.0
    }
}

/// Writes records' timestamps (RFC 3339, UTC, microseconds). Taken as each record is sealed,
/// so they follow the chain's order; the part up to the second is formatted once a second,
/// as a statement's record is sealed under the log's lock.
struct Clock {
    second: u64,
    /// `2026-12-03T08:15:42.` for `second`.
    prefix: Vec<u8>,
}

impl Clock {
    fn new() -> Clock {
        Clock {
            second: u64::MAX,
            prefix: Vec::new(),
        }
    }

    fn stamp(&mut self, out: &mut Vec<u8>) {
        const SECOND: &[time::format_description::FormatItem<'_>] =
            time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        if now.as_secs() != self.second {
            self.second = now.as_secs();
            self.prefix = i64::try_from(self.second)
                .ok()
                .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
                .and_then(|t| t.format(SECOND).ok())
                .unwrap_or_default()
                .into_bytes();
        }
        out.extend_from_slice(&self.prefix);
        let mut micros = now.subsec_micros();
        let mut digits = [b'0'; 6];
        for d in digits.iter_mut().rev() {
            *d = b'0' + (micros % 10) as u8;
            micros /= 10;
        }
        out.extend_from_slice(&digits);
        out.push(b'Z');
    }
}

/// A record's place in the chain: the number of records sealed up to and including it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Position(u64);

impl Position {
    /// The position `n` records before this one.
    pub fn before(self, n: usize) -> Position {
        Position(self.0.saturating_sub(n as u64))
    }

    /// The position `n` records after this one.
    pub fn after(self, n: u64) -> Position {
        Position(self.0 + n)
    }
}

/// What the flush thread has made durable, or why it no longer can.
#[derive(Clone, Default)]
struct Synced {
    upto: u64,
    failed: Option<AuditError>,
    /// When the last flush completed.
    at: Option<std::time::SystemTime>,
}

/// What `pgiam status` shows of the log.
#[derive(Debug, Clone)]
pub struct AuditStatus {
    /// Records sealed onto the chain since start.
    pub sealed: u64,
    /// Of those, written to the kernel.
    pub written: u64,
    /// Of those, on the device.
    pub synced: u64,
    pub last_flush: Option<std::time::SystemTime>,
    /// Why the log no longer takes records.
    pub failed: Option<String>,
}

/// Records on their way to the device: resolves once they are synced.
pub struct Written(WrittenState);

enum WrittenState {
    Done(Result<(), AuditError>),
    Pending(watch::Receiver<Synced>, u64),
}

impl Written {
    pub async fn wait(self) -> Result<(), AuditError> {
        match self.0 {
            WrittenState::Done(r) => r,
            WrittenState::Pending(mut rx, upto) => {
                // Boxed: a session holds the wait's room only while it waits.
                let synced = Box::pin(rx.wait_for(|s| s.upto >= upto || s.failed.is_some()))
                    .await
                    .map_err(|_| AuditError::Stopped)?;
                match &synced.failed {
                    // What was durable before the failure stays so.
                    Some(e) if synced.upto < upto => Err(e.clone()),
                    _ => Ok(()),
                }
            }
        }
    }
}

/// What the appenders and the flush thread share, under [`Inner::state`].
struct State {
    file: Arc<File>,
    /// The hash of the last record sealed.
    prev: String,
    /// `prev` before the records an append is sealing, for undoing them.
    prev_before: String,
    clock: Clock,
    sealed: u64,
    /// Sealed and written to the kernel.
    written: u64,
    /// Sealed lines not yet written (completions lingering; everything, with `buffered`).
    held: Vec<u8>,
    held_since: Option<Instant>,
    /// Written since the last flush, for the ring.
    unsynced: Vec<u8>,
    /// Up to where a caller waits for (or asked for) a flush.
    wanted: u64,
    /// The flush thread sleeps for long (nothing happened lately): a lingering record must
    /// wake it. While records come, it looks every [`LINGER`] on its own instead, so that a
    /// busy log does not pay a wake-up per completion.
    flusher_idle: bool,
    broken: Option<AuditError>,
    /// The log broke on a write (a full disk, say), and the file is known good up to
    /// `good_len`: the flush thread retries, and the log recovers without a restart. (Not after
    /// a failed flush: what the kernel dropped then cannot be known.)
    recoverable: bool,
    /// The file's length after the last complete write.
    good_len: u64,
    /// The current file's size and age, when the log rotates.
    rotation: Option<rotate::Rotation>,
}

struct Inner {
    durability: Durability,
    interval: Duration,
    state: Mutex<State>,
    /// Wakes the flush thread: a flush is wanted, or lines are held.
    wake: Condvar,
    synced: watch::Sender<Synced>,
    /// Record ids: this run's random prefix and a sequence (here, not in each handle: every
    /// session's gate holds a handle).
    run_id: String,
    seq: std::sync::atomic::AtomicU64,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    /// Writes the held lines (and `more`, sealed after them) to the kernel.
    fn write_out(&mut self, ring: bool) -> Result<(), AuditError> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        if self.held.is_empty() {
            return Ok(());
        }
        // Written by whoever holds the lock, so lines reach the file in the order sealed.
        match (&*self.file).write_all(&self.held) {
            Ok(()) => {
                self.good_len += self.held.len() as u64;
                if let Some(r) = &mut self.rotation {
                    r.bytes += self.held.len() as u64;
                }
                if ring {
                    self.unsynced.extend_from_slice(&self.held);
                }
                self.held.clear();
                self.held_since = None;
                self.written = self.sealed;
                Ok(())
            }
            Err(e) => {
                let e = self.break_with(e);
                self.recoverable = true;
                Err(e)
            }
        }
    }

    fn break_with(&mut self, e: std::io::Error) -> AuditError {
        let e = AuditError::Write(e.to_string());
        tracing::error!("{e}: refusing everything that needs an audit record");
        self.broken = Some(e.clone());
        self.recoverable = false;
        e
    }

    /// After a failed write: cuts what the write left of a line off the file and writes what
    /// is held again. `true`: the log takes records again.
    fn try_recover(&mut self, ring: bool) -> bool {
        if !self.recoverable {
            return false;
        }
        let rewritten = self
            .file
            .set_len(self.good_len)
            .and_then(|()| (&*self.file).write_all(&self.held));
        match rewritten {
            Ok(()) => {
                self.good_len += self.held.len() as u64;
                if ring {
                    self.unsynced.extend_from_slice(&self.held);
                }
                self.held.clear();
                self.held_since = None;
                self.written = self.sealed;
                self.broken = None;
                self.recoverable = false;
                tracing::info!("audit: the log takes records again");
                true
            }
            Err(_) => false,
        }
    }

    fn seal(&mut self, record: Record) {
        let open = record.open(&mut self.clock);
        seal(&open, &mut self.prev, &mut self.held);
        self.sealed += 1;
    }

    /// Rotates the file if it is due (size or age). A rotation that fails leaves the log
    /// writing where it was (and is tried again later): losing rotation must not stop the log.
    fn rotate_if_due(&mut self, ring: bool) {
        let now = std::time::SystemTime::now();
        if self.broken.is_some() || !self.rotation.as_ref().is_some_and(|r| r.due(now)) {
            return;
        }
        match self.rotate(ring, now) {
            Ok(()) => {}
            // A flush that failed may have lost what it was to make durable: the log is
            // broken, as it would be for any write (fail closed).
            Err(Rotation::Flush(e)) => {
                self.break_with(e);
            }
            Err(Rotation::Move(e)) => {
                tracing::error!("audit: rotation failed, the log goes on in the same file: {e}");
                if let Some(r) = &mut self.rotation {
                    // Not again at every record: after a while, or once the file has grown.
                    r.since = now;
                }
            }
        }
    }

    fn rotate(&mut self, ring: bool, now: std::time::SystemTime) -> Result<(), Rotation> {
        let Some(path) = self.rotation.as_ref().map(|r| r.path.clone()) else {
            return Ok(());
        };
        // Everything sealed for the old file goes to it, and it is durable as a whole before
        // the next file starts (the ring holds only recent records).
        if let Err(e) = self.write_out(ring) {
            return Err(Rotation::Flush(std::io::Error::other(e)));
        }
        self.file.sync_data().map_err(Rotation::Flush)?;
        let rotated = rotate::rotated_name(&path, now);
        std::fs::rename(&path, &rotated).map_err(Rotation::Move)?;
        let file = OpenOptions::new()
            .create_new(true)
            .read(true)
            .append(true)
            .open(&path);
        let file = match file {
            Ok(f) => f,
            Err(e) => {
                // Back to where it was, so the log goes on in one piece.
                let _ = std::fs::rename(&rotated, &path);
                return Err(Rotation::Move(e));
            }
        };
        self.file = Arc::new(file);
        if let Some(r) = &mut self.rotation {
            r.bytes = 0;
            r.since = now;
        }
        self.good_len = 0;
        self.continue_chain(&rotated);
        if let Err(e) = self.write_out(ring) {
            return Err(Rotation::Flush(std::io::Error::other(e)));
        }
        self.file.sync_data().map_err(Rotation::Flush)?;
        rotate::sync_dir(&path).map_err(Rotation::Flush)?;
        tracing::info!(rotated = %rotated.display(), "audit: log rotated");
        if let Some(keep) = self.rotation.as_ref().and_then(|r| r.policy.keep) {
            match rotate::prune(&path, keep) {
                Ok(gone) => {
                    for f in gone {
                        tracing::info!(file = %f.display(), keep, "audit: rotated file removed");
                    }
                }
                Err(e) => tracing::error!("audit: removing old rotated files: {e}"),
            }
        }
        Ok(())
    }

    /// Seals the record a rotated-into file starts with: the chain goes on from `previous`.
    fn continue_chain(&mut self, previous: &Path) {
        let record = crate::audit_fields! {
            "kind" => rotate::CONTINUED,
            "previous_file" => previous.file_name().unwrap_or_default().to_string_lossy(),
            "previous_hash" => self.prev,
        };
        self.seal(record);
    }
}

impl Drop for Inner {
    /// The last handle is gone: what lingers is written (not synced).
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = state.write_out(false);
    }
}

/// The most room a flushed batch keeps for the next one.
const BATCH_ROOM_KEPT: usize = 1 << 20;

/// Why a rotation did not happen.
enum Rotation {
    /// Making the log durable failed: the log is broken.
    Flush(std::io::Error),
    /// Moving files failed: the log goes on where it was.
    Move(std::io::Error),
}

/// A handle to the audit log; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

impl AuditLog {
    /// Opens (or continues) the log at `path` and starts its flush thread.
    pub fn open(
        path: &Path,
        durability: Durability,
        interval: Duration,
    ) -> Result<AuditLog, AuditError> {
        Self::open_with_ring(path, durability, interval, ring::DEFAULT_SIZE)
    }

    /// [`AuditLog::open`], rotating the file as `rotation` says.
    pub fn open_rotating(
        path: &Path,
        durability: Durability,
        interval: Duration,
        rotation: rotate::Policy,
    ) -> Result<AuditLog, AuditError> {
        Self::open_with(path, durability, interval, ring::DEFAULT_SIZE, rotation)
    }

    fn open_with_ring(
        path: &Path,
        durability: Durability,
        interval: Duration,
        ring_size: u64,
    ) -> Result<AuditLog, AuditError> {
        Self::open_with(
            path,
            durability,
            interval,
            ring_size,
            rotate::Policy::default(),
        )
    }

    fn open_with(
        path: &Path,
        durability: Durability,
        interval: Duration,
        ring_size: u64,
        rotation: rotate::Policy,
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
            Durability::Always | Durability::Changes if regular => {
                match ring::Ring::open(&ring_path, ring_size) {
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
                }
            }
            _ => None,
        };
        // An empty file beside rotated ones (pgiam stopped between a rotation's rename and its
        // first record, or the file was removed): the chain goes on from the newest of them.
        let empty = file.metadata().map_err(open_err)?.len() == 0;
        let predecessor = match (regular && empty, rotate::rotated_files(path)) {
            (true, Ok(files)) => files.last().cloned(),
            _ => None,
        };
        let prev = match &predecessor {
            Some(p) => last_hash(p).map_err(|message| AuditError::Open {
                path: p.clone(),
                message,
            })?,
            None => prev,
        };
        let meta = file.metadata().map_err(open_err)?;
        let rotation = (rotation.rotates() && regular).then(|| rotate::Rotation {
            path: path.to_owned(),
            policy: rotation,
            bytes: meta.len(),
            since: meta
                .created()
                .or_else(|_| meta.modified())
                .unwrap_or_else(|_| std::time::SystemTime::now()),
        });
        let mut state = State {
            file: Arc::new(file),
            prev,
            prev_before: String::with_capacity(64),
            clock: Clock::new(),
            sealed: 0,
            written: 0,
            held: Vec::new(),
            held_since: None,
            unsynced: Vec::new(),
            wanted: 0,
            flusher_idle: true,
            broken: None,
            recoverable: false,
            good_len: meta.len(),
            rotation,
        };
        if let Some(p) = &predecessor {
            state.continue_chain(p);
            state.write_out(false)?;
            state.file.sync_data().map_err(open_err)?;
        }
        let inner = Arc::new(Inner {
            durability,
            interval: interval.max(Duration::from_millis(1)),
            state: Mutex::new(state),
            wake: Condvar::new(),
            synced: watch::Sender::new(Synced::default()),
            run_id: format!("{:08x}", rand::random::<u32>()),
            seq: Default::default(),
        });
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("pgiam-audit".into())
            .spawn(move || flush::flusher(weak, ring))
            .map_err(open_err)?;
        Ok(AuditLog { inner })
    }

    pub fn durability(&self) -> Durability {
        self.inner.durability
    }

    /// How far records have come: sealed, written to the kernel, on the device.
    pub fn status(&self) -> AuditStatus {
        let (sealed, written, broken) = {
            let state = self.inner.lock();
            (state.sealed, state.written, state.broken.clone())
        };
        let synced = self.inner.synced.borrow();
        AuditStatus {
            sealed,
            written,
            synced: synced.upto,
            last_flush: synced.at,
            failed: broken
                .or_else(|| synced.failed.clone())
                .map(|e| e.to_string()),
        }
    }

    /// A fresh record id, unique across restarts of pgiam (a random run id and a sequence).
    pub fn next_id(&self) -> String {
        use std::fmt::Write as _;
        let inner = &self.inner;
        let n = inner.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut id = String::with_capacity(inner.run_id.len() + 21);
        id.push_str(&inner.run_id);
        let _ = write!(id, "-{n}");
        id
    }

    /// Seals `records` onto the chain, in order, and writes them (with any that linger before
    /// them) to the kernel before it returns — except with `buffered`, which holds them up to
    /// the flush interval. The position is the last record's; an error means the records are
    /// not in the log, and the caller fails closed.
    pub fn append(&self, records: Vec<Record>) -> Result<Position, AuditError> {
        let started = Instant::now();
        let appended = self.append_now(records);
        crate::metrics::get()
            .audit_write
            .observe(started.elapsed().as_secs_f64());
        appended
    }

    fn append_now(&self, records: Vec<Record>) -> Result<Position, AuditError> {
        let mut state = self.inner.lock();
        if let Some(e) = &state.broken {
            return Err(e.clone());
        }
        // Undone if the write fails: these records' statements are then not forwarded, and
        // the chain goes on (once the log recovers) as if they had never been sealed.
        let before = (state.sealed, state.held.len());
        let State {
            prev, prev_before, ..
        } = &mut *state;
        prev_before.clone_from(prev);
        for r in records {
            state.seal(r);
        }
        let at = Position(state.sealed);
        let written = if self.inner.durability == Durability::Buffered {
            // The thread writes what is held; only a large backlog is written here.
            if state.held_since.is_none() {
                state.held_since = Some(Instant::now());
            }
            if state.held.len() >= HELD_MAX {
                state.write_out(false)
            } else {
                Ok(())
            }
        } else {
            // (Rotation is the flush thread's: its flushes never hold up an appender.)
            state.write_out(true)
        };
        if written.is_err() {
            let State {
                prev, prev_before, ..
            } = &mut *state;
            prev.clone_from(prev_before);
            state.sealed = before.0;
            state.held.truncate(before.1);
            // Whoever waits for an earlier record's flush is told too.
            self.inner.wake.notify_one();
        }
        written.map(|()| at)
    }

    /// Asks for a flush up to `upto` now and returns what resolves once it is done. With
    /// `buffered` there is no flush: it resolves at once.
    pub fn durable(&self, upto: Position) -> Written {
        if self.inner.durability == Durability::Buffered {
            return Written(WrittenState::Done(Ok(())));
        }
        let rx = self.inner.synced.subscribe();
        if rx.borrow().upto < upto.0 {
            self.request(upto);
        }
        Written(WrittenState::Pending(rx, upto.0))
    }

    /// Starts a flush up to `upto` without waiting for it.
    fn request(&self, upto: Position) {
        let mut state = self.inner.lock();
        if state.wanted < upto.0 {
            state.wanted = upto.0;
            self.inner.wake.notify_one();
        }
    }

    /// Appends a record and waits as long as the durability asks for a record whose decision
    /// changes nothing in the database (a login's, a refusal's): with `always`, until it is
    /// on the device; else until it is in the kernel (`buffered`: in memory).
    pub async fn record(&self, record: Record) -> Result<(), AuditError> {
        let at = self.append(vec![record])?;
        match self.inner.durability {
            Durability::Always => self.durable(at).wait().await,
            _ => Ok(()),
        }
    }

    /// Appends a record nobody waits for (a completion, a session's end): it goes out with the
    /// next record written, or after [`LINGER`] at the latest, in chain order either way.
    pub fn record_later(&self, record: Record) {
        let mut state = self.inner.lock();
        if state.broken.is_some() {
            return;
        }
        state.seal(record);
        if state.held_since.is_none() {
            state.held_since = Some(Instant::now());
            if state.flusher_idle {
                self.inner.wake.notify_one();
            }
        }
    }

    /// Writes and syncs every record appended so far, lingering ones too, whatever the
    /// durability; for a shutdown, which must not lose the last completions.
    pub fn flush(&self) -> Written {
        let upto = {
            let mut state = self.inner.lock();
            let ring = self.inner.durability != Durability::Buffered;
            if let Err(e) = state.write_out(ring) {
                return Written(WrittenState::Done(Err(e)));
            }
            state.wanted = state.wanted.max(state.sealed);
            self.inner.wake.notify_one();
            state.sealed
        };
        Written(WrittenState::Pending(self.inner.synced.subscribe(), upto))
    }
}

const NOT_A_RECORD: &str = "the last line is not a pgiam audit record; refusing to append";

/// Brings the log up to date from its ring (records lost with the page cache, a torn last
/// line) and returns the hash of its last line, or the genesis value for an empty log.
/// The hash of the last record of a (rotated, synced) file, read only: a rotated file is
/// never changed (a torn one is an error to look at, not to repair).
fn last_hash(path: &Path) -> Result<String, String> {
    let mut f = File::open(path).map_err(|e| e.to_string())?;
    recover(&mut f, None)
}

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

fn sha256(parts: &[&[u8]]) -> aws_lc_rs::digest::Digest {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for p in parts {
        ctx.update(p);
    }
    ctx.finish()
}

fn hex_into(bytes: &[u8], out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 0xf)] as char);
    }
}

fn sha256_hex(parts: &[&[u8]]) -> String {
    let mut out = String::with_capacity(64);
    hex_into(sha256(parts).as_ref(), &mut out);
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
    is_hash(hash).then_some((body, hash))
}

fn is_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The `prev` a format-1 line carries as its last field before the hash.
fn format1_prev(body: &str) -> Option<&str> {
    const FIELD_LEN: usize = "\"prev\":\"\"".len() + 64;
    if body.len() < FIELD_LEN + 1 {
        return None;
    }
    let (before, field) = body.split_at(body.len() - FIELD_LEN);
    let prev = field.strip_prefix("\"prev\":\"")?.strip_suffix('"')?;
    // A string value cannot end that way: its quotes would be escaped.
    (is_hash(prev) && (before.ends_with(',') || before == "{")).then_some(prev)
}

/// Appends one record onto the chain after `prev` (its hash as the last field) and a newline
/// to `out`; `prev` becomes the record's hash.
fn seal(open: &[u8], prev: &mut String, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(open);
    let digest = sha256(&[prev.as_bytes(), &out[start..]]);
    prev.clear();
    hex_into(digest.as_ref(), prev);
    out.extend_from_slice(if open.len() > 1 {
        b",\"hash\":\""
    } else {
        b"\"hash\":\""
    });
    out.extend_from_slice(prev.as_bytes());
    out.extend_from_slice(b"\"}\n");
}

/// How long a record nobody waits for (a completion, a session's end) may stay in memory
/// before it is written. Held back until a record that is waited for comes, it is written with
/// it: under load it costs neither a write of its own nor a wake-up of the flush thread.
const LINGER: Duration = Duration::from_millis(2);

/// With `buffered`, a backlog this large is written at once.
const HELD_MAX: usize = 256 * 1024;

/// The outcome of checking a file.
#[derive(Debug, PartialEq, Eq)]
pub enum Verified {
    Intact { records: usize },
    Broken { line: usize, reason: String },
}

/// Checks that `line` (without its newline) is a record that follows the one whose hash is
/// `prev`; returns its hash.
fn follows(line: &[u8], prev: &str) -> Result<String, &'static str> {
    let line = std::str::from_utf8(line).map_err(|_| "not UTF-8")?;
    let (body, hash) = split_hash(line).ok_or("no hash field at the end of the line")?;
    match format1_prev(body) {
        Some(p) => {
            if sha256_hex(&[body.as_bytes()]) != hash {
                return Err("the line does not match its hash (edited)");
            }
            if p != prev {
                return Err("prev does not match the previous line's hash (lines removed, inserted or reordered)");
            }
        }
        None if sha256_hex(&[prev.as_bytes(), body.as_bytes()]) != hash => {
            return Err("the line does not match its hash after the previous line's (edited, or lines removed, inserted or reordered)");
        }
        None => {}
    }
    if !matches!(serde_json::from_str::<Value>(line), Ok(Value::Object(_))) {
        return Err("not a JSON object");
    }
    Ok(hash.to_owned())
}

/// Checks every line against its hash and the line before it. A file rotated into starts from
/// the previous file's last hash, which its first record names.
pub fn verify(path: &Path) -> std::io::Result<Verified> {
    verify_from(path, None).map(|(v, _)| v)
}

/// Checks a rotated set, oldest first: each file's chain, and that each file after the first
/// starts exactly where the one before it ends. `Err` carries the index of the file at fault.
pub fn verify_set(paths: &[PathBuf]) -> std::io::Result<Result<usize, (usize, Verified)>> {
    let mut records = 0;
    let mut before: Option<(String, String)> = None;
    for (i, path) in paths.iter().enumerate() {
        let (verified, last) = verify_from(path, before.as_ref())?;
        match verified {
            Verified::Intact { records: n } => records += n,
            broken => return Ok(Err((i, broken))),
        }
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        before = Some((name.into_owned(), last));
    }
    Ok(Ok(records))
}

/// `verify`, with the name and last hash of the file before (`None`: `path` may start a chain
/// or continue one not given); also returns the last hash.
fn verify_from(
    path: &Path,
    before: Option<&(String, String)>,
) -> std::io::Result<(Verified, String)> {
    let file = File::open(path)?;
    let mut prev = GENESIS.to_owned();
    let mut records = 0;
    for (i, line) in BufReader::new(file).split(b'\n').enumerate() {
        let line = line?;
        if i == 0 {
            let continued = rotate::continues_from(&line);
            match (&continued, before) {
                (Some((_, hash)), None) => prev = hash.clone(),
                (Some((file, hash)), Some((name, last))) if file == name && hash == last => {
                    prev = hash.clone()
                }
                (Some((file, _)), Some((name, _))) => {
                    let reason = format!(
                        "continues {file}, not the file before it in the set ({name}), or not \
                         from its last record"
                    );
                    return Ok((Verified::Broken { line: 1, reason }, prev));
                }
                (None, Some((name, _))) => {
                    let reason = format!("starts a new chain instead of continuing {name}");
                    return Ok((Verified::Broken { line: 1, reason }, prev));
                }
                (None, None) => {}
            }
        }
        match follows(&line, &prev) {
            Ok(hash) => prev = hash,
            Err(reason) => {
                let broken = Verified::Broken {
                    line: i + 1,
                    reason: reason.to_owned(),
                };
                return Ok((broken, prev));
            }
        }
        records += 1;
    }
    Ok((Verified::Intact { records }, prev))
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
mod tests;
