//! pgiam's Prometheus metrics, bumped where things happen: sessions and refusals, statement
//! decisions, latencies of deciding, auditing and connecting upstream, bytes relayed, reloads.
//! What is read at scrape time instead (open sessions, the audit's progress, the eBPF
//! counters) is collected by `admin::metrics`, which also serves them.
//!
//! One process-wide set ([`get`]), as the counters are process-wide facts; no label carries SQL
//! text or anything unbounded: label values are fixed words, statement commands, and the roles
//! the configuration maps to.

use std::sync::OnceLock;
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

type Static<const N: usize> = [(&'static str, &'static str); N];

pub struct Metrics {
    /// Sessions past the connect decision, by role.
    pub sessions: Family<[(&'static str, String); 1], Counter>,
    /// Sessions refused before they started, by reason.
    pub refusals: Family<Static<1>, Counter>,
    /// Sessions ended by an order (kill, revoke, shutdown) or by a policy revocation.
    pub ended: Family<Static<1>, Counter>,
    /// Statement decisions, by decision and command.
    pub statements: Family<Static<2>, Counter>,
    /// Classifying and authorizing one client message.
    pub decision: Histogram,
    /// Sealing and writing a batch of records to the kernel.
    pub audit_write: Histogram,
    /// One group flush (fdatasync of the write-ahead ring).
    pub audit_flush: Histogram,
    /// Opening and logging in an upstream connection.
    pub upstream_connect: Histogram,
    pub upstream_errors: Counter,
    /// Bytes relayed, by direction; the two members below are handles into it (a counter's
    /// clone shares its value), so the relay bumps them without a lookup.
    relayed: Family<Static<1>, Counter>,
    pub bytes_from_clients: Counter,
    pub bytes_to_clients: Counter,
    /// Reloads, by what and outcome.
    pub reloads: Family<Static<2>, Counter>,
    /// Pooled backends handed to sessions, by outcome (reused, opened, timeout); `checkouts`
    /// are its members, in [`Checkout`]'s order (a checkout per transaction, when pooled so).
    pool_checkouts: Family<Static<1>, Counter>,
    checkouts: [Counter; 3],
    /// Resets of pooled backends, by outcome (clean, failed).
    pub pool_resets: Family<Static<1>, Counter>,
    /// Relays given back by idle sessions (built again when either side speaks).
    pub rested: Counter,
}

/// How a session's wait for a pooled backend ended.
#[derive(Debug, Clone, Copy)]
pub enum Checkout {
    Reused,
    Opened,
    Timeout,
}

impl Checkout {
    const ALL: [Checkout; 3] = [Checkout::Reused, Checkout::Opened, Checkout::Timeout];

    fn label(self) -> &'static str {
        match self {
            Checkout::Reused => "reused",
            Checkout::Opened => "opened",
            Checkout::Timeout => "timeout",
        }
    }
}

/// The process's metrics.
pub fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let relayed = Family::<Static<1>, Counter>::default();
        let member = |direction| relayed.get_or_create(&[("direction", direction)]).clone();
        let (bytes_from_clients, bytes_to_clients) =
            (member("client_to_server"), member("server_to_client"));
        let pool_checkouts = Family::<Static<1>, Counter>::default();
        let checkouts = Checkout::ALL.map(|c| {
            pool_checkouts
                .get_or_create(&[("outcome", c.label())])
                .clone()
        });
        Metrics {
            sessions: Family::default(),
            refusals: Family::default(),
            ended: Family::default(),
            statements: Family::default(),
            // 1 µs … 33 ms
            decision: Histogram::new(exponential_buckets(1e-6, 2.0, 16)),
            audit_write: Histogram::new(exponential_buckets(1e-6, 2.0, 16)),
            // 16 µs … 520 ms: a flush on these VMs is ≈ 200 µs, a loaded disk far more.
            audit_flush: Histogram::new(exponential_buckets(16e-6, 2.0, 16)),
            upstream_connect: Histogram::new(exponential_buckets(100e-6, 2.0, 16)),
            upstream_errors: Counter::default(),
            relayed,
            bytes_from_clients,
            bytes_to_clients,
            reloads: Family::default(),
            pool_checkouts,
            checkouts,
            pool_resets: Family::default(),
            rested: Counter::default(),
        }
    })
}

impl Metrics {
    pub fn session(&self, role: &str) {
        self.sessions
            .get_or_create(&[("role", role.to_owned())])
            .inc();
    }

    pub fn refused(&self, reason: &'static str) {
        self.refusals.get_or_create(&[("reason", reason)]).inc();
    }

    pub fn ended_by(&self, why: &'static str) {
        self.ended.get_or_create(&[("by", why)]).inc();
    }

    /// Counted per statement: each thread keeps the counters it has used, so the family's
    /// lock and the hashing of its labels are paid once per command, not per statement. (The
    /// thread's counters are [`get`]'s: there is no other `Metrics`.)
    pub fn decided(&self, allowed: bool, command: &'static str) {
        debug_assert!(std::ptr::eq(self, get()));
        thread_local! {
            static USED: std::cell::RefCell<Vec<(bool, &'static str, Counter)>> =
                const { std::cell::RefCell::new(Vec::new()) };
        }
        USED.with_borrow_mut(|used| {
            if let Some((.., c)) = used.iter().find(|(a, c, _)| *a == allowed && *c == command) {
                c.inc();
                return;
            }
            let decision = if allowed { "allow" } else { "deny" };
            let counter = self
                .statements
                .get_or_create(&[("decision", decision), ("command", command)])
                .clone();
            counter.inc();
            used.push((allowed, command, counter));
        });
    }

    pub fn reloaded(&self, what: &'static str, ok: bool) {
        let outcome = if ok { "ok" } else { "failed" };
        self.reloads
            .get_or_create(&[("what", what), ("outcome", outcome)])
            .inc();
    }

    pub fn pool_checkout(&self, outcome: Checkout) {
        self.checkouts[outcome as usize].inc();
    }

    pub fn pool_reset(&self, clean: bool) {
        let outcome = if clean { "clean" } else { "failed" };
        self.pool_resets
            .get_or_create(&[("outcome", outcome)])
            .inc();
    }

    /// Every metric above in a registry, under `pgiam_`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry;
        r.register(
            "sessions",
            "Sessions past the connect decision, by role",
            self.sessions.clone(),
        );
        r.register(
            "session_refusals",
            "Sessions refused before they started, by reason",
            self.refusals.clone(),
        );
        r.register(
            "sessions_ended",
            "Sessions ended by pgiam: an operator's kill or revoke, the drain, a policy revocation",
            self.ended.clone(),
        );
        r.register(
            "statements",
            "Statement decisions, by decision and command",
            self.statements.clone(),
        );
        r.register_with_unit(
            "decision_duration",
            "Classifying and authorizing one client message",
            Unit::Seconds,
            self.decision.clone(),
        );
        r.register_with_unit(
            "audit_write_duration",
            "Sealing a batch of audit records and writing it to the kernel",
            Unit::Seconds,
            self.audit_write.clone(),
        );
        r.register_with_unit(
            "audit_flush_duration",
            "One group flush of the audit log to the device",
            Unit::Seconds,
            self.audit_flush.clone(),
        );
        r.register_with_unit(
            "upstream_connect_duration",
            "Connecting and logging in to the database",
            Unit::Seconds,
            self.upstream_connect.clone(),
        );
        r.register(
            "upstream_connect_errors",
            "Upstream connections or logins that failed",
            self.upstream_errors.clone(),
        );
        r.register_with_unit(
            "relayed",
            "Bytes relayed, by direction",
            Unit::Bytes,
            self.relayed.clone(),
        );
        r.register(
            "reloads",
            "Reloads of the policy, by outcome",
            self.reloads.clone(),
        );
        r.register(
            "pool_checkouts",
            "Pooled backends asked for by sessions, by outcome: reused, opened, or timeout (the queue's wait ran out)",
            self.pool_checkouts.clone(),
        );
        r.register(
            "pool_resets",
            "Resets of pooled backends whose sessions ended, by outcome: clean (kept) or failed (closed)",
            self.pool_resets.clone(),
        );
        r.register(
            "sessions_rested",
            "Times an idle session gave back its relay (its buffers and per-request state) until the client or the server spoke again",
            self.rested.clone(),
        );
    }
}

/// Times what it wraps into a histogram.
pub fn timed<T>(histogram: &Histogram, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let r = f();
    histogram.observe(start.elapsed().as_secs_f64());
    r
}
