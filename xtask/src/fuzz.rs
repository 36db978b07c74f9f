//! `cargo xtask fuzz --minutes N`: the property tests of the decoders, the response matcher
//! and the classifier (`pgiam-userspace/src/properties.rs`, `session/responses.rs`), and the
//! differential test of the classifier against PostgreSQL's plans
//! (`tests/tests/proxy/differential.rs`), run in rounds of many cases with fresh seeds until
//! the time is up. Stable Rust (proptest), no nightly. A failing property input is minimized
//! and kept in `pgiam-userspace/proptest-regressions/`, which every later run (and `cargo
//! xtask test`) tries first; a differential failure prints its seed and query, kept by hand in
//! `tests/differential/regressions.sql`.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::{cargo, run};

/// Cases per property per round.
const CASES: u32 = 20_000;

/// Generated queries per round of the differential test (each planned by PostgreSQL).
const DIFFERENTIAL_CASES: u32 = 3_000;

/// The properties: test names as `cargo test` filters them.
const FILTERS: &[&str] = &["properties::", "the_matcher_never_panics"];

pub fn run_fuzz(args: &[String]) -> anyhow::Result<()> {
    let minutes: u64 = match args {
        [flag, n] if flag == "--minutes" => n
            .parse()
            .with_context(|| format!("--minutes takes a number, not {n:?}"))?,
        [] => 5,
        _ => bail!("usage: cargo xtask fuzz [--minutes N] (default 5)"),
    };
    // Built once, optimized: a round then spends its time on cases, not on the build (the
    // minutes count from after it; at least one round runs).
    run(cargo().args([
        "test",
        "--release",
        "-p",
        "pgiam-userspace",
        "--lib",
        "--no-run",
    ]))?;
    run(cargo().args([
        "test",
        "--release",
        "-p",
        "pgiam-tests",
        "--test",
        "proxy",
        "--no-run",
    ]))?;
    let until = Instant::now() + Duration::from_secs(minutes * 60);
    let mut rounds = 0u64;
    while rounds == 0 || Instant::now() < until {
        for filter in FILTERS {
            run(cargo()
                .args([
                    "test",
                    "--release",
                    "-p",
                    "pgiam-userspace",
                    "--lib",
                    "-q",
                    filter,
                ])
                .env("PROPTEST_CASES", CASES.to_string()))
            .with_context(|| format!("a property failed in round {}", rounds + 1))?;
        }
        run(cargo()
            .args([
                "test",
                "--release",
                "-p",
                "pgiam-tests",
                "--test",
                "proxy",
                "-q",
                "differential::",
            ])
            .env("PGIAM_DIFF_CASES", DIFFERENTIAL_CASES.to_string()))
        .with_context(|| format!("the differential test failed in round {}", rounds + 1))?;
        rounds += 1;
        eprintln!(
            "fuzz: round {rounds} done, {CASES} cases per property, {DIFFERENTIAL_CASES} queries planned by PostgreSQL"
        );
    }
    println!(
        "fuzz: {rounds} rounds of {CASES} cases per property and {DIFFERENTIAL_CASES} planned queries in {minutes} min, no failure"
    );
    Ok(())
}
