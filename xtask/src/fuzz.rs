//! `cargo xtask fuzz --minutes N`: the property tests of the decoders, the response matcher
//! and the classifier (`pgiam-userspace/src/properties.rs`, `session/responses.rs`), run in
//! rounds of many cases with fresh seeds until the time is up. Stable Rust (proptest), no
//! nightly. A failing input is minimized and kept in `pgiam-userspace/proptest-regressions/`,
//! which every later run (and `cargo xtask test`) tries first.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::{cargo, run};

/// Cases per property per round.
const CASES: u32 = 20_000;

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
        rounds += 1;
        eprintln!("fuzz: round {rounds} done, {CASES} cases per property");
    }
    println!("fuzz: {rounds} rounds of {CASES} cases per property in {minutes} min, no failure");
    Ok(())
}
