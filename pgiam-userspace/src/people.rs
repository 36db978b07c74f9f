//! People: who is logged in on this host through `pgiam login`, bound to the kernel identity
//! of their login session, and how their logins live and end (refresh, expiry, logout, the
//! issuer's refusal). A login's end ends the sessions that carry it.
//!
//! A login is bound to a uid and a cgroup, both read from the kernel for the `pgiam login`
//! process (SO_PEERCRED on the login socket, then its cgroup): a connection carries the person
//! only if the kernel recorded the same uid and cgroup for it. On a systemd host every login
//! (ssh, console) has its own `session-N.scope`, which its processes cannot leave for another
//! session's; a process in the root cgroup has no login session to bind, and is refused.

pub mod client;
mod kept;
pub mod oidc;
pub mod person;
pub mod socket;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tracing::{info, warn};

use crate::admin::registry::{Order, Registry};
use crate::audit::AuditLog;
use crate::config::Issuer;
use crate::settings::Settings;
pub use person::{Person, Via};

/// What a login is bound to: the uid and cgroup the kernel reports for the `pgiam login`
/// process, and so must report for a connection that carries the person.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Binding {
    pub uid: u32,
    pub cgroup: String,
}

impl std::fmt::Display for Binding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "uid {} in {}", self.uid, self.cgroup)
    }
}

/// One live login.
struct Login {
    person: Arc<Person>,
    id_token: String,
    refresh_token: Option<String>,
    /// When to refresh next (Unix seconds); `None`: the login ends at the token's expiry.
    refresh_at: Option<i64>,
    /// When to ask the issuer next whether the refresh token is still active; `None`: never.
    introspect_at: Option<i64>,
    /// A refresh or an introspection is under way: never both at once, for a refresh
    /// consumes the token an introspection asks about (a rotated token reads as inactive).
    busy: bool,
}

/// The logins in force, and the providers they came from.
#[derive(Default)]
pub struct People {
    pub providers: oidc::Providers,
    /// Where logins are kept across restarts (`state_dir/logins.json`); `None`: in memory only.
    store: Option<std::path::PathBuf>,
    /// Counts the changes of a login's person (a new login of the same person, a refresh): a
    /// live session looks its person up again only when this has moved.
    renewed: std::sync::atomic::AtomicU64,
    logins: Mutex<HashMap<Binding, Login>>,
}

pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// When a token that expires at `expires_at` is refreshed: three quarters into what is left
/// of its life, and at least 5 s before its end.
fn refresh_time(now: i64, expires_at: i64) -> i64 {
    let left = (expires_at - now).max(0);
    (now + left * 3 / 4).min(expires_at - 5).max(now)
}

/// Why a login ended, for the audit record and the client's FATAL.
#[derive(Debug, Clone)]
pub enum Ended {
    LoggedOut,
    Expired,
    Refused(String),
    IssuerRemoved,
    Replaced,
    /// The issuer's introspection says the login's grant is no longer active.
    Revoked,
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::LoggedOut => f.write_str("the person logged out"),
            Ended::Expired => f.write_str("the login's token expired"),
            Ended::Refused(why) => write!(f, "the issuer refused to renew the login ({why})"),
            Ended::IssuerRemoved => f.write_str("the issuer is no longer configured"),
            Ended::Replaced => f.write_str("another person logged in in the same login session"),
            Ended::Revoked => f.write_str("the issuer revoked the login"),
        }
    }
}

impl People {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Binding, Login>> {
        self.logins.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The person logged in for a connection the kernel attributes to `uid` in `cgroup`.
    pub fn bound(&self, uid: u32, cgroup: Option<&str>) -> Option<Arc<Person>> {
        let cgroup = cgroup?;
        let logins = self.lock();
        if logins.is_empty() {
            return None;
        }
        logins
            .get(&Binding {
                uid,
                cgroup: cgroup.to_owned(),
            })
            .map(|l| l.person.clone())
    }

    /// The count of persons renewed so far (see [`People::renewed_person`]).
    pub fn renewals(&self) -> u64 {
        self.renewed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The person a session that logged in carrying `identity`'s person carries now, if a
    /// renewal changed them (see [`People::renewed_person`]).
    pub fn renewed_for(&self, identity: &crate::identity::Identity) -> Option<Arc<Person>> {
        let person = identity.person.as_ref()?;
        if person.via != Via::Login || self.renewals() == 0 {
            return None;
        }
        self.renewed_person(identity.uid, identity.cgroup.as_deref()?, person)
    }

    /// The names a session that logged in as `identity` answers to now: its identity's, with
    /// its person as their login is now (see [`People::renewed_for`]).
    pub fn principals_now(&self, identity: &crate::identity::Identity) -> Vec<String> {
        match self.renewed_for(identity) {
            Some(now) => with_person(identity, now).principals(),
            None => identity.principals(),
        }
    }

    /// The person now logged in for the login `person` came from (same binding, same login
    /// id), if that is another version of them: a step-up to a second factor, or a refresh.
    pub fn renewed_person(&self, uid: u32, cgroup: &str, person: &Person) -> Option<Arc<Person>> {
        let login = person.login.as_ref()?;
        let now = self.bound(uid, Some(cgroup))?;
        (now.login.as_ref() == Some(login) && *now != *person).then_some(now)
    }

    fn renew(&self) {
        self.renewed
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// The login bound to `binding`, and its ID token.
    pub fn whoami(&self, binding: &Binding) -> Option<(Arc<Person>, String)> {
        self.lock()
            .get(binding)
            .map(|l| (l.person.clone(), l.id_token.clone()))
    }

    /// Binds a verified person to `binding`. A new login of the same person keeps the login
    /// id, so their live sessions go on with the new tokens (a step-up to a second factor
    /// does not end them); a login of another person replaces the one before it, whose
    /// sessions end. (The caller ends those, and has the same person's sessions follow:
    /// [`Service::login_renewed`].)
    pub fn log_in(
        &self,
        binding: Binding,
        issuer: &Issuer,
        claims: oidc::Claims,
        id_token: String,
        refresh_token: Option<String>,
    ) -> (Arc<Person>, Option<Arc<Person>>) {
        let mut logins = self.lock();
        let previous = logins.get(&binding).map(|l| l.person.clone());
        let same_person = previous
            .as_ref()
            .filter(|p| p.issuer == claims.issuer && p.subject == claims.subject);
        let login_id = match same_person {
            Some(p) => p.login.clone(),
            None => Some(new_login_id()),
        };
        let person = Arc::new(Person::new(issuer, claims, Via::Login, login_id));
        logins.insert(
            binding,
            Login::new(person.clone(), issuer, id_token, refresh_token),
        );
        drop(logins);
        self.persist();
        let replaced = if person.login == previous.as_ref().and_then(|p| p.login.clone()) {
            None
        } else {
            previous
        };
        (person, replaced)
    }

    /// Ends the login bound to `binding`: its person and refresh token, if there was one.
    pub fn log_out(&self, binding: &Binding) -> Option<(Arc<Person>, Option<String>)> {
        let ended = self
            .lock()
            .remove(binding)
            .map(|l| (l.person, l.refresh_token));
        if ended.is_some() {
            self.persist();
        }
        ended
    }

    /// Whether the login bound to `binding` is kept alive by refreshes.
    pub fn refreshes(&self, binding: &Binding) -> bool {
        self.lock()
            .get(binding)
            .is_some_and(|l| l.refresh_at.is_some())
    }

    /// How many logins are in force.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Login {
    fn new(
        person: Arc<Person>,
        issuer: &Issuer,
        id_token: String,
        refresh_token: Option<String>,
    ) -> Login {
        let now = now_secs();
        let refresh_at = (issuer.refresh && refresh_token.is_some())
            .then(|| refresh_time(now, person.expires_at));
        let introspect_at = refresh_at.and(introspect_time(issuer, now));
        Login {
            person,
            id_token,
            refresh_token,
            refresh_at,
            introspect_at,
            busy: false,
        }
    }
}

/// When a login is next asked about, if its issuer is asked at all.
fn introspect_time(issuer: &Issuer, now: i64) -> Option<i64> {
    (issuer.introspect_secs > 0).then(|| now + issuer.introspect_secs as i64)
}

fn new_login_id() -> String {
    use rand::Rng;
    format!("{:016x}", rand::thread_rng().gen::<u64>())
}

/// Ends the sessions that carry `person`'s login (or, for a token given as password, that
/// token): FATAL 57P01 and a `session_revoked` record each.
pub fn end_sessions(registry: &Registry, person: &Person, why: &Ended) -> Vec<String> {
    let order = Order::LoginEnded {
        person: Some(person.principal()),
        why: why.to_string(),
    };
    registry.order(
        |live| {
            live.facts.identity.person.as_ref().is_some_and(|p| {
                p.login.is_some() && p.login == person.login
                    || p.login.is_none() && p.as_ref() == person
            })
        },
        &order,
    )
}

/// `identity` carrying `person` (another version of the person it logged in with).
pub fn with_person(
    identity: &crate::identity::Identity,
    person: Arc<Person>,
) -> crate::identity::Identity {
    crate::identity::Identity {
        person: Some(person),
        ..identity.clone()
    }
}

/// Whether a live session carries `person`'s login (its person is another version of them).
fn carries_login(live: &crate::admin::registry::Live, person: &Person) -> bool {
    live.facts
        .identity
        .person
        .as_ref()
        .is_some_and(|p| p.login.is_some() && p.login == person.login)
}

/// What logins act on: the login socket's requests and the watch that keeps logins alive
/// and ends them.
pub struct Service {
    pub people: Arc<People>,
    pub settings: Arc<Settings>,
    pub registry: Arc<Registry>,
    pub revocations: Arc<crate::admin::revocations::Revocations>,
    pub audit: Option<AuditLog>,
}

impl Service {
    /// Takes back the logins kept before a restart, then refreshes logins and ends those past
    /// their time, every second, for ever.
    pub async fn watch(self: Arc<Self>) {
        self.restore().await;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            self.tick().await;
        }
    }

    /// A login was renewed (a refresh, or a new login of the same person) and may carry less
    /// than before: its sessions end if a name the renewed person carries is revoked (a group
    /// `pgiam revoke` named), or if their mapping no longer holds for the renewed person (a
    /// group the issuer took away takes the role it mapped to with it, as a reload that drops
    /// the mapping does). The others, busy or idle, are woken to follow the person and ask
    /// the policy again whether they may connect.
    pub fn login_renewed(&self, binding: &Binding, person: &Arc<Person>) {
        let names = person.principals();
        let (order, ended) = match self.revocations.find(names.iter().map(String::as_str)) {
            Some(r) => {
                let order = Order::Revoke {
                    by: r.by,
                    principal: r.principal,
                    reason: r.reason,
                };
                let ended = self
                    .registry
                    .order(|live| carries_login(live, person), &order);
                (order, ended)
            }
            None => {
                let config = &self.settings.current().config;
                let order = Order::LoginEnded {
                    person: Some(person.principal()),
                    why: "the renewed login no longer maps to the session's role".into(),
                };
                let ended = self.registry.order(
                    |live| {
                        let f = &live.facts;
                        if !carries_login(live, person) {
                            return false;
                        }
                        let renewed = with_person(&f.identity, person.clone()).principals();
                        !config
                            .find_mapping(&renewed, &f.database)
                            .is_some_and(|m| m.principal == *f.principal && m.role == *f.role)
                    },
                    &order,
                );
                (order, ended)
            }
        };
        if !ended.is_empty() {
            info!(%binding, person = %person.principal(), order = order.kind(), sessions = ?ended, "sessions the renewed login no longer covers are ended");
        }
        // Counted only now: a session that sees the renewal and follows the person has had
        // its order given first, and looks at it first (no statement goes out under a role
        // the renewed login no longer maps to).
        self.people.renew();
        self.registry.wake_all();
    }

    async fn tick(self: &Arc<Self>) {
        let now = now_secs();
        let issuers = self.settings.current().config.issuers.clone();
        let mut ending = Vec::new();
        let mut refreshing = Vec::new();
        let mut asking = Vec::new();
        {
            let mut logins = self.people.lock();
            logins.retain(|binding, login| {
                let p = &login.person;
                let issuer = p.issuer_in(&issuers);
                let why = match issuer {
                    None => Some(Ended::IssuerRemoved),
                    Some(_) if p.expires_at <= now => Some(Ended::Expired),
                    _ => None,
                };
                if let Some(why) = why {
                    ending.push((binding.clone(), p.clone(), why));
                    return false;
                }
                let (Some(token), Some(issuer)) = (&login.refresh_token, issuer) else {
                    return true;
                };
                if login.busy {
                    return true;
                }
                let due = |at: Option<i64>| at.is_some_and(|at| at <= now);
                if due(login.refresh_at) && issuer.refresh {
                    login.busy = true;
                    refreshing.push((binding.clone(), issuer.clone(), token.clone()));
                } else if due(login.introspect_at) {
                    login.busy = true;
                    asking.push((binding.clone(), issuer.clone(), token.clone()));
                }
                true
            });
        }
        if !ending.is_empty() {
            self.people.persist();
        }
        for (binding, person, why) in ending {
            self.ended(&binding, &person, why).await;
        }
        for (binding, issuer, token) in refreshing {
            let watch = self.clone();
            tokio::spawn(async move { watch.refresh(binding, issuer, token).await });
        }
        for (binding, issuer, token) in asking {
            let watch = self.clone();
            tokio::spawn(async move { watch.introspect(binding, issuer, token).await });
        }
        // Sessions that came with a token as their password last as long as that token.
        let expired = self.registry.order(
            |live| {
                live.facts
                    .identity
                    .person
                    .as_ref()
                    .is_some_and(|p| p.via == Via::Password && p.expires_at <= now)
            },
            &Order::LoginEnded {
                person: None,
                why: "the token the session logged in with expired".into(),
            },
        );
        if !expired.is_empty() {
            info!(sessions = ?expired, "sessions whose password token expired are ended");
        }
    }

    async fn refresh(&self, binding: Binding, issuer: Issuer, token: String) {
        let outcome = self.people.providers.refresh(&issuer, &token).await;
        let now = now_secs();
        let renewed = match outcome {
            Ok(tokens) => self.renewed(&issuer, tokens, now).await,
            Err(oidc::TokenEndpoint::Unreachable(e)) => {
                // Tried again in a few seconds, until the token itself expires.
                warn!(%binding, issuer = %issuer.issuer, "login refresh: {e}");
                if let Some(login) = self.people.lock().get_mut(&binding) {
                    login.busy = false;
                    login.refresh_at = Some(now + 5);
                }
                return;
            }
            Err(refused) => Err(refused.to_string()),
        };
        let refused = {
            let mut logins = self.people.lock();
            let Some(login) = logins.get_mut(&binding) else {
                return;
            };
            login.busy = false;
            match renewed {
                Ok((mut person, id_token, refresh_token))
                    if person.subject == login.person.subject =>
                {
                    person.login = login.person.login.clone();
                    info!(%binding, person = %person.principal(), expires_at = person.expires_at, "login refreshed");
                    login.refresh_at = Some(refresh_time(now, person.expires_at));
                    let person = Arc::new(person);
                    login.person = person.clone();
                    if let Some(id) = id_token {
                        login.id_token = id;
                    }
                    if let Some(r) = refresh_token {
                        login.refresh_token = Some(r);
                    }
                    drop(logins);
                    self.people.persist();
                    self.login_renewed(&binding, &person);
                    return;
                }
                Ok(_) => "the refreshed ID token names another subject".to_owned(),
                Err(why) => why,
            }
        };
        warn!(%binding, "login refresh refused: {refused}");
        self.end_login(&binding, Ended::Refused(refused)).await;
    }

    /// Asks the issuer whether the login's refresh token is still active; ends the login if
    /// it is not. No answer, or no endpoint, leaves the login as it is.
    async fn introspect(&self, binding: Binding, issuer: Issuer, token: String) {
        let answer = self.people.providers.introspect(&issuer, &token).await;
        let now = now_secs();
        let revoked = {
            let mut logins = self.people.lock();
            let Some(login) = logins.get_mut(&binding) else {
                return;
            };
            login.busy = false;
            // The question was about a token the login no longer holds (a new login in the
            // same session): its answer says nothing about this one.
            if login.refresh_token.as_deref() != Some(token.as_str()) {
                return;
            }
            match &answer {
                Ok(Some(false)) => logins.remove(&binding).map(|l| l.person),
                // Endpoints rarely appear later; asked again in an hour all the same.
                Ok(None) => {
                    login.introspect_at = Some(now + 3600);
                    None
                }
                Ok(Some(true)) | Err(_) => {
                    login.introspect_at = introspect_time(&issuer, now);
                    None
                }
            }
        };
        if let Err(e) = &answer {
            warn!(%binding, issuer = %issuer.issuer, "introspection: no answer: {e}");
        }
        if let Some(person) = revoked {
            self.people.persist();
            warn!(%binding, issuer = %issuer.issuer, "introspection: the issuer no longer holds the login active");
            self.ended(&binding, &person, Ended::Revoked).await;
        }
    }

    /// A refresh's answer as the login's new person, ID token and refresh token.
    async fn renewed(
        &self,
        issuer: &Issuer,
        tokens: oidc::Tokens,
        now: i64,
    ) -> Result<(Person, Option<String>, Option<String>), String> {
        let person = match &tokens.id_token {
            Some(id) => {
                let (_, claims) = self
                    .people
                    .providers
                    .verify(std::slice::from_ref(issuer), id)
                    .await
                    .map_err(|e| format!("the refreshed ID token: {e}"))?;
                Person::new(issuer, claims, Via::Login, None)
            }
            None => return Err("the refresh answer carries no ID token".into()),
        };
        if person.expires_at <= now {
            return Err("the refreshed ID token has already expired".into());
        }
        Ok((person, tokens.id_token, tokens.refresh_token))
    }

    pub async fn end_login(&self, binding: &Binding, why: Ended) {
        if let Some((person, _)) = self.people.log_out(binding) {
            self.ended(binding, &person, why).await;
        }
    }

    /// A login has ended: its sessions end, and the audit log says why.
    pub async fn ended(&self, binding: &Binding, person: &Person, why: Ended) {
        let sessions = end_sessions(&self.registry, person, &why);
        self.ended_record(binding, person, why, &sessions).await;
    }

    /// The log line and audit record of a login that ended, with the sessions it ended.
    pub async fn ended_record(
        &self,
        binding: &Binding,
        person: &Person,
        why: Ended,
        sessions: &[String],
    ) {
        info!(%binding, person = %person.principal(), sessions = sessions.len(), "login ended: {why}");
        record(
            self.audit.as_ref(),
            "login_ended",
            person,
            binding,
            Some(&why.to_string()),
            sessions,
        )
        .await;
    }
}

/// Writes a login's record (`login`, `logout`, `login_ended`); a log that fails is logged,
/// not fatal: the login or its end stands either way.
pub async fn record(
    audit: Option<&AuditLog>,
    kind: &'static str,
    person: &Person,
    binding: &Binding,
    why: Option<&str>,
    sessions: &[String],
) {
    let Some(audit) = audit else {
        return;
    };
    let r = crate::audit_fields! {
        "id" => audit.next_id(),
        "kind" => kind,
        "person" => person,
        "principal" => person.principal(),
        "uid" => binding.uid,
        "cgroup" => binding.cgroup,
        "reason" => why,
        "sessions" => sessions,
    };
    if let Err(e) = audit.record(r).await {
        warn!("the audit record of a {kind} was not written: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_refreshed_before_it_expires() {
        assert_eq!(refresh_time(1000, 1100), 1075);
        assert_eq!(refresh_time(1000, 1008), 1003);
        // Already past: now.
        assert_eq!(refresh_time(1000, 990), 1000);
    }
}
