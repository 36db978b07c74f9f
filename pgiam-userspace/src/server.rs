//! The listeners: accept clients, find who they are, and hand each to its own session task.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use crate::admin::registry::Registry;
use crate::cancel::CancelRegistry;
use crate::config::{self, Config, EndpointSpec};
use crate::identity::{self, Identity};
use crate::redirect::{self, Endpoint, Interception};
use crate::session::{self, ClientOrigin, IdentitySource, Shared};
use crate::settings::Settings;

type SharedInterception = Option<Arc<Mutex<Interception>>>;

/// Runs the proxy until SIGTERM or SIGINT.
/// Runs the proxy until SIGTERM or SIGINT; `path` is where `config` came from (SIGHUP reads it
/// again).
pub async fn run(config: Config, path: &Path) -> anyhow::Result<()> {
    // Before anything else: a SIGTERM that arrives once READY=1 is out must be handled.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let policies = Arc::new(
        crate::policy::PolicyStore::load(&config.policy.file).context("statement policy")?,
    );
    info!(
        file = %config.policy.file.display(),
        policies = policies.current().len(),
        "policy loaded"
    );
    raise_fd_limit();
    let tls =
        crate::tls::client_acceptor(&config.client_tls, &config.state_dir).context("client TLS")?;
    let settings = Arc::new(Settings::new(path, config.clone()).context("upstream TLS")?);
    let audit = match &config.audit {
        Some(a) => {
            let interval = std::time::Duration::from_millis(a.flush_interval_ms);
            let log = crate::audit::AuditLog::open_rotating(
                &a.path,
                a.durability,
                interval,
                a.rotation(),
            )
            .context("audit log")?;
            info!(path = %a.path.display(), durability = ?a.durability, flush_interval_ms = a.flush_interval_ms, "audit log open");
            Some(log)
        }
        None => {
            tracing::warn!("no [audit] section: sessions are not audited");
            None
        }
    };
    warn_about_exe_mappings(&config);
    let revocations = Arc::new(
        crate::admin::revocations::Revocations::load(&config.state_dir)
            .context("revocation list")?,
    );
    let shared = Arc::new(Shared {
        settings: settings.clone(),
        audit,
        tls,
        cancels: Arc::new(CancelRegistry::default()),
        policies: policies.clone(),
        registry: Arc::new(Registry::default()),
        revocations,
        pools: Arc::new(crate::pool::Pools::default()),
        people: Arc::new(crate::people::People::kept_in(&config.state_dir)),
        catalogs: Arc::new(crate::catalog::cache::Catalogs::default()),
    });
    let people = Arc::new(crate::people::Service {
        people: shared.people.clone(),
        settings: settings.clone(),
        registry: shared.registry.clone(),
        revocations: shared.revocations.clone(),
        audit: shared.audit.clone(),
    });
    tokio::spawn(people.clone().watch());
    let mut login_path = open_login_socket(&config, &people)?;
    // Idle pooled backends past their time are closed as it passes, not at the next checkout;
    // the relays of sessions idle for a tick or two are given back (see `session`).
    tokio::spawn({
        let shared = shared.clone();
        async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tick.tick().await;
                shared.pools.reap(&shared.settings.current().config.pool);
                shared.registry.tick();
            }
        }
    });
    // Metrics before the listeners: a port that cannot be had fails the start, not later.
    let metrics = match config.admin.as_ref().and_then(|a| a.metrics) {
        Some(addr) => {
            let listener = crate::admin::metrics::bind(addr).await?;
            info!(%addr, "serving metrics at /metrics");
            Some(listener)
        }
        None => None,
    };
    let admin_socket = match &config.admin {
        Some(a) => {
            let listener = bind_unix(&a.socket, a.socket_mode)?;
            crate::admin::socket::give_to_group(&a.socket, a.group.as_deref())?;
            info!(path = %a.socket.display(), group = ?a.group, "admin socket open");
            Some((listener, a.socket.clone()))
        }
        None => None,
    };

    // Listeners first: interception must never send connections to a port nobody serves.
    let mut tcp = Vec::new();
    for addr in config.listen.tcp.iter().chain(&config.listen.tcp6) {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        info!(%addr, "listening on TCP");
        tcp.push(listener);
    }
    // A reload that changes the endpoints resolves them at once, not at the next tick.
    let endpoints_changed = Arc::new(tokio::sync::Notify::new());
    let interception: SharedInterception = match &config.interception {
        Some(ic) => {
            let endpoints = resolve_endpoints(ic, &config.listen)
                .await
                .context("resolving interception.endpoints")?;
            let listen4 = config
                .listen
                .tcp
                .expect("validated: interception needs listen.tcp");
            let installed = Interception::install(ic, listen4, config.listen.tcp6, &endpoints)
                .context("installing eBPF interception")?;
            info!(cgroup = %ic.cgroup, fast_path = ic.fast_path, "eBPF interception active");
            let shared = Arc::new(Mutex::new(installed));
            tokio::spawn(refresh_endpoints(
                settings.clone(),
                shared.clone(),
                endpoints_changed.clone(),
            ));
            Some(shared)
        }
        None => None,
    };
    // Aborted at the drain: dropping a listener stops the accepting.
    let mut accepting = Vec::new();
    for listener in tcp {
        accepting.push(tokio::spawn(accept_tcp(
            listener,
            shared.clone(),
            interception.clone(),
        )));
    }
    let mut unix_path = None;
    if let Some(path) = &config.listen.unix {
        let listener = bind_unix(path, config.listen.unix_mode)?;
        info!(path = %path.display(), "listening on unix socket (identity from SO_PEERCRED)");
        unix_path = Some(path.clone());
        accepting.push(tokio::spawn(accept_unix(listener, shared.clone())));
    }
    if let Some(listener) = metrics {
        tokio::spawn(crate::admin::metrics::serve(
            listener,
            shared.registry.clone(),
            shared.revocations.clone(),
            shared.audit.clone(),
            config.interception.as_ref().map(|i| i.bpffs_dir.clone()),
            shared.pools.clone(),
        ));
    }
    let admin_path = admin_socket.map(|(listener, path)| {
        let admin = Arc::new(crate::admin::socket::Admin {
            settings: settings.clone(),
            registry: shared.registry.clone(),
            revocations: shared.revocations.clone(),
            audit: shared.audit.clone(),
            policies: policies.clone(),
            pools: shared.pools.clone(),
            people: shared.people.clone(),
            started: std::time::Instant::now(),
        });
        tokio::spawn(crate::admin::socket::serve(listener, admin));
        path
    });
    info!(upstream = %settings.current().upstream.describe(None), "pgiam ready");
    sd_notify("READY=1");

    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: shutting down"); break }
            _ = int.recv() => { info!("SIGINT: shutting down"); break }
            _ = hup.recv() => {
                sd_notify("RELOADING=1");
                reload_settings(&shared, &endpoints_changed);
                // The first issuer may come with a reload: people can log in from then on.
                if login_path.is_none() {
                    match open_login_socket(&shared.settings.current().config, &people) {
                        Ok(path) => login_path = path,
                        Err(e) => error!("SIGHUP: the login socket did not open: {e:#}"),
                    }
                }
                // Atomic: the new policy replaces the old one whole, or not at all.
                match policies.reload() {
                    Ok(n) => {
                        crate::metrics::get().reloaded("policy", true);
                        info!(policies = n, "SIGHUP: policy reloaded");
                    }
                    Err(e) => {
                        crate::metrics::get().reloaded("policy", false);
                        tracing::error!("SIGHUP: policy not reloaded, the previous one stays: {e}")
                    }
                }
                // Waiting sessions check at once that they may still connect.
                shared.registry.wake_all();
                sd_notify("READY=1");
            }
        }
    }
    sd_notify("STOPPING=1");
    for task in &accepting {
        task.abort();
    }
    if let Some(path) = unix_path {
        let _ = std::fs::remove_file(path);
    }
    drain(&shared).await;
    shared.pools.shut().await;
    if let Some(path) = login_path {
        let _ = std::fs::remove_file(path);
    }
    if let Some(path) = admin_path {
        let _ = std::fs::remove_file(path);
    }
    if let Some(i) = &interception {
        i.lock().unwrap_or_else(|e| e.into_inner()).shutdown();
    }
    if let Some(audit) = &shared.audit {
        // Completions and session ends wait in the writer for a moment; they are written now.
        match tokio::time::timeout(std::time::Duration::from_secs(5), audit.flush().wait()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!("audit: the last records were not written: {e}"),
            Err(_) => tracing::error!("audit: the last records were not written within 5 s"),
        }
    }
    Ok(())
}

/// Opens the login socket once people can log in (an issuer is configured): any local user
/// may connect to it, and is known by the kernel's word (SO_PEERCRED). Its path is where it was
/// opened for the life of the process.
fn open_login_socket(
    config: &Config,
    people: &Arc<crate::people::Service>,
) -> anyhow::Result<Option<PathBuf>> {
    if config.issuers.is_empty() {
        return Ok(None);
    }
    let path = config.people.socket.clone();
    let listener = bind_unix(&path, 0o666)?;
    info!(path = %path.display(), issuers = config.issuers.len(), "login socket open");
    tokio::spawn(crate::people::socket::serve(listener, people.clone()));
    Ok(Some(path))
}

/// Ends every session the way PostgreSQL's fast shutdown does (FATAL 57P01, the running
/// statement cancelled), each writing its end record, and waits for them up to
/// `shutdown_timeout_secs`. Nothing registers once this begins.
async fn drain(shared: &Shared) {
    let timeout = Duration::from_secs(
        shared
            .settings
            .current()
            .config
            .limits
            .shutdown_timeout_secs,
    );
    let live = shared.registry.close();
    if live == 0 {
        return;
    }
    info!(sessions = live, "draining: every session is told 57P01");
    match tokio::time::timeout(timeout, shared.registry.drained()).await {
        Ok(()) => info!(sessions = live, "drained: every session ended"),
        Err(_) => error!(
            left = shared.registry.len(),
            "sessions still open after {}s (limits.shutdown_timeout_secs); exiting anyway",
            timeout.as_secs()
        ),
    }
}

/// An `exe:` mapping matches only an executable the kernel recorded at connect(): said at start
/// and after each reload (a mapping added by SIGHUP that can match nobody is as silent as a
/// typo otherwise).
fn warn_about_exe_mappings(config: &Config) {
    if let Some(m) = config
        .mappings
        .iter()
        .find(|m| m.principal.starts_with("exe:"))
    {
        let recorded = config.interception.is_some() && crate::redirect::kernel_has_btf();
        if !recorded {
            tracing::warn!(
                principal = %m.principal,
                "exe: principals match only an executable the kernel recorded at connect() \
                 (eBPF interception on a kernel with BTF); without it, this mapping matches nobody"
            );
        } else if config.listen.unix.is_some() {
            tracing::info!(
                principal = %m.principal,
                "exe: principals never match unix-socket clients (their executable is /proc's \
                 word, not the kernel's record)"
            );
        }
    }
}

/// Reads pgiam.toml again (SIGHUP): taken whole or refused whole; what cannot change while
/// running is reported and kept; sessions the new mappings no longer allow are ended as on a
/// revocation.
fn reload_settings(shared: &Shared, endpoints_changed: &tokio::sync::Notify) {
    let metrics = crate::metrics::get();
    let reloaded = match shared.settings.reload() {
        Ok(r) => r,
        Err(e) => {
            metrics.reloaded("config", false);
            error!(
                "SIGHUP: {} not reloaded, the settings in force stay: {e}",
                shared.settings.path().display()
            );
            return;
        }
    };
    metrics.reloaded("config", true);
    // Backends logged in under the old settings (credentials, TLS, server) are not handed on.
    shared.pools.renew();
    let config = shared.settings.current().config.clone();
    info!(
        generation = reloaded.generation,
        mappings = config.mappings.len(),
        roles = config.roles.len(),
        "SIGHUP: {} reloaded",
        shared.settings.path().display()
    );
    warn_about_exe_mappings(&config);
    for change in &reloaded.weakened {
        warn!(change = %change, "SIGHUP: applied a change that removes protection");
    }
    if !reloaded.kept.is_empty() {
        warn!(
            kept = ?reloaded.kept,
            "SIGHUP: these settings changed in the file but only change with a restart; kept as they were"
        );
    }
    // (A logged-in person is mapped as their login is now: a refresh may have changed their
    // groups since the session began.)
    let unmapped = shared.registry.order(
        |live| {
            let f = &live.facts;
            !config
                .find_mapping(&shared.people.principals_now(&f.identity), &f.database)
                .is_some_and(|m| m.principal == *f.principal && m.role == *f.role)
        },
        &crate::admin::registry::Order::Unmapped,
    );
    if !unmapped.is_empty() {
        info!(sessions = ?unmapped, "SIGHUP: sessions whose mapping no longer holds are ended");
    }
    endpoints_changed.notify_one();
}

/// Every (prefix, port) the configuration names, with host names resolved now; and pgiam's
/// own TCP listeners: a client in the intercepted subtree that dials pgiam directly has its
/// connect() recorded by the kernel too (uid, cgroup, executable at connect time, where /proc
/// read after accept could already name another executable), and "redirected" to where it was
/// going.
async fn resolve_endpoints(
    ic: &config::Interception,
    listen: &config::Listen,
) -> anyhow::Result<Vec<Endpoint>> {
    let mut out: Vec<Endpoint> = [listen.tcp, listen.tcp6]
        .into_iter()
        .flatten()
        .map(|a| Endpoint {
            addr: a.ip(),
            prefix: if a.is_ipv4() { 32 } else { 128 },
            port: a.port(),
        })
        .collect();
    for spec in &ic.endpoints {
        let nets: Vec<(std::net::IpAddr, u8)> =
            match EndpointSpec::parse(spec).map_err(anyhow::Error::msg)? {
                EndpointSpec::Net { addr, prefix } => vec![(addr, prefix)],
                EndpointSpec::Host(host) => tokio::net::lookup_host((host.as_str(), 0))
                    .await
                    .with_context(|| format!("resolving {host}"))?
                    .map(|a| (a.ip(), if a.is_ipv4() { 32 } else { 128 }))
                    .collect(),
            };
        for (addr, prefix) in nets {
            for &port in &ic.ports {
                out.push(Endpoint { addr, prefix, port });
            }
        }
    }
    Ok(out)
}

/// Host names move: resolve them again periodically, and at once when a reload changed them.
/// A failed resolution keeps the last set.
async fn refresh_endpoints(
    settings: Arc<Settings>,
    interception: Arc<Mutex<Interception>>,
    changed: Arc<tokio::sync::Notify>,
) {
    loop {
        let Some(ic) = settings.current().config.interception.clone() else {
            return;
        };
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(ic.resolve_interval_secs)) => {}
            () = changed.notified() => {}
        }
        // What a reload may just have put in place.
        let Some(ic) = settings.current().config.interception.clone() else {
            return;
        };
        let listen = settings.current().config.listen.clone();
        match resolve_endpoints(&ic, &listen).await {
            Ok(endpoints) => {
                let mut i = interception.lock().unwrap_or_else(|e| e.into_inner());
                if let Err(e) = i.set_endpoints(&endpoints) {
                    error!("updating intercepted endpoints: {e}");
                }
            }
            Err(e) => error!("resolving interception endpoints (keeping the last set): {e:#}"),
        }
    }
}

/// Tells systemd (Type=notify) about state changes; a no-op outside systemd.
fn sd_notify(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let target = target.to_string_lossy().into_owned();
    let addr = match target.strip_prefix('@') {
        Some(abstract_name) => std::os::unix::net::SocketAddr::from_abstract_name(abstract_name),
        None => std::os::unix::net::SocketAddr::from_pathname(&target),
    };
    let sent = addr.and_then(|addr| {
        let sock = std::os::unix::net::UnixDatagram::unbound()?;
        sock.send_to_addr(state.as_bytes(), &addr)
    });
    if let Err(e) = sent {
        error!("sd_notify {state} to {target}: {e}");
    }
}

/// Binds a unix socket, replacing a stale socket file left by an earlier run (never any other
/// kind of file, nor a socket someone still answers on: another pgiam's).
fn bind_unix(path: &Path, mode: u32) -> anyhow::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        anyhow::ensure!(
            meta.file_type().is_socket(),
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        );
        anyhow::ensure!(
            std::os::unix::net::UnixStream::connect(path).is_err(),
            "{} is the socket of a running pgiam; refusing to take it over",
            path.display()
        );
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(listener)
}

/// Accept errors such as EMFILE are transient: log, back off briefly, keep serving.
async fn accept_failed(e: std::io::Error) {
    error!("accept failed: {e}");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

async fn accept_tcp(listener: TcpListener, shared: Arc<Shared>, interception: SharedInterception) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                accept_failed(e).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Ok(local) = stream.local_addr() else {
            continue;
        };
        // The kernel's record of a connection from the intercepted subtree (intercepted, or
        // dialling pgiam itself) is bound to this very socket: take it now. A client from
        // elsewhere is found through /proc.
        let origin = interception.as_ref().and_then(|i| {
            let cookie = redirect::socket_cookie(&stream).ok()?;
            i.lock()
                .unwrap_or_else(|e| e.into_inner())
                .take_origin(cookie)
        });
        // Where the client was going: the database's address for an intercepted connection;
        // none for one that dialled pgiam itself (recorded all the same: see
        // `resolve_endpoints`), which goes to the configured upstream, not back to pgiam.
        let destination = origin
            .as_ref()
            .map(redirect::original_destination)
            .filter(|d| *d != local);
        // The address the client dialled, which a TLS certificate names when the client sends
        // no server name.
        let dialled = Some(destination.map_or(local.ip(), |d| d.ip()));
        let identity = IdentitySource::Lookup(Box::new(move || match origin {
            Some(origin) => Ok(ClientOrigin {
                identity: Identity::from_origin(&origin, redirect::kernel_has_btf()),
                destination,
            }),
            None => identity::from_loopback_tcp(peer, local).map(ClientOrigin::from),
        }));
        tokio::spawn(session::run(
            shared.clone(),
            Box::new(stream),
            identity,
            peer.to_string(),
            dialled,
        ));
    }
}

async fn accept_unix(listener: UnixListener, shared: Arc<Shared>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                accept_failed(e).await;
                continue;
            }
        };
        let identity = IdentitySource::Known(Box::new(
            identity::from_unix_peer(&stream).map(ClientOrigin::from),
        ));
        let peer = match stream.peer_cred().ok().and_then(|c| c.pid()) {
            Some(pid) => format!("unix:pid={pid}"),
            None => "unix".to_owned(),
        };
        tokio::spawn(session::run(
            shared.clone(),
            Box::new(stream),
            identity,
            peer,
            None,
        ));
    }
}

/// Where the unix socket of a libpq-style `host=DIR port=PORT` lives.
pub fn libpq_socket_path(dir: &Path, port: u16) -> PathBuf {
    dir.join(format!(".s.PGSQL.{port}"))
}

/// Every client costs two descriptors (its socket and, once it speaks, the server's); the soft
/// limit is often 1024 while the hard one allows far more. (The systemd unit raises both.)
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => info!(from = soft, to = hard, "open file limit raised"),
            Err(e) => tracing::warn!("open file limit stays {soft}: {e}"),
        },
        Ok((soft, _)) => info!(limit = soft, "open file limit"),
        Err(e) => tracing::warn!("cannot read the open file limit: {e}"),
    }
}
