//! Establishing a session: TLS and startup negotiation, the startup checks, the identity →
//! role mapping and its connect decision, and the upstream login (or what stands in for it
//! until the first message, with `connect = "deferred"`).

use std::sync::Arc;

use bytes::BytesMut;
use tracing::{info, warn};

use super::{
    carried, forward_cancel, login, password, protocol_violation, startup, statements, Arrival,
    Client, Refusal, Session, Shared, Transactions,
};
use crate::admin::registry::{Facts, Live, State};
use crate::identity::Identity;
use crate::stream::Rewind;
use crate::tls::ALPN_POSTGRESQL;
use crate::wire::{self, PgError, StartupPacket};
use internment::ArcIntern;

/// Negotiation, startup checks, mapping and upstream login (or what stands in for it until the
/// first message). `Ok(None)` for a connection that only carried a CancelRequest.
pub(super) async fn establish(
    shared: &Arc<Shared>,
    client: &mut Client,
    arrival: Box<Arrival>,
) -> Result<Option<(Session, login::Link)>, Refusal> {
    let Arrival { identity, dialled } = *arrival;
    let startup = loop {
        client.fill().await?;
        if !client.tls && client.buf.first() == Some(&wire::TLS_HANDSHAKE_RECORD) {
            direct_tls(shared, client, dialled).await?;
            continue;
        }
        let Some(packet) = wire::decode_startup(&mut client.buf).map_err(protocol_violation)?
        else {
            continue;
        };
        match packet {
            StartupPacket::SslRequest => {
                if client.tls {
                    return Err(PgError::fatal("08P01", "pgiam: SSLRequest inside TLS").into());
                }
                request_tls(shared, client, dialled).await?;
            }
            StartupPacket::GssEncRequest => {
                if client.tls {
                    return Err(PgError::fatal("08P01", "pgiam: GSSENCRequest inside TLS").into());
                }
                // Anything pipelined behind the request would be read as if it had been
                // encrypted: refuse it, as PostgreSQL does.
                no_pipelining(client)?;
                client.write(b"N").await?;
            }
            StartupPacket::Cancel {
                process_id,
                secret_key,
            } => {
                forward_cancel(shared, process_id, secret_key).await;
                return Ok(None);
            }
            StartupPacket::Startup(m) => break m,
        }
    };
    if !client.buf.is_empty() {
        // libpq waits for the server's answer before sending anything else.
        return Err(
            PgError::fatal("08P01", "pgiam: data sent before authentication completed").into(),
        );
    }
    // Who is asking comes first, so that every refusal below is audited with its identity.
    let origin = identity.resolve().await.map_err(|e| {
        crate::metrics::get().refused("identity");
        warn!(peer = %client.peer, "cannot establish client identity: {e}");
        PgError::fatal(
            "28000",
            "pgiam: cannot establish the identity of this client",
        )
        .with_detail(e.to_string())
    })?;
    let mut origin = origin;
    origin.identity.person = shared
        .people
        .bound(origin.identity.uid, origin.identity.cgroup.as_deref());
    let checked = match startup::check(startup) {
        Ok(c) => c,
        Err(e) => {
            return Err(
                audited_refusal(shared, &client.peer, &origin.identity, None, e, "startup").await,
            )
        }
    };
    if let Some(negotiation) = &checked.negotiation {
        let mut b = BytesMut::new();
        let unrecognized: Vec<&str> = negotiation
            .unrecognized
            .iter()
            .map(String::as_str)
            .collect();
        wire::negotiate_protocol_version(0, &unrecognized, &mut b);
        client.write(&b).await?;
    }

    // One snapshot of the settings for the whole login: a reload meanwhile applies to the next.
    let current = shared.settings.current();
    let config = &current.config;
    if origin.identity.person.is_none()
        && config
            .find_mapping(&origin.identity.principals(), &checked.database)
            .is_none()
        && config.token_password_may_map(&checked.database)
    {
        origin.identity.person =
            Some(password::person_from_password(shared, client, &config.issuers).await?);
    }
    let identity = &origin.identity;
    let principals = identity.principals();
    let Some(mapping) = config.find_mapping(&principals, &checked.database) else {
        warn!(peer = %client.peer, %identity, database = %checked.database, "session refused: no mapping");
        let e = startup::no_mapping(identity, &checked.database);
        return Err(audited_refusal(
            shared,
            &client.peer,
            identity,
            Some(&checked.database),
            e,
            "no_mapping",
        )
        .await);
    };
    let principal = crate::policy::Principal::shared(
        &mapping.principal,
        &mapping.role,
        &checked.database,
        identity,
    );
    // The generation the connect decision is made under: a reload before the session's gate
    // exists (the login takes a while) makes it ask again.
    let decided_under = shared.policies.generation();
    let connect = principal.decide(
        &shared.policies.current(),
        decided_under,
        &crate::policy::Ask::on_database(crate::policy::Action::Connect, "connect"),
    );
    if !connect.allowed {
        warn!(peer = %client.peer, %identity, database = %checked.database, "session refused by policy");
        let e = PgError::fatal(
            "42501",
            format!(
                "pgiam: permission denied: connect to database {}",
                checked.database
            ),
        );
        return Err(audited_refusal(
            shared,
            &client.peer,
            identity,
            Some(&checked.database),
            e,
            "policy",
        )
        .await);
    }
    let id = match &shared.audit {
        Some(audit) => audit.next_id(),
        None => shared.registry.local_id(),
    };
    let live = Live::new(
        Facts {
            id,
            audited: shared.audit.is_some(),
            principal: ArcIntern::from_ref(mapping.principal.as_str()),
            role: ArcIntern::from_ref(mapping.role.as_str()),
            database: ArcIntern::from_ref(checked.database.as_str()),
            identity: ArcIntern::new(identity.clone()),
            upstream: ArcIntern::new(current.upstream.describe(origin.destination)),
            peer: client.peer.clone(),
            tls: client.tls,
            pool: mapping.pool,
        },
        State::NotConnected,
    );
    // Registered before its allow record: once the drain has begun, no session starts.
    let registration = match shared.registry.register(live.clone()) {
        Ok(r) => r,
        Err(e) => {
            let e = PgError::fatal(
                "57P03",
                format!("pgiam: the database system is shutting down ({e})"),
            );
            return Err(audited_refusal(
                shared,
                &client.peer,
                identity,
                Some(&checked.database),
                e,
                "shutting_down",
            )
            .await);
        }
    };
    // An operator's revocation stands above the policy, and the mapping must still be the
    // one in force. Both are looked at once registered: a revocation or a reload that ordered
    // sessions out just before this one registered saw no entry to order, so this one looks
    // for itself (both change their state before they order, and registration is under the
    // registry's lock).
    let names =
        std::iter::once(mapping.principal.as_str()).chain(principals.iter().map(String::as_str));
    let revoked = shared.revocations.find(names);
    let still_mapped = shared
        .settings
        .current()
        .config
        .find_mapping(&principals, &checked.database)
        .is_some_and(|m| m.principal == mapping.principal && m.role == mapping.role);
    let refused = match (&revoked, still_mapped) {
        (Some(r), _) => {
            warn!(peer = %client.peer, %identity, principal = %r.principal, "session refused: principal revoked");
            let e = PgError::fatal(
                "42501",
                format!(
                    "pgiam: permission denied: the access of {} is revoked",
                    r.principal
                ),
            );
            let e = match &r.reason {
                Some(reason) => e.with_detail(format!("reason: {reason}")),
                None => e,
            };
            Some((e, "revoked"))
        }
        (None, false) => Some((
            PgError::fatal(
                "42501",
                "pgiam: permission denied: the configuration changed while the session started",
            ),
            "no_mapping",
        )),
        (None, true) => None,
    };
    if let Some((e, reason)) = refused {
        drop(registration);
        return Err(audited_refusal(
            shared,
            &client.peer,
            identity,
            Some(&checked.database),
            e,
            reason,
        )
        .await);
    }
    registration.started();
    crate::metrics::get().session(&mapping.role);
    // With durability `always` the decision is on disk before anything reaches the database;
    // without a working audit log nothing does.
    if let Some(audit) = &shared.audit {
        let record = crate::audit_fields! {
            "id" => live.facts.id,
            "kind" => "session",
            "decision" => "allow",
            "identity" => identity,
            "principal" => mapping.principal,
            "database" => checked.database,
            "role" => mapping.role,
            "policies" => connect.policies,
            "upstream" => current.upstream.describe(origin.destination),
            "peer" => client.peer,
            "tls" => client.tls,
        };
        audit.record(record).await.map_err(|e| {
            PgError::fatal(
                "58030",
                "pgiam: the audit log is unavailable, so no session can start",
            )
            .with_detail(e.to_string())
        })?;
    }
    let gateway = config.upstream.mode == crate::config::UpstreamMode::Gateway;
    let login_role = match (&config.upstream.gateway_role, gateway) {
        (Some(g), true) => g,
        _ => &mapping.role,
    };
    let mut params = checked.forwarded.clone();
    params.push((
        "search_path".into(),
        checked.search_path_setting(&config.policy),
    ));
    let key = crate::upstream::LoginKey {
        role: login_role.clone(),
        params,
        target: origin.destination,
        assume: gateway.then(|| mapping.role.clone()),
    };
    let remembered = match config.upstream.connect {
        crate::config::UpstreamConnect::Deferred => current.upstream.remembered(&key),
        crate::config::UpstreamConnect::AtLogin => None,
    };
    // A deferred session holds the key its login's greeting is remembered under: one per
    // distinct login, not one (with its parameters) per waiting client.
    let (key, told) = match remembered {
        Some((kept, told)) => (kept, Some(told)),
        None => (Arc::new(key), None),
    };
    let pool = live.facts.pool;
    let transaction_pooled = pool == crate::config::PoolMode::Transaction;
    let owner: Arc<str> = Arc::from(mapping.principal.as_str());
    let owner_of_backends = transaction_pooled.then_some(&owner);
    let mut hello = BytesMut::with_capacity(512);
    wire::authentication_ok(&mut hello);
    // The client is told its backend's real pid (pgiam's own secret beside it); a deferred
    // session has no backend yet, and is told a pid pgiam makes up.
    let encoding_at_login;
    // What a transaction-pooled session logs in with again, after each of its transactions.
    let reattach;
    let (link, scs_at_login, status, cancel_key) = match told {
        Some(told) => {
            told.encode_news(None, &mut hello);
            let scs = told.standard_conforming_strings();
            encoding_at_login = told.get("client_encoding").map(str::to_owned);
            let deferred = Arc::new(login::Deferred {
                key: key.clone(),
                told,
            });
            reattach = transaction_pooled.then(|| deferred.clone());
            let link = login::Link::Deferred(deferred);
            let cancel_key = shared.cancels.register(None);
            (link, scs, wire::TransactionStatus::Idle, cancel_key)
        }
        None => {
            let (established, upstream, lease) =
                login::connect(shared, &key, &client.peer, pool, owner_of_backends).await?;
            // A transaction-pooled session's backend changes between its transactions: the
            // pid it is told is pgiam's, whichever backend a cancel then reaches.
            let told_pid = (!transaction_pooled).then_some(established.process_id);
            let cancel_key = shared.cancels.register(told_pid);
            reattach = transaction_pooled.then(|| {
                Arc::new(login::Deferred {
                    key: key.clone(),
                    told: Arc::new(established.parameters.clone()),
                })
            });
            login::reach(upstream, &key, &cancel_key, &established);
            established.parameters.encode_news(None, &mut hello);
            hello.extend_from_slice(&established.notices);
            let scs = established.parameters.standard_conforming_strings();
            encoding_at_login = established
                .parameters
                .get("client_encoding")
                .map(str::to_owned);
            live.set_state(State::Idle);
            (
                login::Link::Open(login::Backend {
                    stream: established.stream,
                    lease: lease.map(Box::new),
                }),
                scs,
                established.status,
                cancel_key,
            )
        }
    };
    wire::backend_key_data(cancel_key.process_id(), cancel_key.secret_key(), &mut hello);
    wire::ready_for_query(status, &mut hello);
    client.write(&hello).await?;

    let summary = format!(
        "{identity} principal={} database={} role={} upstream={}",
        mapping.principal,
        checked.database,
        mapping.role,
        current.upstream.describe(origin.destination),
    );
    info!(peer = %client.peer, session = %live.facts.id, tls = client.tls, "session established: {summary}");
    let mut session = Session {
        cancel_key,
        gate: Box::new(statements::Gate::new(
            shared.audit.clone(),
            shared.policies.clone(),
            decided_under,
            principal,
            checked.resolver(&config.policy, &mapping.role),
            gateway,
            live,
        )),
        standard_conforming_strings: scs_at_login,
        registration,
        transactions: reattach.map(|reattach| {
            Box::new(Transactions {
                principal: owner,
                reattach,
                carried: carried::Carried::default(),
            })
        }),
        catalog: ArcIntern::new(crate::catalog::cache::Source {
            key: (key.target, checked.database.clone()),
            login: key,
        }),
    };
    session
        .gate
        .login_client_encoding(encoding_at_login.as_deref());
    Ok(Some((session, link)))
}

/// Records a refusal and points the client at the record.
async fn audited_refusal(
    shared: &Shared,
    peer: &str,
    identity: &Identity,
    database: Option<&str>,
    error: PgError,
    reason: &'static str,
) -> Refusal {
    crate::metrics::get().refused(reason);
    let Some(audit) = &shared.audit else {
        return error.into();
    };
    let id = audit.next_id();
    let record = crate::audit_fields! {
        "id" => id,
        "kind" => "session",
        "decision" => "deny",
        "code" => error.code,
        "reason" => error.message,
        "identity" => identity,
        "database" => database,
        "peer" => peer,
    };
    if let Err(e) = audit.record(record).await {
        warn!("audit record for a refusal was not written: {e}");
    }
    error.with_audit_id(&id).into()
}

fn no_pipelining(client: &Client) -> Result<(), Refusal> {
    if client.buf.is_empty() {
        Ok(())
    } else {
        Err(PgError::fatal(
            "08P01",
            "pgiam: received unencrypted data after a TLS or GSS request",
        )
        .into())
    }
}

async fn request_tls(
    shared: &Shared,
    client: &mut Client,
    dialled: Option<std::net::IpAddr>,
) -> Result<(), Refusal> {
    no_pipelining(client)?;
    let Some(acceptor) = &shared.tls else {
        client.write(b"N").await?;
        return Ok(());
    };
    client.write(b"S").await?;
    let plain = std::mem::replace(&mut client.stream, Box::new(tokio::io::empty()));
    let tls = acceptor
        .accept(plain, dialled)
        .await
        .map_err(|e| Refusal::Silent(format!("TLS handshake failed: {e}")))?;
    client.stream = Box::new(tls);
    client.tls = true;
    Ok(())
}

/// PostgreSQL 17 "direct SSL": the connection opens with a TLS ClientHello, and ALPN must say
/// `postgresql` so that a TLS connection meant for another protocol cannot be replayed here.
async fn direct_tls(
    shared: &Shared,
    client: &mut Client,
    dialled: Option<std::net::IpAddr>,
) -> Result<(), Refusal> {
    let Some(acceptor) = &shared.tls else {
        return Err(Refusal::Silent(
            "direct TLS, but client TLS is disabled".into(),
        ));
    };
    let prefix = client.buf.split().freeze();
    let plain = std::mem::replace(&mut client.stream, Box::new(tokio::io::empty()));
    let tls = acceptor
        .accept(Rewind::new(prefix, plain), dialled)
        .await
        .map_err(|e| Refusal::Silent(format!("direct TLS handshake failed: {e}")))?;
    if tls.get_ref().1.alpn_protocol() != Some(ALPN_POSTGRESQL) {
        return Err(Refusal::Silent(
            "direct TLS without ALPN \"postgresql\"".into(),
        ));
    }
    client.stream = Box::new(tls);
    client.tls = true;
    Ok(())
}
