//! A corpus of malformed and abusive byte-level inputs, in the startup phase and inside a
//! session, each sent on its own connection. Where PostgreSQL answers a malformed message with
//! an ERROR and goes on (a Bind's format counts or codes), pgiam ends the session (FATAL 08P01):
//! it does not forward what it cannot read as the server would. Each must end as stated (a FATAL or an ERROR with
//! its SQLSTATE, an answer without error, or a silent close) within the read timeout; across
//! the corpus nothing the policy refuses reaches the database, a startup-phase input that is
//! refused opens no server connection, pgiam's memory stays bounded, and a session opened
//! before it all still works.

use std::io::Write;
use std::time::Duration;

use crate::fixture::*;

/// Everything but DDL, DELETE and TRUNCATE: a statement the policy refuses, smuggled in a
/// malformed message, must not run.
const POLICY: &str = r#"@id("all")
permit(principal, action, resource);
@id("no-ddl")
forbid(principal, action in [PgIam::Action::"ddl", PgIam::Action::"delete", PgIam::Action::"truncate"], resource);
"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// FATAL with this SQLSTATE, then the connection closes.
    Fatal(&'static str),
    /// ERROR with this SQLSTATE, and the session answers up to ReadyForQuery.
    Error(&'static str),
    /// Answered up to ReadyForQuery with no error.
    Fine,
    /// Closed without a word (what PostgreSQL does with a CancelRequest, or a failed TLS
    /// handshake).
    Closed,
}

struct Input {
    what: &'static str,
    /// Sent on a fresh connection before any startup (true), or in a logged-in session.
    startup: bool,
    bytes: Vec<u8>,
    outcome: Outcome,
}

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn cstr(s: &[u8]) -> Vec<u8> {
    let mut v = s.to_vec();
    v.push(0);
    v
}

fn i16b(v: i16) -> [u8; 2] {
    v.to_be_bytes()
}

fn i32b(v: i32) -> [u8; 4] {
    v.to_be_bytes()
}

/// A startup packet from raw name/value bytes (any encoding), with its final NUL.
fn startup(version: i32, params: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut body = i32b(version).to_vec();
    for (k, v) in params {
        body.extend(cstr(k));
        body.extend(cstr(v));
    }
    body.push(0);
    let mut out = i32b(body.len() as i32 + 4).to_vec();
    out.extend(body);
    out
}

fn login(extra: &[(&'static [u8], &'static [u8])]) -> Vec<u8> {
    let mut params: Vec<(&[u8], &[u8])> = vec![(b"user", b"x"), (b"database", DB.as_bytes())];
    params.extend_from_slice(extra);
    startup(3 << 16, &params)
}

fn parse(name: &str, sql: &str, types: &[i32]) -> Vec<u8> {
    let mut b = cstr(name.as_bytes());
    b.extend(cstr(sql.as_bytes()));
    b.extend(i16b(types.len() as i16));
    for t in types {
        b.extend(i32b(*t));
    }
    msg(b'P', &b)
}

fn sync() -> Vec<u8> {
    msg(b'S', &[])
}

/// A Bind of the unnamed portal to `statement` with raw parameter and format parts.
fn bind(statement: &str, formats: &[i16], params: &[Option<&[u8]>], results: i16) -> Vec<u8> {
    let mut b = cstr(b"");
    b.extend(cstr(statement.as_bytes()));
    b.extend(i16b(formats.len() as i16));
    for f in formats {
        b.extend(i16b(*f));
    }
    b.extend(i16b(params.len() as i16));
    for p in params {
        match p {
            Some(v) => {
                b.extend(i32b(v.len() as i32));
                b.extend_from_slice(v);
            }
            None => b.extend(i32b(-1)),
        }
    }
    b.extend(i16b(results));
    msg(b'B', &b)
}

fn execute(portal: &str, max_rows: i32) -> Vec<u8> {
    let mut b = cstr(portal.as_bytes());
    b.extend(i32b(max_rows));
    msg(b'E', &b)
}

fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

const CANCEL_CODE: [u8; 4] = [0x04, 0xd2, 0x16, 0x2e];
const GSSENC_CODE: [u8; 4] = [0x04, 0xd2, 0x16, 0x30];
const SSL_CODE: [u8; 4] = [0x04, 0xd2, 0x16, 0x2f];

fn startup_inputs() -> Vec<Input> {
    use Outcome::*;
    let s = |what, bytes, outcome| Input {
        what,
        startup: true,
        bytes,
        outcome,
    };
    let mut ten_thousand = Vec::new();
    for i in 0..10_000 {
        ten_thousand.push((format!("p{i}").into_bytes(), b"v".to_vec()));
    }
    let many: Vec<(&[u8], &[u8])> = ten_thousand
        .iter()
        .map(|(k, v)| (k.as_slice(), v.as_slice()))
        .collect();
    vec![
        s("length 7", vec![0, 0, 0, 7, 0, 3, 0], Fatal("08P01")),
        s(
            "a negative length",
            vec![0xff, 0xff, 0xff, 0xff, 0, 3, 0, 0],
            Fatal("08P01"),
        ),
        s(
            "a length past the cap, header only",
            vec![0, 0, 0x27, 0x11, 0, 3, 0, 0],
            Fatal("08P01"),
        ),
        s(
            "a version and nothing else",
            vec![0, 0, 0, 8, 0, 3, 0, 0],
            Fatal("08P01"),
        ),
        s(
            "a name without a value",
            {
                let mut b = i32b(196608).to_vec();
                b.extend(b"user\0x\0database\0");
                b.push(0);
                let mut out = i32b(b.len() as i32 + 4).to_vec();
                out.extend(b);
                out
            },
            Fatal("08P01"),
        ),
        s(
            "an empty user name",
            startup(3 << 16, &[(b"user", b""), (b"database", DB.as_bytes())]),
            Fatal("28000"),
        ),
        s(
            "invalid UTF-8 in the database name",
            startup(3 << 16, &[(b"user", b"x"), (b"database", b"\xff\xfe")]),
            Fatal("08P01"),
        ),
        s(
            "invalid UTF-8 in a parameter value",
            login(&[(b"application_name", b"\xc3\x28")]),
            Fatal("08P01"),
        ),
        s(
            "invalid UTF-8 in a parameter name",
            login(&[(b"\xff", b"1")]),
            Fatal("08P01"),
        ),
        s("the user twice", login(&[(b"user", b"y")]), Fatal("08P01")),
        s(
            "the database twice",
            login(&[(b"database", b"postgres")]),
            Fatal("08P01"),
        ),
        s("10,000 parameters", startup(3 << 16, &many), Fatal("08P01")),
        s(
            "a replication connection",
            login(&[(b"replication", b"database")]),
            Fatal("42501"),
        ),
        s(
            "options that set the role",
            login(&[(b"options", b"-c role=postgres")]),
            Fatal("42501"),
        ),
        s(
            "protocol 3.99: negotiated down",
            startup(
                (3 << 16) | 99,
                &[(b"user", b"x"), (b"database", DB.as_bytes())],
            ),
            Fine,
        ),
        s(
            "protocol 4.0",
            startup(4 << 16, &[(b"user", b"x")]),
            Fatal("0A000"),
        ),
        s(
            "bytes pipelined behind a GSSENCRequest",
            cat(&[vec![0, 0, 0, 8], GSSENC_CODE.to_vec(), login(&[])]),
            Fatal("08P01"),
        ),
        s(
            "a CancelRequest with an unknown key",
            cat(&[
                vec![0, 0, 0, 16],
                CANCEL_CODE.to_vec(),
                i32b(4242).to_vec(),
                i32b(99).to_vec(),
            ]),
            Closed,
        ),
        s(
            "a CancelRequest cut short",
            cat(&[vec![0, 0, 0, 12], CANCEL_CODE.to_vec(), i32b(4242).to_vec()]),
            Fatal("08P01"),
        ),
        s(
            "a CancelRequest too long",
            cat(&[
                vec![0, 0, 0, 20],
                CANCEL_CODE.to_vec(),
                i32b(4242).to_vec(),
                i32b(99).to_vec(),
                i32b(0).to_vec(),
            ]),
            Fatal("08P01"),
        ),
        s(
            "a TLS record that is no ClientHello",
            vec![0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5],
            Closed,
        ),
        s(
            "bytes pipelined behind an SSLRequest",
            cat(&[vec![0, 0, 0, 8], SSL_CODE.to_vec(), login(&[])]),
            Fatal("08P01"),
        ),
    ]
}

fn session_inputs() -> Vec<Input> {
    use Outcome::*;
    let m = |what, bytes, outcome| Input {
        what,
        startup: false,
        bytes,
        outcome,
    };
    let text_param = parse("", "SELECT $1::text", &[]);
    let mut many_params = vec![None; 32_767];
    many_params[0] = Some(&b"x"[..]);
    vec![
        m(
            "a Parse with a negative type count",
            msg(
                b'P',
                &cat(&[cstr(b""), cstr(b"SELECT 1"), i16b(-1).to_vec()]),
            ),
            Fatal("08P01"),
        ),
        m(
            "a Parse declaring 32,767 types and carrying none",
            msg(
                b'P',
                &cat(&[cstr(b""), cstr(b"SELECT 1"), i16b(i16::MAX).to_vec()]),
            ),
            Fatal("08P01"),
        ),
        m(
            "a Parse without the query's NUL",
            msg(
                b'P',
                &cat(&[cstr(b""), b"SELECT 1".to_vec(), i16b(0).to_vec()]),
            ),
            Fatal("08P01"),
        ),
        m(
            "a Parse whose name has no NUL",
            msg(b'P', b"abc"),
            Fatal("08P01"),
        ),
        m(
            "a Parse of a statement the policy refuses",
            cat(&[parse("", "DROP TABLE items", &[]), sync()]),
            Error("42501"),
        ),
        m(
            "a Parse of a name in use",
            cat(&[
                parse("dup", "SELECT 1", &[]),
                parse("dup", "SELECT 2", &[]),
                sync(),
            ]),
            Error("42P05"),
        ),
        m(
            "a Bind with more formats than parameters",
            cat(&[
                text_param.clone(),
                bind("", &[0, 0], &[Some(b"x")], 0),
                sync(),
            ]),
            Fatal("08P01"),
        ),
        m(
            "a Bind with format code 2",
            cat(&[text_param.clone(), bind("", &[2], &[Some(b"x")], 0), sync()]),
            Fatal("08P01"),
        ),
        m(
            "a Bind with a parameter length of -2",
            {
                let mut b = cat(&[
                    cstr(b""),
                    cstr(b""),
                    i16b(0).to_vec(),
                    i16b(1).to_vec(),
                    i32b(-2).to_vec(),
                    i16b(0).to_vec(),
                ]);
                b.truncate(b.len());
                cat(&[text_param.clone(), msg(b'B', &b)])
            },
            Fatal("08P01"),
        ),
        m(
            "a Bind with a negative result format count",
            cat(&[
                text_param.clone(),
                msg(
                    b'B',
                    &cat(&[
                        cstr(b""),
                        cstr(b""),
                        i16b(0).to_vec(),
                        i16b(0).to_vec(),
                        i16b(-3).to_vec(),
                    ]),
                ),
            ]),
            Fatal("08P01"),
        ),
        m(
            "a Bind to a statement that does not exist",
            cat(&[bind("nowhere", &[], &[], 0), sync()]),
            Error("26000"),
        ),
        m(
            "a Bind of 32,767 parameters past the message cap",
            cat(&[text_param.clone(), bind("", &[], &many_params, 0)]),
            Fatal("08P01"),
        ),
        m(
            "a Bind of the wrong parameter count",
            cat(&[
                text_param.clone(),
                bind("", &[], &[Some(b"a"), Some(b"b")], 0),
                sync(),
            ]),
            Error("08P01"),
        ),
        m(
            "an Execute of a portal that does not exist",
            cat(&[execute("nowhere", 0), sync()]),
            Error("34000"),
        ),
        m(
            "an Execute with a negative row limit",
            cat(&[
                text_param.clone(),
                bind("", &[], &[Some(b"x")], 0),
                execute("", -1),
                sync(),
            ]),
            Fine,
        ),
        m(
            "a Describe of kind 'X'",
            cat(&[msg(b'D', b"X\0"), sync()]),
            Fatal("08P01"),
        ),
        m(
            "a Close of kind 'X'",
            cat(&[msg(b'C', b"X\0"), sync()]),
            Fatal("08P01"),
        ),
        m(
            "a Describe without a NUL",
            msg(b'D', b"Sabc"),
            Fatal("08P01"),
        ),
        m(
            "a FunctionCall with a negative argument count",
            msg(
                b'F',
                &cat(&[i32b(1242).to_vec(), i16b(0).to_vec(), i16b(-1).to_vec()]),
            ),
            Fatal("08P01"),
        ),
        m(
            "a FunctionCall declaring 32,767 arguments and carrying none",
            msg(
                b'F',
                &cat(&[
                    i32b(1242).to_vec(),
                    i16b(0).to_vec(),
                    i16b(i16::MAX).to_vec(),
                ]),
            ),
            Fatal("08P01"),
        ),
        m(
            "a FunctionCall of a function that does not exist",
            msg(
                b'F',
                &cat(&[
                    i32b(0).to_vec(),
                    i16b(0).to_vec(),
                    i16b(0).to_vec(),
                    i16b(0).to_vec(),
                ]),
            ),
            Error("42883"),
        ),
        m(
            "a FunctionCall with result format 7",
            msg(
                b'F',
                &cat(&[
                    i32b(1242).to_vec(),
                    i16b(0).to_vec(),
                    i16b(0).to_vec(),
                    i16b(7).to_vec(),
                ]),
            ),
            Fatal("08P01"),
        ),
        m(
            "CopyData outside COPY",
            cat(&[msg(b'd', b"1\n"), sync()]),
            Fine,
        ),
        m(
            "CopyDone outside COPY",
            cat(&[msg(b'c', b""), sync()]),
            Fine,
        ),
        m(
            "CopyFail outside COPY",
            cat(&[msg(b'f', b"why\0"), sync()]),
            Fine,
        ),
        m("a Flush with a body", msg(b'H', b"x"), Fatal("08P01")),
        m("a Sync with a body", msg(b'S', b"x"), Fatal("08P01")),
        m("a Terminate with a body", msg(b'X', b"x"), Fatal("08P01")),
        m(
            "a Query without its NUL",
            msg(b'Q', b"select 1"),
            Fatal("08P01"),
        ),
        m(
            "a Query hiding a refused statement after a NUL",
            msg(b'Q', b"select 1\0drop table items\0"),
            Fatal("08P01"),
        ),
        m(
            "a Query with invalid UTF-8",
            msg(b'Q', b"select '\xff'\0"),
            Error("22021"),
        ),
        m("an empty Query", msg(b'Q', b"\0"), Fine),
        m(
            "a Query that is only a comment",
            msg(b'Q', b"-- nothing\0"),
            Fine,
        ),
        m("message type 0", msg(0, b""), Fatal("08P01")),
        m(
            "a Bind declaring 65,535 parameters",
            msg(
                b'B',
                &cat(&[cstr(b""), cstr(b""), i16b(0).to_vec(), vec![0xff, 0xff]]),
            ),
            Fatal("08P01"),
        ),
        m(
            "a CopyData announcing 2 GB inside COPY FROM STDIN",
            cat(&[
                query_bytes("COPY items FROM STDIN"),
                vec![b'd', 0x7f, 0xff, 0xff, 0xff],
                b"1\n".to_vec(),
            ]),
            // The COPY fails with pgiam's reason (message too large), then the session ends.
            Error("57014"),
        ),
        m(
            "a Query nested 1,000 parentheses deep",
            query_bytes(&format!("SELECT {}1{}", "(".repeat(1000), ")".repeat(1000))),
            Fine,
        ),
        m(
            "a Query nested 30,000 parentheses deep",
            query_bytes(&format!(
                "SELECT {}1{}",
                "(".repeat(30_000),
                ")".repeat(30_000)
            )),
            // The grammar's own limit, as PostgreSQL's parser reports it.
            Error("42601"),
        ),
        m(
            "a Query of 100 nested subqueries",
            query_bytes(&format!(
                "SELECT {}1{}",
                "(SELECT ".repeat(100),
                ")".repeat(100)
            )),
            Fine,
        ),
        m(
            "a Query concatenating 400 terms",
            query_bytes(&format!("SELECT {}'x'", "'a' || ".repeat(400))),
            Fine,
        ),
        m(
            "a Query adding 10,000 terms",
            query_bytes(&format!("SELECT {}1", "1+".repeat(10_000))),
            Error("54001"),
        ),
        m(
            "a Query of 1,500 nested CASEs",
            query_bytes(&format!(
                "SELECT {}1{}",
                "CASE WHEN true THEN ".repeat(1500),
                " END".repeat(1500)
            )),
            Error("54001"),
        ),
        m(
            "a Query of 2,000 nested subqueries",
            query_bytes(&format!(
                "SELECT {}1{}",
                "(SELECT ".repeat(2000),
                ")".repeat(2000)
            )),
            Error("54001"),
        ),
        m(
            "100,000 Flushes pipelined, then a Sync",
            cat(&[msg(b'H', b"").repeat(100_000), sync()]),
            Fine,
        ),
    ]
}

/// Reads until ReadyForQuery or the end of the connection; returns what it came to.
fn observe(raw: &mut Raw) -> (Outcome, String) {
    let mut error: Option<(String, String, String)> = None;
    loop {
        match raw.read() {
            None => {
                return match error {
                    Some((sev, code, m)) if sev == "FATAL" => (Outcome::Fatal(leak(code)), m),
                    Some((sev, code, m)) => (Outcome::Fatal(leak(format!("{sev} {code}"))), m),
                    None => (Outcome::Closed, String::new()),
                }
            }
            Some((b'E', body)) => {
                let field = |c: u8| {
                    let mut rest = &body[..];
                    while let Some((&k, tail)) = rest.split_first() {
                        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
                        if k == c {
                            return String::from_utf8_lossy(&tail[..end]).into_owned();
                        }
                        rest = tail.get(end + 1..).unwrap_or_default();
                    }
                    String::new()
                };
                if error.is_none() {
                    error = Some((field(b'S'), field(b'C'), field(b'M')));
                }
            }
            Some((b'Z', _)) => {
                return match error {
                    Some((_, code, m)) => (Outcome::Error(leak(code)), m),
                    None => (Outcome::Fine, String::new()),
                }
            }
            Some(_) => {}
        }
    }
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

#[test]
fn every_input_of_the_corpus_ends_as_it_should_and_nothing_else_is_touched() {
    let _alone = measuring_alone();
    let env = Env::with(Setup {
        limits: "max_message_size = 65536\nstartup_timeout_secs = 2".into(),
        policy: POLICY.into(),
        ..Setup::default()
    });
    env.items("(1), (2)");
    let mut live = Raw::connect(env.tcp);
    live.startup();
    live.until_ready();
    let memory_before = pgiam_tests::status_kib(env.pgiam.pid(), "VmHWM");
    let resident_before = pgiam_tests::status_kib(env.pgiam.pid(), "VmRSS");
    let inputs: Vec<Input> = startup_inputs()
        .into_iter()
        .chain(session_inputs())
        .collect();
    let total = inputs.len();
    let mut wrong = Vec::new();
    for input in inputs {
        let connections = env.connections_received();
        let mut raw = Raw::connect(env.tcp);
        if !input.startup {
            raw.startup();
            raw.until_ready();
        }
        raw.send(&input.bytes);
        let (seen, message) = observe(&mut raw);
        eprintln!("{:<62} {:?} {message}", input.what, seen);
        if seen != input.outcome {
            wrong.push(format!(
                "{}: expected {:?}, saw {seen:?} ({message})",
                input.what, input.outcome
            ));
        }
        if input.startup && matches!(input.outcome, Outcome::Fatal(_) | Outcome::Closed) {
            assert_eq!(
                env.connections_received(),
                connections,
                "{}: a refused startup opened a server connection",
                input.what
            );
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {total} inputs:\n{}",
        wrong.len(),
        wrong.join("\n")
    );

    // A client that sends its startup one byte at a time, slower than the startup timeout.
    let mut drip = Raw::connect(env.tcp);
    for b in login(&[]).iter().take(4) {
        if drip.stream.write_all(&[*b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(700));
    }
    let (seen, message) = observe(&mut drip);
    assert_eq!(seen, Outcome::Fatal("08006"), "{message}");

    // Nothing the policy refused ran; pgiam's memory is where it was; the first session works.
    assert_eq!(
        env.pg.psql_db(DB, "SELECT count(*) FROM items").unwrap(),
        "2"
    );
    // The deepest statements the parser accepts take stack while they are classified (tens
    // of MiB in a debug build); pgiam gives it back after.
    let grown = pgiam_tests::status_kib(env.pgiam.pid(), "VmHWM").saturating_sub(memory_before);
    let kept = pgiam_tests::status_kib(env.pgiam.pid(), "VmRSS").saturating_sub(resident_before);
    eprintln!("{total} inputs; pgiam's peak grew {grown} KiB, its resident memory {kept} KiB");
    assert!(grown < 64 * 1024, "pgiam's peak grew {grown} KiB");
    assert!(kept < 24 * 1024, "pgiam kept {kept} KiB more");
    live.send(&query_bytes("select 42"));
    let msgs = live.until_ready();
    assert!(
        msgs.iter().any(|(t, b)| *t == b'D' && b.ends_with(b"42")),
        "{msgs:?}"
    );
}
