//! Principals an operator has revoked (`pgiam revoke`): refused at the connect decision, their
//! live sessions ended. Kept in `state_dir/revocations.json` so a restart does not lift them;
//! the file is replaced whole (written beside it, synced, renamed), never edited in place.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::registry::{unix_ms, Operator};

/// One revocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub principal: String,
    /// Unix milliseconds.
    pub since_ms: u64,
    /// Unix milliseconds it lapses at; `None`: until `pgiam unrevoke`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub by: Operator,
}

impl Revocation {
    pub fn in_force(&self, now_ms: u64) -> bool {
        self.until_ms.is_none_or(|until| now_ms < until)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RevocationsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a revocation list: {source}")]
    Format {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// The revocation list in force.
pub struct Revocations {
    path: PathBuf,
    entries: Mutex<BTreeMap<String, Revocation>>,
    /// Held while a change is saved: changes are saved one at a time, and a login reading
    /// `entries` never waits for a file to be synced.
    saving: Mutex<()>,
}

impl Revocations {
    /// Reads the list kept in `state_dir` (none yet: an empty list). A file that cannot be
    /// read is an error, not an empty list: starting without it would lift every revocation.
    pub fn load(state_dir: &Path) -> Result<Revocations, RevocationsError> {
        let path = state_dir.join("revocations.json");
        let entries = match std::fs::read(&path) {
            Ok(bytes) => {
                let list: Vec<Revocation> =
                    serde_json::from_slice(&bytes).map_err(|source| RevocationsError::Format {
                        path: path.clone(),
                        source,
                    })?;
                list.into_iter().map(|r| (r.principal.clone(), r)).collect()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(RevocationsError::Io { path, source }),
        };
        Ok(Revocations {
            path,
            entries: Mutex::new(entries),
            saving: Mutex::new(()),
        })
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Revocation>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The revocation in force that one of `principals` is under, if any.
    pub fn find<'a>(&self, principals: impl IntoIterator<Item = &'a str>) -> Option<Revocation> {
        let now = unix_ms(SystemTime::now());
        let entries = self.entries();
        principals
            .into_iter()
            .filter_map(|p| entries.get(p))
            .find(|r| r.in_force(now))
            .cloned()
    }

    /// Every revocation in force.
    pub fn list(&self) -> Vec<Revocation> {
        let now = unix_ms(SystemTime::now());
        self.entries()
            .values()
            .filter(|r| r.in_force(now))
            .cloned()
            .collect()
    }

    /// Adds (or replaces) a revocation and saves the list; on failure nothing changes.
    pub fn revoke(&self, revocation: Revocation) -> Result<(), RevocationsError> {
        let _saving = self.saving.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = self.entries().clone();
        next.insert(revocation.principal.clone(), revocation);
        self.save(&next)?;
        *self.entries() = next;
        Ok(())
    }

    /// Lifts a revocation; `Ok(None)`: there was none in force.
    pub fn unrevoke(&self, principal: &str) -> Result<Option<Revocation>, RevocationsError> {
        let _saving = self.saving.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = self.entries().clone();
        let now = unix_ms(SystemTime::now());
        let removed = next.remove(principal).filter(|r| r.in_force(now));
        // Lapsed ones go too, so the file does not grow for ever.
        next.retain(|_, r| r.in_force(now));
        self.save(&next)?;
        *self.entries() = next;
        Ok(removed)
    }

    fn save(&self, entries: &BTreeMap<String, Revocation>) -> Result<(), RevocationsError> {
        let list: Vec<&Revocation> = entries.values().collect();
        let json = serde_json::to_vec_pretty(&list).expect("revocations serialize");
        crate::statefile::replace(&self.path, &json, 0o644).map_err(|source| RevocationsError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> Operator {
        Operator {
            uid: 0,
            user: Some("root".into()),
            pid: None,
        }
    }

    #[test]
    fn a_revocation_survives_a_reload_and_lapses_at_its_time() {
        let dir = tempfile::tempdir().unwrap();
        let r = Revocations::load(dir.path()).unwrap();
        let now = unix_ms(SystemTime::now());
        r.revoke(Revocation {
            principal: "unit:a.service".into(),
            since_ms: now,
            until_ms: None,
            reason: Some("incident 42".into()),
            by: root(),
        })
        .unwrap();
        r.revoke(Revocation {
            principal: "uid:1000".into(),
            since_ms: now - 2000,
            until_ms: Some(now - 1000),
            reason: None,
            by: root(),
        })
        .unwrap();
        let again = Revocations::load(dir.path()).unwrap();
        let found = again.find(["uid:7", "unit:a.service"]).unwrap();
        assert_eq!(found.reason.as_deref(), Some("incident 42"));
        assert!(again.find(["uid:1000"]).is_none(), "lapsed");
        assert_eq!(again.list().len(), 1);
        assert_eq!(
            again
                .unrevoke("unit:a.service")
                .unwrap()
                .map(|r| r.principal),
            Some("unit:a.service".to_string())
        );
        assert!(again.unrevoke("unit:a.service").unwrap().is_none());
        assert!(Revocations::load(dir.path()).unwrap().list().is_empty());
    }

    #[test]
    fn an_unreadable_list_is_an_error_not_an_empty_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("revocations.json"), "{not json").unwrap();
        assert!(matches!(
            Revocations::load(dir.path()),
            Err(RevocationsError::Format { .. })
        ));
    }
}
