//! The listeners: accept clients, find who they are, and hand each to its own session task.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info};

use crate::cancel::CancelRegistry;
use crate::config::Config;
use crate::identity;
use crate::session::{self, IdentitySource, Shared};
use crate::upstream::Upstream;

/// Runs the proxy until SIGTERM or SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let tls =
        crate::tls::client_acceptor(&config.client_tls, &config.state_dir).context("client TLS")?;
    let upstream = Arc::new(Upstream::new(&config).context("upstream TLS")?);
    let shared = Arc::new(Shared {
        config: Arc::new(config.clone()),
        tls,
        upstream,
        cancels: Arc::new(CancelRegistry::default()),
    });

    let mut unix_path = None;
    if let Some(addr) = config.listen.tcp {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        info!(%addr, "listening on TCP (identity from /proc)");
        tokio::spawn(accept_tcp(listener, shared.clone()));
    }
    if let Some(path) = &config.listen.unix {
        let listener = bind_unix(path, config.listen.unix_mode)?;
        info!(path = %path.display(), "listening on unix socket (identity from SO_PEERCRED)");
        unix_path = Some(path.clone());
        tokio::spawn(accept_unix(listener, shared.clone()));
    }
    info!(upstream = %shared.upstream.describe(), "pgiam ready");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
    }
    if let Some(path) = unix_path {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// Binds the unix socket, replacing a stale socket file left by an earlier run (never any other
/// kind of file).
fn bind_unix(path: &Path, mode: u32) -> anyhow::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        anyhow::ensure!(
            meta.file_type().is_socket(),
            "{} exists and is not a socket; refusing to replace it",
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

async fn accept_tcp(listener: TcpListener, shared: Arc<Shared>) {
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
        let identity =
            IdentitySource::Lookup(Box::new(move || identity::from_loopback_tcp(peer, local)));
        tokio::spawn(session::run(
            shared.clone(),
            Box::new(stream),
            identity,
            peer.to_string(),
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
        let identity = IdentitySource::Known(identity::from_unix_peer(&stream));
        let peer = match stream.peer_cred().ok().and_then(|c| c.pid()) {
            Some(pid) => format!("unix:pid={pid}"),
            None => "unix".to_owned(),
        };
        tokio::spawn(session::run(
            shared.clone(),
            Box::new(stream),
            identity,
            peer,
        ));
    }
}

/// Where the unix socket of a libpq-style `host=DIR port=PORT` lives.
pub fn libpq_socket_path(dir: &Path, port: u16) -> PathBuf {
    dir.join(format!(".s.PGSQL.{port}"))
}
