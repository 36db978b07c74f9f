//! A session's own server connection: opened at login, or deferred to the session's first
//! message when pgiam already knows what the server greets such a login with.
//!
//! Deferring is what lets a pool's spare connections cost the database nothing: the client is
//! answered from the greeting the last login with the same key received, and the server
//! connection opens when the client first has something to say. Anything the real login
//! reports differently (a role default changed since) reaches the client as ParameterStatus
//! before the first answer, which the protocol allows at any time.

use std::sync::Arc;

use bytes::BytesMut;
use tracing::{debug, info, warn};

use super::{startup, Refusal, Shared};
use crate::cancel::{Registration, Target};
use crate::config::PoolMode;
use crate::pool::{Lease, PoolError};
use crate::stream::BoxStream;
use crate::upstream::{Established, LoginKey, Parameters, Upstream, UpstreamError};
use crate::wire::PgError;

/// How the session reaches its server.
pub enum Link {
    Open(Backend),
    /// (Shared: a transaction-pooled session goes back to it after every transaction.)
    Deferred(Arc<Deferred>),
}

/// The session's server connection, and for a pooled mapping its hold on it (the backend
/// goes back to the pool with it).
pub struct Backend {
    pub stream: BoxStream,
    pub lease: Option<Box<Lease>>,
}

/// A login not yet made, and what the client was told about it.
pub struct Deferred {
    pub key: Arc<LoginKey>,
    pub told: Arc<Parameters>,
}

/// Logs in as the key says: the role's credentials, the server's encoding checked, the
/// mapped role assumed in gateway mode; for a pooled mapping, a backend of its pool's (reset
/// since its last session, or parked by `owner`'s last transaction: a transaction-pooled
/// session's principal) when there is one. A successful login's greeting is remembered for
/// the next one with the same key. The session's cancel key is the caller's to point at the
/// backend ([`reach`]): a session that logs in now gets its key from the backend's pid.
pub async fn connect(
    shared: &Shared,
    key: &Arc<LoginKey>,
    peer: &str,
    pool: PoolMode,
    owner: Option<&Arc<str>>,
) -> Result<(Established, Arc<Upstream>, Option<Lease>), Refusal> {
    let failed = |e: UpstreamError| {
        warn!(peer = %peer, role = %key.role, "upstream login failed: {e}");
        match e {
            UpstreamError::Server { frame, .. } => Refusal::ServerFrame(frame),
            other => Refusal::Client(
                PgError::fatal("08006", "pgiam: cannot open a connection to the database")
                    .with_detail(other.to_string()),
            ),
        }
    };
    // The settings in force now: a deferred session logs in with what a reload changed.
    let current = shared.settings.current();
    let Some(credentials) = current.config.roles.get(&key.role) else {
        warn!(peer = %peer, role = %key.role, "upstream login: the role has no credentials any more");
        return Err(Refusal::Client(PgError::fatal(
            "28000",
            format!(
                "pgiam: no credentials for role {} in the configuration in force",
                key.role
            ),
        )));
    };
    let upstream = &current.upstream;
    let log_in = || async {
        let metrics = crate::metrics::get();
        let started = std::time::Instant::now();
        let login = upstream
            .login(&key.role, credentials, &key.params, key.target)
            .await;
        metrics
            .upstream_connect
            .observe(started.elapsed().as_secs_f64());
        if login.is_err() {
            metrics.upstream_errors.inc();
        }
        let established = login.map_err(failed)?;
        // A role or database default can choose the encoding too; pgiam reads statements as
        // the server will only in encodings whose characters never contain ASCII bytes.
        if let Some(e) = established.parameters.get("client_encoding") {
            if crate::sql::is_unsafe_encoding(e) {
                return Err(startup::unsafe_encoding(e).into());
            }
        }
        Ok::<_, Refusal>(established)
    };
    let (mut established, mut lease) = if pool != PoolMode::None {
        // Pooled by login: in gateway mode one backend serves every role it may assume, as
        // the reset takes it back to the gateway role before it is handed on.
        let login = match key.assume {
            None => key.clone(),
            Some(_) => Arc::new(LoginKey {
                assume: None,
                ..(**key).clone()
            }),
        };
        match shared
            .pools
            .checkout(
                login,
                owner.cloned(),
                &current.config.pool,
                current.config.limits.max_message_size,
                log_in,
            )
            .await
        {
            Ok((lease, established)) => (established, Some(lease)),
            Err(PoolError::Open(refusal)) => return Err(refusal),
            Err(PoolError::Full(waited)) => {
                let full = format!(
                    "no backend came free within {}s: the pool's cap on backends to the server is reached",
                    waited.as_secs()
                );
                warn!(peer = %peer, role = %key.role, "no pooled backend: {full}");
                return Err(Refusal::Client(
                    PgError::fatal(
                        "53300",
                        "pgiam: too many connections to the database: no backend came free in time",
                    )
                    .with_detail(full)
                    .with_hint(
                        "Raise pool.max_backends or pool.queue_timeout_secs, or end idle sessions.",
                    ),
                ));
            }
        }
    } else {
        (log_in().await?, None)
    };
    // (A backend parked by this principal's last transaction acts as its role already.)
    if let Some(role) = &key.assume {
        if lease.as_ref().and_then(|l| l.assumed()) != Some(role.as_str()) {
            upstream
                .assume_role(&mut established, role)
                .await
                .map_err(failed)?;
            if let Some(lease) = &mut lease {
                lease.assume(role, &established.parameters);
            }
        }
    }
    // (A pooled backend taken again is told nothing new: logged at debug, as a transaction-
    // pooled session takes one per transaction.)
    match &lease {
        Some(l) if l.reused => {
            debug!(peer = %peer, backend_pid = established.process_id, "pooled backend taken")
        }
        _ => {
            upstream.remember(key, &established.parameters);
            info!(peer = %peer, backend_pid = established.process_id, "connected upstream")
        }
    }
    Ok((established, upstream.clone(), lease))
}

/// Points the session's cancel key at its backend: a CancelRequest with the key now reaches it.
/// (`upstream`: the one it logged in through, whatever a reload has put in place since.)
pub fn reach(
    upstream: Arc<Upstream>,
    key: &LoginKey,
    cancel_key: &Registration,
    backend: &Established,
) {
    cancel_key.connect(Target {
        upstream,
        process_id: backend.process_id,
        secret_key: backend.secret_key,
        address: key.target,
    });
}

/// What the client must hear about a login that happened after it was greeted: reports that
/// differ from what it was told, and the server's login notices.
pub fn news(established: &Established, told: &Parameters) -> BytesMut {
    let mut out = BytesMut::new();
    established.parameters.encode_news(Some(told), &mut out);
    out.extend_from_slice(&established.notices);
    out
}
