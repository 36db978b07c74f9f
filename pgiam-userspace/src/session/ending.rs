//! Ending a session from outside it: an operator's order (kill, revoke, the drain, a reload
//! that unmaps it) or a policy that no longer lets it connect. Its running statement is
//! cancelled, the ending recorded with who ordered it, and the client's FATAL returned.

use tracing::{info, warn};

use super::Shared;
use crate::admin::registry::Order;
use crate::wire::PgError;

/// A session the new policy no longer lets connect: its running statement is cancelled, the
/// revocation recorded, and the error for the client returned.
pub(super) async fn revoke(
    shared: &Shared,
    (session_id, process_id, secret_key): &(Option<&str>, i32, i32),
    database: &str,
    decision: crate::policy::Decision,
) -> PgError {
    let error = PgError::fatal(
        "57P01",
        format!("pgiam: terminating connection: access to database {database} was revoked"),
    );
    let error = end(shared, *process_id, *secret_key, error, |id| {
        crate::audit_fields! {
            "id" => id,
            "kind" => "session_revoked",
            "session" => session_id,
            "denied" => decision.denied,
            "policies" => decision.policies,
        }
    })
    .await;
    crate::metrics::get().ended_by("policy");
    info!(database, "session ended: access revoked by the policy");
    error
}

/// A session an operator (or the drain) ordered out: its running statement is cancelled, the
/// order recorded with who gave it, and the error for the client returned.
pub(super) async fn ordered_out(
    shared: &Shared,
    (session_id, process_id, secret_key): &(Option<&str>, i32, i32),
    order: Order,
) -> PgError {
    let (message, detail) = match &order {
        Order::Kill { by } => (
            "pgiam: terminating connection due to administrator command".to_owned(),
            format!("The session was killed by {by}."),
        ),
        Order::Revoke {
            by,
            principal,
            reason,
        } => (
            format!("pgiam: terminating connection: the access of {principal} was revoked"),
            match reason {
                Some(r) => format!("Revoked by {by}: {r}"),
                None => format!("Revoked by {by}."),
            },
        ),
        Order::Shutdown => (
            "pgiam: terminating connection due to administrator command".to_owned(),
            "pgiam is shutting down.".to_owned(),
        ),
        Order::Unmapped => (
            "pgiam: terminating connection: the configuration no longer maps this session's principal to its role".to_owned(),
            "pgiam.toml was reloaded without the mapping this session was established under.".to_owned(),
        ),
        Order::LoginEnded { person, why } => (
            match person {
                Some(p) => format!("pgiam: terminating connection: the login of {p} ended"),
                None => "pgiam: terminating connection: the token it logged in with expired"
                    .to_owned(),
            },
            format!("{why}."),
        ),
    };
    // A person's access that ended is a revocation, recorded as the policy's are.
    let kind = match &order {
        Order::LoginEnded { .. } => "session_revoked",
        _ => "session_killed",
    };
    let (principal, reason) = match &order {
        Order::Revoke {
            principal, reason, ..
        } => (Some(principal.as_str()), reason.as_deref()),
        Order::LoginEnded { person, why } => (person.as_deref(), Some(why.as_str())),
        _ => (None, None),
    };
    let error = PgError::fatal("57P01", message).with_detail(detail);
    let error = end(shared, *process_id, *secret_key, error, |id| {
        crate::audit_fields! {
            "id" => id,
            "kind" => kind,
            "session" => session_id,
            "order" => order.kind(),
            "by" => order.operator(),
            "principal" => principal,
            "reason" => reason,
        }
    })
    .await;
    crate::metrics::get().ended_by(order.kind());
    info!(
        session = session_id.as_deref().unwrap_or("-"),
        order = order.kind(),
        "session ended by order: {}",
        error.message
    );
    error
}

/// What every ending does: the running statement cancelled, the ending's record (built for
/// its id) written, and the client's error pointing at that record.
async fn end(
    shared: &Shared,
    process_id: i32,
    secret_key: i32,
    error: PgError,
    record: impl FnOnce(&str) -> crate::audit::Record,
) -> PgError {
    cancel_running(shared, process_id, secret_key).await;
    let Some(audit) = &shared.audit else {
        return error;
    };
    let id = audit.next_id();
    if let Err(e) = audit.record(record(&id)).await {
        warn!("the audit record of an ended session was not written: {e}");
    }
    error.with_audit_id(&id)
}

/// Cancels whatever the session's backend is running (best effort: the session ends anyway).
async fn cancel_running(shared: &Shared, process_id: i32, secret_key: i32) {
    if let Some(target) = shared.cancels.lookup(process_id, secret_key) {
        if let Err(e) = target
            .upstream
            .cancel(target.process_id, target.secret_key, target.address)
            .await
        {
            warn!("ending a session: its running statement could not be cancelled: {e}");
        }
    }
}
