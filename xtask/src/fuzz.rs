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

/// The library's property tests, and the proxy tests (where the differential test is).
const LIB: &[&str] = &["-p", "pgiam-userspace", "--lib"];
const PROXY: &[&str] = &["-p", "pgiam-tests", "--test", "proxy"];

/// `cargo test --release` of `target`, with `rest`.
fn release_test(target: &[&str], rest: &[&str]) -> std::process::Command {
    let mut c = cargo();
    c.args(["test", "--release"]).args(target).args(rest);
    c
}

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
    run(&mut release_test(LIB, &["--no-run"]))?;
    run(&mut release_test(PROXY, &["--no-run"]))?;
    let until = Instant::now() + Duration::from_secs(minutes * 60);
    let mut rounds = 0u64;
    while rounds == 0 || Instant::now() < until {
        for filter in FILTERS {
            run(release_test(LIB, &["-q", filter]).env("PROPTEST_CASES", CASES.to_string()))
                .with_context(|| format!("a property failed in round {}", rounds + 1))?;
        }
        run(release_test(PROXY, &["-q", "differential::"])
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
