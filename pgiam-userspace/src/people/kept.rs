//! Logins kept across restarts of pgiam: `state_dir/logins.json` (mode 0600: it holds ID and
//! refresh tokens; pgiam's state directory is root's), replaced whole at every change of the
//! logins (a login, a refresh, a logout, an end), so a logout is never undone by a restart. At
//! start each kept login is taken back only as a fresh one would be: its issuer still
//! configured (alias and URL), its ID token verified again — or, expired, renewed with its
//! refresh token and the new one verified. Anything else is dropped (the person logs in again).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::oidc::TokenError;
use super::{now_secs, record, Binding, Login, People, Person, Service, Via};
use crate::config::Issuer;

/// One login as kept on disk.
#[derive(Serialize, Deserialize)]
struct Kept {
    uid: u32,
    cgroup: String,
    alias: String,
    issuer: String,
    login: Option<String>,
    id_token: String,
    refresh_token: Option<String>,
}

impl People {
    /// Logins are kept in `dir/logins.json`.
    pub fn kept_in(dir: &std::path::Path) -> People {
        People {
            store: Some(dir.join("logins.json")),
            ..People::default()
        }
    }

    /// Writes the logins in force to the store. A failure is logged: the logins stand, but a
    /// restart would forget them (or, after a logout, bring back one that ended).
    pub(super) fn persist(&self) {
        let Some(path) = &self.store else {
            return;
        };
        let kept: Vec<Kept> = self
            .lock()
            .iter()
            .map(|(b, l)| Kept {
                uid: b.uid,
                cgroup: b.cgroup.clone(),
                alias: l.person.alias.clone(),
                issuer: l.person.issuer.clone(),
                login: l.person.login.clone(),
                id_token: l.id_token.clone(),
                refresh_token: l.refresh_token.clone(),
            })
            .collect();
        let json = serde_json::to_vec(&kept).expect("logins serialize");
        if let Err(e) = crate::statefile::replace(path, &json, 0o600) {
            tracing::error!(path = %path.display(), "the logins were not kept: {e}");
        }
    }

    fn read_kept(&self) -> Vec<Kept> {
        let Some(path) = &self.store else {
            return Vec::new();
        };
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                warn!(path = %path.display(), "kept logins cannot be read, none taken back: {e}");
                Vec::new()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                warn!(path = %path.display(), "kept logins cannot be read, none taken back: {e}");
                Vec::new()
            }
        }
    }
}

impl Service {
    /// A kept login as a login again: its person, ID token and refresh token, the ID token
    /// verified again — or, expired, renewed with the refresh token as a refresh renews it.
    async fn take_back(
        &self,
        issuer: &Issuer,
        k: Kept,
    ) -> Result<(Person, String, Option<String>), String> {
        let providers = &self.people.providers;
        match providers
            .verify(std::slice::from_ref(issuer), &k.id_token)
            .await
        {
            // (Verification allows some clock skew: a token past its time is renewed instead.)
            Ok((_, claims)) if claims.expires_at > now_secs() => {
                let person = Person::new(issuer, claims, Via::Login, k.login);
                return Ok((person, k.id_token, k.refresh_token));
            }
            Ok(_) | Err(TokenError::Expired) => {}
            Err(e) => return Err(format!("its ID token: {e}")),
        }
        let token = match (&k.refresh_token, issuer.refresh) {
            (Some(token), true) => token,
            _ => return Err("its ID token expired and it has no refresh".into()),
        };
        let tokens = providers
            .refresh(issuer, token)
            .await
            .map_err(|e| format!("its refresh failed: {e}"))?;
        let (mut person, id_token, refresh_token) =
            self.renewed(issuer, tokens, now_secs()).await?;
        person.login = k.login;
        let id_token = id_token.ok_or("the refresh answered no ID token")?;
        Ok((person, id_token, refresh_token.or(k.refresh_token)))
    }

    /// Takes back the logins kept before a restart (see the module's doc).
    pub(super) async fn restore(&self) {
        let kept = self.people.read_kept();
        if kept.is_empty() {
            return;
        }
        let issuers = self.settings.current().config.issuers.clone();
        let (mut taken, mut dropped) = (0, 0);
        for k in kept {
            let binding = Binding {
                uid: k.uid,
                cgroup: k.cgroup.clone(),
            };
            let Some(issuer) = issuers
                .iter()
                .find(|i| i.alias == k.alias && i.issuer == k.issuer)
            else {
                warn!(%binding, issuer = %k.issuer, "kept login dropped: its issuer is no longer configured");
                dropped += 1;
                continue;
            };
            let (person, id_token, refresh_token) = match self.take_back(issuer, k).await {
                Ok(taken) => taken,
                Err(why) => {
                    warn!(%binding, "kept login dropped: {why}");
                    dropped += 1;
                    continue;
                }
            };
            let person = Arc::new(person);
            // A login made since pgiam started is newer than the kept one.
            {
                let mut logins = self.people.lock();
                if logins.contains_key(&binding) {
                    continue;
                }
                logins.insert(
                    binding.clone(),
                    Login::new(person.clone(), issuer, id_token, refresh_token),
                );
            }
            record(
                self.audit.as_ref(),
                "login_restored",
                &person,
                &binding,
                None,
                &[],
            )
            .await;
            taken += 1;
        }
        // What was dropped is gone from the store too, and renewed tokens are kept.
        self.people.persist();
        info!(taken, dropped, "logins kept before the restart taken back");
    }
}
