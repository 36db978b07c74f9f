//! Malformed input closes that client with a clear error, and nothing else.

use std::net::Shutdown;

use crate::fixture::*;

fn small_limits() -> Setup {
    Setup {
        limits: "max_message_size = 65536\nstartup_timeout_secs = 2".into(),
        ..Setup::default()
    }
}

fn live_session(env: &Env) -> Raw {
    let mut raw = Raw::connect(env.tcp);
    raw.startup();
    raw.until_ready();
    raw
}

fn still_works(env: &Env, live: &mut Raw) {
    live.send(&query_bytes("select 42"));
    let msgs = live.until_ready();
    assert!(
        msgs.iter().any(|(t, b)| *t == b'D' && b.ends_with(b"42")),
        "{msgs:?}"
    );
    assert_eq!(psql_ok(&env.tcp_dsn(""), "select 1"), "1");
}

#[test]
fn malformed_startup_packets() {
    let env = Env::with(small_limits());
    let mut live = live_session(&env);
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "length 0",
            vec![0, 0, 0, 0, 0, 3, 0, 0],
            "08P01",
            "invalid startup packet length 0",
        ),
        (
            "length 3",
            vec![0, 0, 0, 3, 0, 3, 0, 0],
            "08P01",
            "invalid startup packet length 3",
        ),
        (
            "length over the cap",
            vec![0, 1, 0, 0, 0, 3, 0, 0],
            "08P01",
            "invalid startup packet length",
        ),
        (
            "unknown request code",
            vec![0, 0, 0, 8, 0x04, 0xd2, 0x99, 0x99],
            "0A000",
            "unsupported frontend protocol 1234",
        ),
        (
            "protocol 2.0",
            Raw::startup_bytes(2 << 16, &[("user", "x")]),
            "0A000",
            "unsupported frontend protocol 2.0",
        ),
        (
            "a Query before startup",
            query_bytes("select 1"),
            "08P01",
            "invalid startup packet length",
        ),
        (
            "no final NUL",
            vec![0, 0, 0, 12, 0, 3, 0, 0, b'u', 0, b'x', 0],
            "08P01",
            "missing NUL",
        ),
        (
            "no user",
            Raw::startup_bytes(3 << 16, &[("database", DB)]),
            "28000",
            "no PostgreSQL user name",
        ),
        (
            "a Query pipelined behind the startup",
            {
                let mut b = Raw::startup_bytes(3 << 16, &[("user", "x"), ("database", DB)]);
                b.extend(query_bytes("select 1"));
                b
            },
            "08P01",
            "before authentication completed",
        ),
    ];
    for (what, bytes, code, message) in cases {
        let mut raw = Raw::connect(env.tcp);
        raw.send(&bytes);
        let (c, m) = raw.expect_fatal();
        assert_eq!(c, code, "{what}: {m}");
        assert!(
            m.contains(message),
            "{what}: {m:?} should mention {message:?}"
        );
    }

    // A client that stops mid-packet, and one that never sends anything (startup timeout).
    let mut raw = Raw::connect(env.tcp);
    raw.send(&[0, 0, 0, 40, 0, 3]);
    raw.stream.shutdown(Shutdown::Write).unwrap();
    raw.expect_closed();
    let mut raw = Raw::connect(env.tcp);
    let (code, m) = raw.expect_fatal();
    assert_eq!(code, "08006", "{m}");
    assert!(m.contains("not established within 2s"), "{m}");

    still_works(&env, &mut live);
}

#[test]
fn malformed_messages_in_a_session() {
    let env = Env::with(small_limits());
    let mut live = live_session(&env);
    let mut bind_bad = vec![
        b'B', 0, 0, 0, 18, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0x10, b'x',
    ];
    bind_bad[4] = (bind_bad.len() - 1) as u8;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "length 0",
            vec![b'Q', 0, 0, 0, 0],
            "invalid message length 0",
        ),
        (
            "length 2",
            vec![b'Q', 0, 0, 0, 2],
            "invalid message length 2",
        ),
        (
            "length over the maximum",
            vec![b'Q', 0, 0x10, 0, 0],
            "exceeds the maximum message size of 65536",
        ),
        (
            "unknown type",
            vec![b'z', 0, 0, 0, 4],
            "unknown frontend message type 'z'",
        ),
        (
            "a Bind whose value overruns it",
            bind_bad,
            "malformed Bind message",
        ),
        (
            "a password after login",
            vec![b'p', 0, 0, 0, 6, b'x', 0],
            "not expected after authentication",
        ),
    ];
    for (what, bytes, message) in cases {
        let mut raw = live_session(&env);
        raw.send(&bytes);
        eprintln!("case: {what}");
        let (code, m) = raw.expect_fatal();
        assert_eq!(code, "08P01", "{what}: {m}");
        assert!(
            m.contains(message),
            "{what}: {m:?} should mention {message:?}"
        );
    }

    // Stops in the middle of a message: pgiam ends the backend too.
    let mut raw = live_session(&env);
    raw.send(&query_bytes("select 1")[..6]);
    raw.stream.shutdown(Shutdown::Write).unwrap();
    drop(raw);
    // Valid messages before a bad one are still executed, as the server would have.
    let mut raw = live_session(&env);
    let mut bytes = query_bytes("create table before_bad(x int)");
    bytes.extend_from_slice(&[b'Q', 0, 0, 0, 1]);
    raw.send(&bytes);
    let mut tags = Vec::new();
    while let Some((tag, body)) = raw.read() {
        tags.push((char::from(tag), String::from_utf8_lossy(&body).into_owned()));
    }
    assert!(tags.iter().any(|(t, _)| *t == 'C'), "{tags:?}");
    assert_eq!(
        env.pg
            .psql_db(
                DB,
                "select count(*) from pg_tables where tablename = 'before_bad'"
            )
            .unwrap(),
        "1"
    );

    // Only the live session's backend remains.
    let remaining = env.direct_until(
        &format!("select count(*) from pg_stat_activity where usename = '{ROLE}'"),
        "1",
    );
    assert_eq!(remaining, "1", "backends of closed clients must be gone");
    still_works(&env, &mut live);
}

#[test]
fn protocol_negotiation() {
    let env = Env::start();
    // 3.2 with a protocol option: NegotiateProtocolVersion(3.0, the option) first.
    let mut raw = Raw::connect(env.tcp);
    raw.send(&Raw::startup_bytes(
        (3 << 16) | 2,
        &[("user", "x"), ("database", DB), ("_pq_.test_option", "1")],
    ));
    let msgs = raw.until_ready();
    let (tag, body) = &msgs[0];
    assert_eq!(*tag, b'v', "NegotiateProtocolVersion comes first");
    assert_eq!(
        &body[0..4],
        &0i32.to_be_bytes(),
        "newest minor supported is 0"
    );
    assert_eq!(&body[4..8], &1i32.to_be_bytes());
    assert_eq!(&body[8..], b"_pq_.test_option\0");
    assert_eq!(msgs[1].0, b'R');

    // GSSENCRequest is declined, then a plain startup proceeds.
    let mut raw = Raw::connect(env.tcp);
    raw.send(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30]);
    assert_eq!(raw.read_byte(), Some(b'N'));
    raw.startup();
    raw.until_ready();

    // Plaintext pipelined behind an SSLRequest would be read as if it were protected: refused.
    let mut raw = Raw::connect(env.tcp);
    let mut bytes = vec![0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    bytes.extend(Raw::startup_bytes(3 << 16, &[("user", "x")]));
    raw.send(&bytes);
    let (code, _) = raw.expect_fatal();
    assert_eq!(code, "08P01");
}

/// The fields of an ErrorResponse body, by their one-byte codes.
fn error_fields(body: &[u8]) -> std::collections::HashMap<u8, String> {
    let mut out = std::collections::HashMap::new();
    let mut rest = body;
    while let Some((&code, tail)) = rest.split_first() {
        if code == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap();
        out.insert(code, String::from_utf8_lossy(&tail[..end]).into_owned());
        rest = &tail[end + 1..];
    }
    out
}

/// A statement pgiam cannot parse is answered as the server answers one: 42601 with the
/// position the parser stopped at (in characters), which psql and drivers point at.
#[test]
fn a_syntax_error_says_where_as_the_server_does() {
    let env = Env::start();
    let sql = "SELECT 'é', 1 FORM items";
    let direct = {
        let out = std::process::Command::new(pgiam_tests::pg_bin_dir().join("psql"))
            .args(["-X", "-h"])
            .arg(&env.pg.socket_dir)
            .args(["-p", &env.pg.port.to_string(), "-U", "postgres", "-c", sql])
            .output()
            .unwrap();
        stderr(&out)
    };
    let mut raw = live_session(&env);
    raw.send(&query_bytes(sql));
    let msgs = raw.until_ready();
    let (_, body) = msgs
        .iter()
        .find(|(t, _)| *t == b'E')
        .unwrap_or_else(|| panic!("{msgs:?}"));
    let fields = error_fields(body);
    assert_eq!(fields[&b'C'], "42601");
    // What is wrong with it, as the server says, not a permission.
    assert_eq!(
        fields[&b'M'],
        "pgiam: cannot parse the statement: syntax error at or near \"items\""
    );
    assert_eq!(
        fields.get(&b'P').map(String::as_str),
        Some("20"),
        "{fields:?}"
    );
    // psql draws the same caret under the same character as for the server's own error.
    let through = stderr(&psql(&env.tcp_dsn(""), sql));
    let caret = |s: &str| {
        s.lines()
            .skip_while(|l| !l.starts_with("LINE 1:"))
            .take(2)
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(!caret(&direct).is_empty(), "{direct}");
    assert_eq!(caret(&through), caret(&direct), "{through}\n{direct}");
}

#[test]
fn a_message_left_half_sent_ends_the_session_instead_of_holding_its_backend() {
    // Longer than the relay's once-a-second clock: a wake-up that brings nothing must not
    // start the count again (it once did, and the session waited for good).
    let env = Env::with(Setup {
        limits: "message_timeout_secs = 3".into(),
        ..Setup::default()
    });
    let backends = || {
        env.direct(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = '{ROLE}'"
        ))
    };
    // A Query header promising 100 bytes, and 5 of them.
    let half: Vec<u8> = [&b"Q"[..], &104i32.to_be_bytes(), b"SELEC"].concat();

    // (PostgreSQL itself has no such bound: a backend waits for the rest of a message as long
    // as its connection lives.)
    let mut raw = Raw::connect(env.tcp);
    raw.startup();
    raw.until_ready();
    assert_eq!(backends(), "1");
    raw.send(&half);
    let (code, message) = raw.expect_fatal();
    assert_eq!(code, "08P01");
    assert!(message.contains("part of a message"), "{message}");
    for _ in 0..100 {
        if backends() == "0" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(backends(), "0", "the server connection was closed");
}

/// Sends `statements` × (Parse, Bind, Execute) and then one Sync, reading the answers as they
/// come (as a driver's reader does), until the ReadyForQuery that answers the Sync.
fn pipeline_without_sync(raw: &mut Raw, statements: usize) {
    use std::io::{Read, Write};
    let frame = |tag: u8, body: &[u8]| {
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        m.extend_from_slice(body);
        m
    };
    let one = [
        frame(b'P', b"\0SELECT 1\0\0\0"),
        frame(b'B', b"\0\0\0\0\0\0\0\0"),
        frame(b'E', b"\0\0\0\0\0"),
    ]
    .concat();
    let mut writer = raw.stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let chunk = one.repeat(1000);
        for _ in 0..statements / 1000 {
            writer.write_all(&chunk).unwrap();
        }
        writer.write_all(&[b'S', 0, 0, 0, 4]).unwrap();
    });
    let mut tail = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = raw.stream.read(&mut buf).unwrap();
        assert!(n > 0, "closed before ReadyForQuery");
        tail.extend_from_slice(&buf[..n]);
        if tail.ends_with(&[b'Z', 0, 0, 0, 5, b'I']) {
            break;
        }
        let keep = tail.len().saturating_sub(16);
        tail.drain(..keep);
    }
    sender.join().unwrap();
}

/// A client that pipelines far ahead of the server (no Sync until the end) is read no further
/// once 16,384 requests are unanswered: pgiam's memory stays bounded (~200 bytes a request
/// would otherwise pile up: 240,000 statements are 720,000 requests, ~120 MiB).
#[test]
fn a_pipeline_far_ahead_of_the_server_is_pushed_back_not_buffered() {
    let _alone = measuring_alone();
    // `buffered`: no write-ahead ring, whose batches between two flushes would be measured
    // too (they follow the disk's speed, not the pipeline).
    let env = Env::with(Setup {
        extra: "durability = \"buffered\"".into(),
        ..Setup::default()
    });
    let mut raw = Raw::connect(env.tcp);
    raw.startup();
    raw.until_ready();
    // Warmed up first: the audit log's ring and the buffers are allocated once, not per request.
    pipeline_without_sync(&mut raw, 10_000);
    let before = pgiam_tests::status_kib(env.pgiam.pid(), "VmHWM");
    pipeline_without_sync(&mut raw, 240_000);
    let grown = pgiam_tests::status_kib(env.pgiam.pid(), "VmHWM").saturating_sub(before);
    eprintln!("pgiam's peak grew {grown} KiB for 240,000 pipelined statements");
    // With the cap the peak does not follow the pipeline's length: 19-25 MiB alone, up to 37
    // with the other tests beside it (the relay and the log's writer then fall further
    // behind); without the cap it does (~60 MiB for 120,000 statements, ~120 for these). The
    // pipeline is long enough that the two stay far apart under load too.
    assert!(grown < 64 * 1024, "pgiam held the pipeline: {grown} KiB");
    // And the session still works.
    raw.send(&query_bytes("SELECT 1"));
    raw.until_ready();
}
