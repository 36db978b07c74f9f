//! Classification and authorization per statement, cached and uncached: what pgiam spends on a
//! statement before it is forwarded (apart from the audit record).
//!
//! `cargo bench -p pgiam-userspace --bench classify` (also run by `cargo xtask bench`). A plain
//! harness: each measurement repeats a statement until 200 ms have passed, five times, and
//! reports the median time per statement.

use std::hint::black_box;
use std::time::{Duration, Instant};

use pgiam::identity::Identity;
use pgiam::policy::{DecisionCache, Policy, Principal, Resolver};
use pgiam::sql;

const STATEMENTS: &[(&str, &str)] = &[
    ("pgbench select", "SELECT abalance FROM pgbench_accounts WHERE aid = 48213"),
    (
        "pgbench update",
        "UPDATE pgbench_accounts SET abalance = abalance + -1311 WHERE aid = 48213",
    ),
    (
        "pgbench insert",
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (7, 1, 48213, -1311, CURRENT_TIMESTAMP)",
    ),
    (
        "orm join",
        "SELECT o.id, o.total, c.name, c.email FROM orders o JOIN customers c ON c.id = o.customer_id \
         WHERE o.created_at > now() - interval '7 days' AND c.region = 'eu' ORDER BY o.created_at DESC LIMIT 50",
    ),
    (
        "cte report",
        "WITH recent AS (SELECT customer_id, sum(total) AS spent FROM orders WHERE created_at > now() - interval '30 days' \
         GROUP BY customer_id) SELECT c.name, r.spent FROM recent r JOIN customers c ON c.id = r.customer_id \
         WHERE r.spent > 1000 ORDER BY r.spent DESC",
    ),
    ("transaction", "BEGIN"),
];

const POLICY: &str = r#"
@id("connect") permit(principal, action == PgIam::Action::"connect", resource);
@id("tables") permit(principal, action in [PgIam::Action::"select", PgIam::Action::"insert", PgIam::Action::"update"],
  resource in PgIam::Schema::"app.public") when { principal has unit && principal.unit == "app.service" };
@id("functions") permit(principal, action == PgIam::Action::"execute", resource);
@id("no-files") forbid(principal, action == PgIam::Action::"execute", resource) when { resource.name like "pg_read*" };
@id("no-secrets") forbid(principal, action, resource == PgIam::Table::"app.public.secrets");
"#;

/// Median nanoseconds per call of `f`.
fn measure(mut f: impl FnMut()) -> f64 {
    let mut samples = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < Duration::from_millis(200) {
            f();
            n += 1;
        }
        samples.push(start.elapsed().as_nanos() as f64 / n as f64);
    }
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    samples[2]
}

fn main() {
    // `cargo test --benches` runs this with --test-ish arguments: measure only under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    // On a thread like pgiam's runtime threads, whose stack classification runs on in place.
    std::thread::Builder::new()
        .stack_size(pgiam::sql::CLASSIFY_STACK + (16 << 20))
        .spawn(measure_all)
        .expect("a thread")
        .join()
        .expect("the measurements");
}

fn measure_all() {
    let policy = Policy::parse(POLICY).expect("bench policy");
    let mut identity = Identity::for_principal("unit", "app.service").unwrap();
    identity.uid = 1000;
    let principal = Principal::new("unit:app.service", "app", "app", &identity);
    let resolver = Resolver::new(&["public".into()], "app");
    println!(
        "| statement | classify uncached µs | classify cached µs | classify, other literal µs | authorize uncached µs | authorize cached µs |"
    );
    println!("|---|---|---|---|---|---|");
    for (name, sql_text) in STATEMENTS {
        let classify = measure(|| {
            black_box(sql::classify(black_box(sql_text), true).unwrap());
        });
        let cached = measure(|| {
            black_box(sql::classify_cached(black_box(sql_text), true).unwrap());
        });
        // The same statement with another constant each time: served by shape.
        let other_literal = if sql_text.contains("48213") {
            let mut n = 0u64;
            let t = measure(|| {
                n += 1;
                let text = sql_text.replace("48213", &n.to_string());
                black_box(sql::classify_cached(black_box(&text), true).unwrap());
            });
            format!("{:.1}", t / 1e3)
        } else {
            "-".to_owned()
        };
        let statements = sql::classify(sql_text, true).unwrap();
        let asks: Vec<_> = statements.iter().flat_map(|s| resolver.asks(s)).collect();
        let authorize = measure(|| {
            black_box(policy.decide_all(&principal, black_box(&asks)));
        });
        let mut cache = DecisionCache::default();
        let authorize_cached = measure(|| {
            black_box(cache.decide_all(&policy, 0, &principal, black_box(&asks)));
        });
        println!(
            "| {name} | {:.1} | {:.2} | {other_literal} | {:.1} | {:.2} |",
            classify / 1e3,
            cached / 1e3,
            authorize / 1e3,
            authorize_cached / 1e3
        );
    }
}
