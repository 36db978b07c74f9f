//! Serves the metrics over HTTP on a loopback address (`[admin] metrics`), in the
//! OpenMetrics text format Prometheus scrapes: the counters and histograms of
//! [`crate::metrics`], and what is read at scrape time — open sessions, the audit log's
//! progress, revocations, the eBPF programs' counters.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::warn;

use super::registry::Registry as Sessions;
use super::revocations::Revocations;
use crate::audit::AuditLog;
use crate::pool::Pools;

/// What is read at each scrape.
struct Scraped {
    sessions: Arc<Sessions>,
    revocations: Arc<Revocations>,
    audit: Option<AuditLog>,
    bpffs: Option<PathBuf>,
    pools: Arc<Pools>,
}

/// (A [`Collector`] must be `Debug`.)
impl std::fmt::Debug for Scraped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scraped")
            .field("bpffs", &self.bpffs)
            .finish_non_exhaustive()
    }
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

impl Collector for Scraped {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        gauge(
            &mut e,
            "sessions_open",
            "Sessions open now",
            self.sessions.len() as i64,
        )?;
        gauge(
            &mut e,
            "revocations",
            "Principals revoked now",
            self.revocations.list().len() as i64,
        )?;
        let pooled = self.pools.occupancy();
        {
            let family = ConstGauge::new(0i64);
            let mut m = e.encode_descriptor(
                "pool_backends",
                "Pooled backends open now, by state: in_use (a session's, or being reset) or idle",
                None,
                family.metric_type(),
            )?;
            for (state, n) in [("in_use", pooled.in_use), ("idle", pooled.idle)] {
                ConstGauge::new(n as i64).encode(m.encode_family(&[("state", state)])?)?;
            }
        }
        gauge(
            &mut e,
            "pool_waiting_sessions",
            "Sessions waiting in a pool's queue for a backend",
            pooled.waiting as i64,
        )?;
        if let Some(log) = &self.audit {
            let s = log.status();
            counter(
                &mut e,
                "audit_records",
                "Audit records sealed onto the chain",
                s.sealed,
            )?;
            gauge(
                &mut e,
                "audit_unwritten_records",
                "Audit records sealed and not yet written to the kernel (lingering completions)",
                s.sealed.saturating_sub(s.written) as i64,
            )?;
            gauge(
                &mut e,
                "audit_unsynced_records",
                "Audit records written and not yet on the device: the flush queue",
                s.written.saturating_sub(s.synced) as i64,
            )?;
            gauge(
                &mut e,
                "audit_failed",
                "1 when the audit log no longer takes records (statements are refused)",
                i64::from(s.failed.is_some()),
            )?;
        }
        if let Some(dir) = &self.bpffs {
            match crate::redirect::read_stats(dir) {
                Ok(stats) => {
                    let family = ConstCounter::new(0u64);
                    let mut m = e.encode_descriptor(
                        "ebpf_events",
                        "Events counted by the eBPF programs: connects seen, redirected, fallbacks",
                        None,
                        family.metric_type(),
                    )?;
                    for (event, value) in stats {
                        let labels = [("event", event)];
                        ConstCounter::new(value).encode(m.encode_family(&labels)?)?;
                    }
                }
                Err(err) => warn!("metrics: eBPF counters unreadable: {err}"),
            }
        }
        Ok(())
    }
}

/// Binds the metrics address; only loopback addresses are accepted (checked by the config).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))
}

/// Serves `/metrics` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    sessions: Arc<Sessions>,
    revocations: Arc<Revocations>,
    audit: Option<AuditLog>,
    bpffs: Option<PathBuf>,
    pools: Arc<Pools>,
) {
    let mut registry = Registry::with_prefix("pgiam");
    crate::metrics::get().register(&mut registry);
    registry.register_collector(Box::new(Scraped {
        sessions,
        revocations,
        audit,
        bpffs,
        pools,
    }));
    let registry = Arc::new(registry);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!("metrics: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let registry = registry.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&req, &registry)) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, service);
            // A scraper that stalls does not hold its connection for ever.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), conn).await;
        });
    }
}

fn answer<B>(req: &Request<B>, registry: &Registry) -> Response<Full<Bytes>> {
    let respond = |status, content_type, body: String| {
        Response::builder()
            .status(status)
            .header(hyper::header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    };
    if req.method() != Method::GET || req.uri().path() != "/metrics" {
        return respond(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "pgiam serves GET /metrics only\n".into(),
        );
    }
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body,
        ),
        Err(_) => respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain; charset=utf-8",
            "encoding the metrics failed\n".into(),
        ),
    }
}
