//! The admin socket: a unix socket on which root, pgiam's own user and the members of one
//! configured group give orders. Who is asking comes from the socket's peer credentials
//! (uid, and the peer's groups as the kernel holds them), never from anything the client says.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};

use super::protocol::{self, Answer, Request};
use super::registry::{unix_ms, Operator, Order, Registry};
use super::revocations::{Revocation, Revocations};
use crate::audit::AuditLog;
use crate::policy::PolicyStore;
use crate::settings::Settings;

/// What the admin socket's orders act on.
pub struct Admin {
    pub settings: Arc<Settings>,
    pub registry: Arc<Registry>,
    pub revocations: Arc<Revocations>,
    pub audit: Option<AuditLog>,
    pub policies: Arc<PolicyStore>,
    pub pools: Arc<crate::pool::Pools>,
    /// Who the sessions of logged-in people carry now (a renewal may have added names).
    pub people: Arc<crate::people::People>,
    pub started: Instant,
}

/// The group (`[admin] group`) whose members may use the socket beside root.
struct Allowed {
    uid: u32,
    group: Option<(String, u32)>,
}

/// Gives the bound socket file to the admin group, whose members may then open it.
pub fn give_to_group(path: &Path, group: Option<&str>) -> anyhow::Result<()> {
    let Some(group) = group else {
        return Ok(());
    };
    let gid = group_id(group)?;
    nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid)))
        .with_context(|| format!("chgrp {group} {}", path.display()))
}

fn group_id(name: &str) -> anyhow::Result<u32> {
    Ok(nix::unistd::Group::from_name(name)
        .with_context(|| format!("looking up group {name}"))?
        .with_context(|| format!("[admin] group {name:?} does not exist"))?
        .gid
        .as_raw())
}

/// Serves the socket until the task is dropped.
pub async fn serve(listener: UnixListener, admin: Arc<Admin>) {
    let allowed = Arc::new(Allowed {
        uid: nix::unistd::geteuid().as_raw(),
        group: admin
            .settings
            .current()
            .config
            .admin
            .as_ref()
            .and_then(|a| a.group.clone())
            .and_then(|g| group_id(&g).ok().map(|gid| (g, gid))),
    });
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                warn!("admin socket: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (admin, allowed) = (admin.clone(), allowed.clone());
        tokio::spawn(async move {
            // A client that sends nothing does not hold a task for long.
            let _ =
                tokio::time::timeout(Duration::from_secs(30), serve_one(stream, &admin, &allowed))
                    .await;
        });
    }
}

async fn serve_one(stream: UnixStream, admin: &Admin, allowed: &Allowed) {
    // Who is asking is known at accept; the request is read even from someone refused, so
    // that the refusal is read as the answer and not lost to a reset connection.
    let operator = authorize(&stream, allowed);
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    let read = (&mut reader)
        .take(protocol::MAX_REQUEST as u64 + 1)
        .read_until(b'\n', &mut line)
        .await;
    let answer = match (operator, read) {
        (Err(refusal), _) => {
            warn!("admin socket: {refusal}");
            Answer::error(refusal)
        }
        (_, Err(e)) => Answer::error(format!("reading the request: {e}")),
        (_, Ok(_)) if line.len() > protocol::MAX_REQUEST => Answer::error("request too long"),
        (Ok(operator), Ok(_)) => match protocol::parse_request(line.trim_ascii()) {
            Err(e) => Answer::error(e),
            Ok(request) => handle(admin, &operator, request).await,
        },
    };
    let mut stream = reader.into_inner();
    let _ = stream.write_all(&answer.to_line()).await;
    let _ = stream.shutdown().await;
}

/// Root, pgiam's own user, or a member of the admin group (by the peer's credentials).
fn authorize(stream: &UnixStream, allowed: &Allowed) -> Result<Operator, String> {
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("cannot read the peer's credentials: {e}"))?;
    let uid = cred.uid();
    let operator = Operator {
        uid,
        user: nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .map(|u| u.name),
        pid: cred.pid(),
    };
    if uid == 0 || uid == allowed.uid {
        return Ok(operator);
    }
    if let Some((_, gid)) = &allowed.group {
        let groups = peer_groups(stream).unwrap_or_default();
        if cred.gid() == *gid || groups.contains(gid) {
            return Ok(operator);
        }
    }
    Err(match &allowed.group {
        Some((name, _)) => format!(
            "permission denied: {operator} may not use pgiam's admin socket (root and members of group {name} may)"
        ),
        None => format!(
            "permission denied: {operator} may not use pgiam's admin socket (only root may; set [admin] group to allow a group)"
        ),
    })
}

/// The peer's supplementary groups as the kernel recorded them at connect (SO_PEERGROUPS).
fn peer_groups(stream: &UnixStream) -> std::io::Result<Vec<u32>> {
    let mut groups = vec![0 as libc::gid_t; 256];
    let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
    // SAFETY: the buffer is valid for `len` bytes, and the kernel writes at most that many.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERGROUPS,
            groups.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    groups.truncate(len as usize / std::mem::size_of::<libc::gid_t>());
    Ok(groups)
}

async fn handle(admin: &Admin, operator: &Operator, request: Request) -> Answer {
    match request {
        Request::Sessions => {
            // A logged-in person is shown as their login is now (a refresh's groups, a
            // step-up's second factor), which is what their sessions are decided as.
            let mut sessions = admin.registry.list();
            for s in &mut sessions {
                if let Some(now) = admin.people.renewed_for(&s.identity) {
                    s.identity.person = Some(now);
                }
            }
            Answer::ok(json!(sessions))
        }
        Request::Kill { session, principal } => {
            let order = Order::Kill {
                by: operator.clone(),
            };
            let ids = match (session, principal) {
                (Some(id), None) => admin.registry.order(|l| l.facts.id == id, &order),
                (None, Some(p)) => admin.registry.order(|l| answers_to(admin, l, &p), &order),
                _ => return Answer::error("kill takes a session id or a principal"),
            };
            if ids.is_empty() {
                return Answer::error("no live session matches");
            }
            info!(by = %operator, sessions = ?ids, "admin: sessions killed");
            Answer::ok(json!({ "killed": ids }))
        }
        Request::Revoke {
            principal,
            for_secs,
            reason,
        } => revoke(admin, operator, principal, for_secs, reason).await,
        Request::Unrevoke { principal } => match admin.revocations.unrevoke(&principal) {
            Err(e) => Answer::error(format!("the revocation list was not saved: {e}")),
            Ok(None) => Answer::error(format!("{principal} is not revoked")),
            Ok(Some(_)) => {
                let audited = audit(
                    admin,
                    crate::audit_fields! {
                        "id" => admin.audit.as_ref().map(|a| a.next_id()),
                        "kind" => "principal_unrevoked",
                        "principal" => principal,
                        "by" => operator,
                    },
                )
                .await;
                info!(by = %operator, %principal, "admin: principal unrevoked");
                Answer::ok(json!({ "unrevoked": principal, "audited": audited }))
            }
        },
        Request::Revocations => Answer::ok(json!(admin.revocations.list())),
        Request::Status => Answer::ok(status(admin).await),
    }
}

/// Whether a session answers to `principal`: a name it logged in with, or one its person's
/// renewed login carries now (a group the issuer added since).
fn answers_to(admin: &Admin, live: &crate::admin::registry::Live, principal: &str) -> bool {
    live.answers_to(principal)
        || admin
            .people
            .principals_now(&live.facts.identity)
            .iter()
            .any(|n| n == principal)
}

async fn revoke(
    admin: &Admin,
    operator: &Operator,
    principal: String,
    for_secs: Option<u64>,
    reason: Option<String>,
) -> Answer {
    if principal.is_empty() || !principal.contains(':') {
        return Answer::error(format!(
            "{principal:?} is not a principal (kind:value, e.g. unit:billing.service, uid:1000)"
        ));
    }
    let now = unix_ms(SystemTime::now());
    let revocation = Revocation {
        principal: principal.clone(),
        since_ms: now,
        until_ms: for_secs.map(|s| now.saturating_add(s.saturating_mul(1000))),
        reason: reason.clone(),
        by: operator.clone(),
    };
    // Saved first: a revocation that would not survive a restart is refused whole.
    if let Err(e) = admin.revocations.revoke(revocation.clone()) {
        return Answer::error(format!("the revocation list was not saved: {e}"));
    }
    let order = Order::Revoke {
        by: operator.clone(),
        principal: principal.clone(),
        reason,
    };
    let ended = admin
        .registry
        .order(|l| answers_to(admin, l, &principal), &order);
    let audited = audit(
        admin,
        crate::audit_fields! {
            "id" => admin.audit.as_ref().map(|a| a.next_id()),
            "kind" => "principal_revoked",
            "principal" => principal,
            "until_ms" => revocation.until_ms,
            "reason" => revocation.reason,
            "by" => operator,
            "sessions" => ended,
        },
    )
    .await;
    info!(by = %operator, %principal, sessions = ended.len(), "admin: principal revoked");
    Answer::ok(json!({ "revoked": revocation, "sessions": ended, "audited": audited }))
}

/// Writes an admin record; whether it was written (the order stands either way: refusing to
/// revoke because the log is down would keep access open).
async fn audit(admin: &Admin, record: crate::audit::Record) -> bool {
    let Some(log) = &admin.audit else {
        return false;
    };
    match log.record(record).await {
        Ok(()) => true,
        Err(e) => {
            warn!("admin: audit record not written: {e}");
            false
        }
    }
}

async fn status(admin: &Admin) -> serde_json::Value {
    let current = admin.settings.current();
    let config = &current.config;
    let interception = match &config.interception {
        None => json!(null),
        Some(ic) => {
            let counters = match crate::redirect::read_stats(&ic.bpffs_dir) {
                Ok(stats) => json!(stats
                    .into_iter()
                    .collect::<std::collections::BTreeMap<_, _>>()),
                Err(e) => json!({ "error": e.to_string() }),
            };
            json!({
                "cgroup": ic.cgroup,
                "endpoints": ic.endpoints,
                "ports": ic.ports,
                "fast_path": ic.fast_path,
                "fail_open": ic.fail_open,
                "pins": ic.bpffs_dir,
                "counters": counters,
            })
        }
    };
    let audit = match (&admin.audit, &config.audit) {
        (Some(log), Some(a)) => {
            let s = log.status();
            json!({
                "path": a.path,
                "durability": format!("{:?}", a.durability).to_lowercase(),
                "records": s.sealed,
                "written": s.written,
                "synced": s.synced,
                "bytes": std::fs::metadata(&a.path).map(|m| m.len()).ok(),
                "last_flush_ms": s.last_flush.map(unix_ms),
                "failed": s.failed,
            })
        }
        _ => json!(null),
    };
    let reach_started = Instant::now();
    let upstream =
        match tokio::time::timeout(Duration::from_secs(3), current.upstream.reachable()).await {
            Ok(Ok(())) => json!({
                "address": current.upstream.describe(None),
                "reachable": true,
                "connect_ms": reach_started.elapsed().as_secs_f64() * 1000.0,
            }),
            Ok(Err(e)) => json!({
                "address": current.upstream.describe(None),
                "reachable": false,
                "error": e.to_string(),
            }),
            Err(_) => json!({
                "address": current.upstream.describe(None),
                "reachable": false,
                "error": "no connection within 3 s",
            }),
        };
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "uptime_secs": admin.started.elapsed().as_secs(),
        "config": {
            "file": admin.settings.path(),
            "generation": admin.settings.generation(),
        },
        "policy": {
            "file": config.policy.file,
            "generation": admin.policies.generation(),
            "policies": admin.policies.current().len(),
        },
        "sessions": { "live": admin.registry.len(), "total": admin.registry.total() },
        "revocations": admin.revocations.list().len(),
        "pool": admin.pools.occupancy(),
        "interception": interception,
        "audit": audit,
        "upstream": upstream,
    })
}
