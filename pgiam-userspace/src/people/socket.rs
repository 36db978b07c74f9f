//! The login socket: where any local user runs `pgiam login`, `logout`, `whoami` and `token`.
//! Who is asking, and so what a login binds to, is the peer's uid (SO_PEERCRED) and that
//! process's cgroup, never anything the client says.
//!
//! One request per connection, a JSON line as on the admin socket. A login answers twice: a
//! `pending` line with what the person must open and enter, then the outcome once the
//! provider has their approval (or the client goes away, which abandons it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};

use super::{end_sessions, record, Binding, Ended, Service};
use crate::admin::protocol::{Answer, MAX_REQUEST};

/// A request on the login socket; `verb` names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verb", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Log in with the device flow of an issuer (its alias; optional with one issuer).
    Login {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        issuer: Option<String>,
    },
    /// End the caller's login and the sessions that carry it.
    Logout,
    /// The person the caller's login session carries.
    Whoami,
    /// The caller's current ID token (for tools that take it as their password).
    Token,
}

/// Serves the socket until the task is dropped.
pub async fn serve(listener: UnixListener, service: Arc<Service>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                warn!("login socket: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let service = service.clone();
        tokio::spawn(async move {
            let limit = Duration::from_secs(
                service
                    .settings
                    .current()
                    .config
                    .people
                    .login_timeout_secs
                    .saturating_add(30),
            );
            let _ = tokio::time::timeout(limit, serve_one(stream, &service)).await;
        });
    }
}

/// The uid and cgroup of the process at the other end, from the kernel.
fn caller(stream: &UnixStream) -> Result<Binding, String> {
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("cannot read the peer's credentials: {e}"))?;
    let pid = cred
        .pid()
        .ok_or("the kernel did not say which process is calling")?;
    let cgroup = crate::identity::read_cgroup_v2_path(pid)
        .map_err(|e| format!("cannot read the cgroup of pid {pid}: {e}"))?;
    // The pid is the one that connected; had it exited and the number been reused, /proc
    // would describe another process: it must still be one of the caller's uid.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("cannot read pid {pid}: {e}"))?;
    let real_uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u32>().ok());
    if real_uid != Some(cred.uid()) {
        return Err("the calling process is gone".into());
    }
    if cgroup == "/" {
        return Err(
            "no login session to bind to: the calling process is in the root cgroup (run \
             pgiam login from a login shell, whose systemd session scope is its own)"
                .into(),
        );
    }
    Ok(Binding {
        uid: cred.uid(),
        cgroup,
    })
}

async fn serve_one(stream: UnixStream, service: &Service) {
    let binding = caller(&stream);
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    let read = (&mut reader)
        .take(MAX_REQUEST as u64 + 1)
        .read_until(b'\n', &mut line)
        .await;
    let request = match (&binding, read) {
        (Err(e), _) => Err(e.clone()),
        (_, Err(e)) => Err(format!("reading the request: {e}")),
        (_, Ok(_)) if line.len() > MAX_REQUEST => Err("request too long".into()),
        (Ok(_), Ok(_)) => serde_json::from_slice::<Request>(line.trim_ascii())
            .map_err(|e| format!("not a valid request: {e}")),
    };
    let mut stream = reader.into_inner();
    let answer = match (binding, request) {
        (_, Err(e)) => Answer::error(e),
        (Ok(binding), Ok(request)) => handle(service, &mut stream, binding, request).await,
        (Err(e), _) => Answer::error(e),
    };
    let _ = stream.write_all(&answer.to_line()).await;
    let _ = stream.shutdown().await;
}

async fn handle(
    service: &Service,
    stream: &mut UnixStream,
    binding: Binding,
    request: Request,
) -> Answer {
    match request {
        Request::Login { issuer } => login(service, stream, binding, issuer).await,
        Request::Logout => match service.people.log_out(&binding) {
            None => Answer::error(format!("not logged in ({binding})")),
            Some((person, refresh_token)) => {
                let config = service.settings.current().config.clone();
                if let (Some(token), Some(issuer)) =
                    (refresh_token, person.issuer_in(&config.issuers))
                {
                    service.people.providers.revoke(issuer, &token).await;
                }
                let sessions = end_sessions(&service.registry, &person, &Ended::LoggedOut);
                record(
                    service.audit.as_ref(),
                    "logout",
                    &person,
                    &binding,
                    None,
                    &sessions,
                )
                .await;
                info!(%binding, person = %person.principal(), sessions = sessions.len(), "logout");
                Answer::ok(json!({ "person": person, "sessions": sessions }))
            }
        },
        Request::Whoami => match service.people.whoami(&binding) {
            None => Answer::error(format!("not logged in ({binding})")),
            Some((person, _)) => Answer::ok(json!({
                "person": person,
                "principals": person.principals(),
                "binding": binding,
            })),
        },
        Request::Token => match service.people.whoami(&binding) {
            None => Answer::error(format!("not logged in ({binding})")),
            Some((person, _)) if person.expires_at <= super::now_secs() => {
                Answer::error("the login's ID token has expired; run pgiam login again")
            }
            Some((person, token)) => Answer::ok(json!({
                "id_token": token,
                "expires_at": person.expires_at,
            })),
        },
    }
}

async fn login(
    service: &Service,
    stream: &mut UnixStream,
    binding: Binding,
    alias: Option<String>,
) -> Answer {
    let config = service.settings.current().config.clone();
    let issuer = match (&alias, config.issuers.as_slice()) {
        (_, []) => return Answer::error("no [[oidc]] issuer is configured"),
        (None, [one]) => one,
        (None, many) => {
            let names: Vec<&str> = many.iter().map(|i| i.alias.as_str()).collect();
            return Answer::error(format!(
                "several issuers are configured; choose one with --issuer: {}",
                names.join(", ")
            ));
        }
        (Some(a), all) => match all.iter().find(|i| &i.alias == a) {
            Some(i) => i,
            None => return Answer::error(format!("no [[oidc]] issuer has alias {a:?}")),
        },
    };
    let providers = &service.people.providers;
    let start = match providers.start_device(issuer).await {
        Ok(s) => s,
        Err(e) => return Answer::error(e.to_string()),
    };
    let pending = Answer::ok(json!({ "pending": start, "issuer": issuer.issuer }));
    if stream.write_all(&pending.to_line()).await.is_err() {
        return Answer::error("the client went away");
    }
    let deadline = Instant::now() + Duration::from_secs(config.people.login_timeout_secs);
    // The client holds the connection while the person approves; its going away (Ctrl-C)
    // abandons the login.
    let mut probe = [0u8; 1];
    let tokens = tokio::select! {
        t = providers.poll_device(issuer, &start, deadline) => t,
        _ = stream.read(&mut probe) => return Answer::error("the client went away"),
    };
    let tokens = match tokens {
        Ok(t) => t,
        Err(e) => return Answer::error(e),
    };
    let Some(id_token) = tokens.id_token else {
        return Answer::error(
            "the provider answered without an ID token (is \"openid\" in the scopes?)",
        );
    };
    let claims = match providers
        .verify(std::slice::from_ref(issuer), &id_token)
        .await
    {
        Ok((_, c)) => c,
        Err(e) => return Answer::error(format!("the provider's ID token was not accepted: {e}")),
    };
    let (person, replaced) = service.people.log_in(
        binding.clone(),
        issuer,
        claims,
        id_token,
        tokens.refresh_token.filter(|_| issuer.refresh),
    );
    match replaced {
        Some(old) => {
            let sessions = end_sessions(&service.registry, &old, &Ended::Replaced);
            service
                .ended_record(&binding, &old, Ended::Replaced, &sessions)
                .await;
        }
        // The same person again (a step-up, new groups): their sessions follow the new login.
        None => service.login_renewed(&binding, &person),
    }
    record(
        service.audit.as_ref(),
        "login",
        &person,
        &binding,
        None,
        &[],
    )
    .await;
    info!(%binding, person = %person.principal(), mfa = person.mfa, "login");
    let refreshed = issuer.refresh && service.people.refreshes(&binding);
    Answer::ok(json!({
        "person": person.as_ref(),
        "principals": person.principals(),
        "binding": binding,
        "refreshed": refreshed,
    }))
}
