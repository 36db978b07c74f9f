//! The catalog snapshots in use, one per (server, database), shared by every session of that
//! database: read over a short connection of pgiam's own (the session's login role,
//! `application_name=pgiam-catalog`) when a session first needs one, again once it is older
//! than `policy.catalog_max_age_secs`, and again after a statement pgiam forwarded may have
//! changed it (DDL). A read that fails is tried again a second later at the earliest;
//! meanwhile the last snapshot stands if it is only old (up to ten times the age limit: the
//! server may be at its connection limit) and nothing through pgiam changed the catalog since
//! it was read; otherwise statements that need the catalog are refused.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use super::{Snapshot, QUERY};
use crate::config::RoleCredentials;
use crate::upstream::{read_message, Upstream};
use crate::wire::{self, BackendMessage};

/// Which catalog: the server a session's backends connect to, and the database.
pub type Key = (Option<SocketAddr>, String);

/// Where a session's catalog is read from: its database on its server, through a login of
/// its own role. (A value: the sessions of one login share one.)
#[derive(PartialEq, Eq, Hash)]
pub struct Source {
    pub key: Key,
    pub login: Arc<crate::upstream::LoginKey>,
}

/// A snapshot, or why there is none.
pub type Read = Result<Arc<Snapshot>, Arc<str>>;

/// How long a failed read keeps the next one away.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// How long one read may take, login included.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct Catalogs {
    entries: Mutex<HashMap<Key, Arc<Entry>>>,
}

#[derive(Default)]
struct Entry {
    state: Mutex<State>,
    /// One read at a time per catalog: sessions that need it meanwhile wait for its result.
    reading: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    /// The last snapshot, when the read that made it began, and how many invalidations there
    /// had been by then.
    snapshot: Option<(Arc<Snapshot>, Instant, u64)>,
    /// Statements forwarded that may have changed the catalog, counted. (A count, not a flag a
    /// read clears: a read abandoned half-way, its session gone, must leave it standing.)
    invalidations: u64,
    failed: Option<(Arc<str>, Instant)>,
}

impl State {
    /// The snapshot, unless something forwarded since its read began may have changed the
    /// catalog.
    fn current(&self) -> Option<&(Arc<Snapshot>, Instant, u64)> {
        self.snapshot
            .as_ref()
            .filter(|(_, _, seen)| *seen == self.invalidations)
    }

    fn usable(&self, max_age: Duration) -> Option<Read> {
        match (self.current(), &self.failed) {
            (Some((s, at, _)), _) if at.elapsed() < max_age => Ok(s.clone()).into(),
            (_, Some((why, at))) if at.elapsed() < RETRY_AFTER => {
                Some(self.after_failure(why, max_age))
            }
            _ => None,
        }
    }

    /// What a failed read leaves: the last snapshot while it is only old, up to
    /// [`GRACE`] × `max_age` (the server may be at its connection limit; nothing through
    /// pgiam has changed the catalog since), else the failure.
    fn after_failure(&self, why: &Arc<str>, max_age: Duration) -> Read {
        match self.current() {
            Some((s, at, _)) if at.elapsed() < max_age * GRACE => Ok(s.clone()),
            _ => Err(why.clone()),
        }
    }
}

/// How many times its age limit an old snapshot stands in for one that cannot be read.
const GRACE: u32 = 10;

impl Catalogs {
    fn entry(&self, key: &Key) -> Arc<Entry> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        match entries.get(key) {
            Some(e) => e.clone(),
            None => entries.entry(key.clone()).or_default().clone(),
        }
    }

    /// The snapshot of `key`'s catalog if the one held may be used now (or the failure that
    /// keeps the next read away): what every batch of messages costs.
    pub fn usable(&self, key: &Key, max_age: Duration) -> Option<Read> {
        let entry = self
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)?
            .clone();
        let usable = entry.lock().usable(max_age);
        usable
    }

    /// The snapshot of `key`'s catalog, read by `read` if the one held is too old, stale or
    /// missing.
    pub async fn get<F, Fut>(&self, key: &Key, max_age: Duration, read: F) -> Read
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Snapshot, String>>,
    {
        let entry = self.entry(key);
        if let Some(r) = entry.lock().usable(max_age) {
            return r;
        }
        let _reading = entry.reading.lock().await;
        // Another session may have read it while this one waited.
        let began = {
            let state = entry.lock();
            if let Some(r) = state.usable(max_age) {
                return r;
            }
            // A change forwarded from now on makes this read stale in its turn.
            (Instant::now(), state.invalidations)
        };
        let outcome = match tokio::time::timeout(READ_TIMEOUT, read()).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {}s", READ_TIMEOUT.as_secs())),
        };
        let mut state = entry.lock();
        match outcome {
            Ok(snapshot) => {
                let snapshot = Arc::new(snapshot);
                state.snapshot = Some((snapshot.clone(), began.0, began.1));
                state.failed = None;
                Ok(snapshot)
            }
            Err(why) => {
                let why: Arc<str> = Arc::from(why);
                state.failed = Some((why.clone(), Instant::now()));
                let read = state.after_failure(&why, max_age);
                match &read {
                    Ok(_) => {
                        tracing::warn!(server = ?key.0, database = %key.1, "the server's catalog was not read ({why}): its last snapshot stands")
                    }
                    Err(_) => {
                        tracing::warn!(server = ?key.0, database = %key.1, "the server's catalog was not read: {why}")
                    }
                }
                read
            }
        }
    }

    /// A statement forwarded to `key`'s database may have changed its operators or casts:
    /// the next session that needs the catalog reads it again.
    pub fn invalidate(&self, key: &Key) {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = entries.get(key) {
            e.lock().invalidations += 1;
        }
    }
}

impl Entry {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Reads a snapshot of `database`'s catalog: logs in as `role` (its own short connection),
/// runs [`QUERY`], and says goodbye.
pub async fn read(
    upstream: &Upstream,
    role: &str,
    credentials: &RoleCredentials,
    database: &str,
    target: Option<SocketAddr>,
    max_message_size: usize,
) -> Result<Snapshot, String> {
    let params = [
        ("database".to_owned(), database.to_owned()),
        ("application_name".to_owned(), "pgiam-catalog".to_owned()),
    ];
    let mut c = upstream
        .login(role, credentials, &params, target)
        .await
        .map_err(|e| format!("login as {role}: {e}"))?;
    let mut out = BytesMut::new();
    postgres_protocol::message::frontend::query(QUERY, &mut out).map_err(|e| e.to_string())?;
    c.stream.write_all(&out).await.map_err(|e| e.to_string())?;
    c.stream.flush().await.map_err(|e| e.to_string())?;
    let mut buf = BytesMut::new();
    let mut rows: Vec<Vec<Option<String>>> = Vec::new();
    let mut error = None;
    loop {
        let (tag, body) = read_message(&mut c.stream, &mut buf, max_message_size)
            .await
            .map_err(|e| e.to_string())?;
        match wire::decode_backend(tag, &body).map_err(|e| e.to_string())? {
            BackendMessage::DataRow { .. } => {
                let values = wire::data_row_values(&body).map_err(|e| e.to_string())?;
                rows.push(
                    values
                        .into_iter()
                        .map(|v| v.map(|b| String::from_utf8_lossy(b).into_owned()))
                        .collect(),
                );
            }
            BackendMessage::ErrorResponse(fields) => {
                error = Some(format!(
                    "{} {}",
                    fields.get_str(b'C').unwrap_or("?"),
                    fields.get_str(b'M').unwrap_or("")
                ));
            }
            BackendMessage::ReadyForQuery(_) => break,
            _ => {}
        }
    }
    let _ = c.stream.write_all(&wire::TERMINATE).await;
    let _ = c.stream.flush().await;
    if let Some(e) = error {
        return Err(format!("the catalog query failed: {e}"));
    }
    Snapshot::from_rows(
        rows.iter()
            .map(|r| r.iter().map(Option::as_deref).collect::<Vec<_>>()),
    )
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_snapshot_is_read_once_until_it_is_stale_or_old() {
        let catalogs = Catalogs::default();
        let key: Key = (None, "app".into());
        let reads = std::sync::atomic::AtomicUsize::new(0);
        let read = || async {
            reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(Snapshot::default())
        };
        let hour = Duration::from_secs(3600);
        catalogs.get(&key, hour, read).await.unwrap();
        catalogs.get(&key, hour, read).await.unwrap();
        assert_eq!(reads.load(std::sync::atomic::Ordering::Relaxed), 1);
        catalogs.invalidate(&key);
        catalogs.get(&key, hour, read).await.unwrap();
        assert_eq!(reads.load(std::sync::atomic::Ordering::Relaxed), 2);
        catalogs.get(&key, Duration::ZERO, read).await.unwrap();
        assert_eq!(reads.load(std::sync::atomic::Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn an_old_snapshot_stands_for_one_that_cannot_be_read_unless_pgiam_changed_the_catalog() {
        let catalogs = Catalogs::default();
        let key: Key = (None, "app".into());
        let refused = || async { Err("too many clients".to_owned()) };
        catalogs
            .get(&key, Duration::from_secs(3600), || async {
                Ok(Snapshot::default())
            })
            .await
            .unwrap();
        // Older than its limit (but not ten times), and not read again: the old one stands.
        std::thread::sleep(Duration::from_millis(300));
        let aged = Duration::from_millis(200);
        assert!(catalogs.get(&key, aged, refused).await.is_ok());
        assert!(catalogs.usable(&key, aged).unwrap().is_ok());
        // DDL went through pgiam since: the old one does not stand.
        catalogs.invalidate(&key);
        std::thread::sleep(RETRY_AFTER);
        assert_eq!(
            catalogs
                .get(&key, aged, refused)
                .await
                .unwrap_err()
                .as_ref(),
            "too many clients"
        );
        assert!(catalogs.usable(&key, aged).unwrap().is_err());
    }

    /// Between a change forwarded and the read after it, the old snapshot is never handed
    /// out: not while another session's read is under way, nor after that session went away
    /// half-way through it.
    #[tokio::test]
    async fn after_a_change_the_old_snapshot_is_gone_while_a_read_is_under_way_or_abandoned() {
        let catalogs = Catalogs::default();
        let key: Key = (None, "app".into());
        let hour = Duration::from_secs(3600);
        let fresh = || async { Ok(Snapshot::default()) };
        catalogs.get(&key, hour, fresh).await.unwrap();
        catalogs.invalidate(&key);
        let (done, wait) = tokio::sync::oneshot::channel::<()>();
        let reading = catalogs.get(&key, hour, || async {
            let _ = wait.await;
            Ok(Snapshot::default())
        });
        tokio::pin!(reading);
        let under_way = tokio::time::timeout(Duration::from_millis(50), &mut reading).await;
        assert!(under_way.is_err());
        assert!(
            catalogs.usable(&key, hour).is_none(),
            "the old snapshot, mid-read"
        );
        drop(done);
        assert!(reading.await.is_ok());
        assert!(catalogs.usable(&key, hour).is_some());
        // Abandoned: the session that began the read goes away before it ends.
        catalogs.invalidate(&key);
        let abandoned = catalogs.get(&key, hour, std::future::pending);
        assert!(tokio::time::timeout(Duration::from_millis(50), abandoned)
            .await
            .is_err());
        assert!(
            catalogs.usable(&key, hour).is_none(),
            "the old snapshot, abandoned"
        );
        let reads = std::sync::atomic::AtomicUsize::new(0);
        let counted = || async {
            reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(Snapshot::default())
        };
        catalogs.get(&key, hour, counted).await.unwrap();
        assert_eq!(reads.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_failed_read_is_an_error_until_one_succeeds() {
        let catalogs = Catalogs::default();
        let key: Key = (None, "app".into());
        let hour = Duration::from_secs(3600);
        let failed = catalogs
            .get(&key, hour, || async {
                Err("connection refused".to_owned())
            })
            .await;
        assert_eq!(failed.unwrap_err().as_ref(), "connection refused");
        // Within a second the failure stands without another try.
        let again = catalogs
            .get(&key, hour, || async { Ok(Snapshot::default()) })
            .await;
        assert!(again.is_err());
    }
}
