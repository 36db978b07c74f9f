//! Session settings that decide how the server reads a statement: standard_conforming_strings
//! (fixed for the session, but setting it to the value in force is harmless), client
//! encodings (ASCII-safe ones are read transcoded, and names must then be ASCII), and
//! set_config() of either with a bound parameter (decided at Bind, with the value).
//!
//! Text in other encodings is sent as raw protocol bytes: tokio-postgres speaks UTF-8 only.

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use crate::fixture::*;

trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

/// A hand-driven connection: through pgiam (TCP), or straight to PostgreSQL as the mapped role
/// (its unix socket, trust).
struct Conn(Box<dyn Stream>);

/// What the server answered up to ReadyForQuery.
#[derive(Debug, Default)]
struct Answer {
    /// Every DataRow's columns (`None`: NULL).
    rows: Vec<Vec<Option<Vec<u8>>>>,
    /// (SQLSTATE, message, detail) of every ErrorResponse.
    errors: Vec<(String, String, String)>,
}

impl Answer {
    fn ok(self) -> Answer {
        assert!(self.errors.is_empty(), "{:?}", self.errors);
        self
    }

    /// Every value, as bytes.
    fn values(&self) -> Vec<Vec<u8>> {
        self.rows.iter().flatten().flatten().cloned().collect()
    }

    fn text(&self) -> String {
        self.values()
            .iter()
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect::<Vec<_>>()
            .join("\t")
    }

    fn refused(&self) -> bool {
        self.errors.iter().any(|(code, message, _)| {
            code == "42501" && message.starts_with("pgiam: permission denied")
        })
    }
}

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn cstr(s: &[u8]) -> Vec<u8> {
    [s, b"\0"].concat()
}

fn query(sql: &[u8]) -> Vec<u8> {
    message(b'Q', &cstr(sql))
}

/// Parse, Bind (one text parameter per value), Execute of the unnamed statement.
fn extended(sql: &[u8], params: &[&[u8]]) -> Vec<u8> {
    let mut bind = [cstr(b""), cstr(b""), vec![0, 0]].concat();
    bind.extend_from_slice(&(params.len() as i16).to_be_bytes());
    for p in params {
        bind.extend_from_slice(&(p.len() as i32).to_be_bytes());
        bind.extend_from_slice(p);
    }
    bind.extend_from_slice(&[0, 0]);
    [
        message(b'P', &[cstr(b""), cstr(sql), vec![0, 0]].concat()),
        message(b'B', &bind),
        message(b'E', &[cstr(b""), vec![0, 0, 0, 0]].concat()),
    ]
    .concat()
}

/// Each statement through the extended protocol, then one Sync, in one write.
fn pipeline(statements: &[&[u8]]) -> Vec<u8> {
    let mut out: Vec<u8> = statements.iter().flat_map(|s| extended(s, &[])).collect();
    out.extend(message(b'S', &[]));
    out
}

impl Conn {
    fn open(env: &Env, direct: bool, params: &[(&str, &str)]) -> Conn {
        let stream: Box<dyn Stream> = if direct {
            let path = env.pg.socket_dir.join(format!(".s.PGSQL.{}", env.pg.port));
            let s = std::os::unix::net::UnixStream::connect(path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
            Box::new(s)
        } else {
            let s = std::net::TcpStream::connect(env.tcp).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
            Box::new(s)
        };
        let mut c = Conn(stream);
        let mut startup = vec![("user", ROLE), ("database", DB)];
        startup.extend_from_slice(params);
        c.send(&Raw::startup_bytes(3 << 16, &startup));
        let greeting = c.answer();
        assert!(greeting.errors.is_empty(), "login: {:?}", greeting.errors);
        c
    }

    fn send(&mut self, bytes: &[u8]) {
        self.0.write_all(bytes).unwrap();
    }

    /// Everything up to the next ReadyForQuery.
    fn answer(&mut self) -> Answer {
        let mut a = Answer::default();
        loop {
            let mut header = [0u8; 5];
            self.0.read_exact(&mut header).expect("connection closed");
            let len = i32::from_be_bytes(header[1..5].try_into().unwrap()) as usize;
            let mut body = vec![0u8; len - 4];
            self.0.read_exact(&mut body).unwrap();
            match header[0] {
                b'D' => {
                    let mut rest = &body[2..];
                    let mut row = Vec::new();
                    for _ in 0..u16::from_be_bytes([body[0], body[1]]) {
                        let n = i32::from_be_bytes(rest[..4].try_into().unwrap());
                        rest = &rest[4..];
                        if n < 0 {
                            row.push(None);
                        } else {
                            row.push(Some(rest[..n as usize].to_vec()));
                            rest = &rest[n as usize..];
                        }
                    }
                    a.rows.push(row);
                }
                b'E' => {
                    let field = |code: u8| {
                        let mut rest = &body[..];
                        while let Some((&c, tail)) = rest.split_first().filter(|(&c, _)| c != 0) {
                            let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
                            if c == code {
                                return String::from_utf8_lossy(&tail[..end]).into_owned();
                            }
                            rest = tail.get(end + 1..).unwrap_or_default();
                        }
                        String::new()
                    };
                    a.errors.push((field(b'C'), field(b'M'), field(b'D')));
                }
                b'Z' => return a,
                _ => {}
            }
        }
    }

    fn query(&mut self, sql: &[u8]) -> Answer {
        self.send(&query(sql));
        self.answer()
    }

    fn pipeline(&mut self, statements: &[&[u8]]) -> Answer {
        self.send(&pipeline(statements));
        self.answer()
    }
}

/// Setting standard_conforming_strings to the value the session is fixed at changes nothing,
/// and is allowed; any other value stays refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_conforming_strings_may_be_set_to_the_value_in_force() {
    let env = Env::start();
    let client = tokio_client(&env.tcp_dsn("")).await;
    for sql in [
        "SET standard_conforming_strings = on",
        "SET standard_conforming_strings TO 'ON'",
        "RESET standard_conforming_strings",
        "SET standard_conforming_strings TO DEFAULT",
        "BEGIN; SET LOCAL standard_conforming_strings = true; COMMIT",
        "SELECT set_config('standard_conforming_strings', 'on', false)",
        "RESET ALL",
    ] {
        client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }
    for sql in [
        "SET standard_conforming_strings = off",
        "SET LOCAL standard_conforming_strings = of",
        "SELECT set_config('standard_conforming_strings', 'off', false)",
        "SET standard_conforming_strings = 0",
    ] {
        let e = client.batch_execute(sql).await.expect_err(sql);
        let db = e.as_db_error().expect("pgiam's refusal");
        assert_eq!(db.code().code(), "42501", "{sql}: {db:?}");
        assert_eq!(
            db.message(),
            "pgiam: permission denied: set standard_conforming_strings",
            "{sql}"
        );
        assert!(
            db.detail()
                .is_some_and(|d| d.contains("fixed for the session at on")),
            "{db:?}"
        );
    }
    let show = client
        .query("SHOW standard_conforming_strings", &[])
        .await
        .unwrap();
    assert_eq!(show[0].get::<_, String>(0), "on");
    assert_eq!(
        psql_ok(
            &env.tcp_dsn(""),
            "SET standard_conforming_strings = on; RESET standard_conforming_strings; \
             SHOW standard_conforming_strings"
        ),
        "SET\nRESET\non"
    );
    // A session that starts with it off (a role default) may set it to off.
    env.pg
        .psql(&format!(
            "ALTER ROLE {ROLE} SET standard_conforming_strings = off"
        ))
        .unwrap();
    assert_eq!(
        psql_ok(
            &env.tcp_dsn(""),
            "SET standard_conforming_strings = off; RESET standard_conforming_strings; \
             SHOW standard_conforming_strings"
        ),
        "SET\nRESET\noff"
    );
    let out = psql(&env.tcp_dsn(""), "SET standard_conforming_strings = on");
    assert!(
        stderr(&out).contains("fixed for the session at off"),
        "{}",
        stderr(&out)
    );
}

/// Clients in LATIN9 and EUC_JP (encodings whose multibyte characters never hold an ASCII
/// byte) write and read text through pgiam, chosen at startup or with SET; a name outside
/// ASCII is refused in such a session.
#[test]
fn clients_in_latin9_and_euc_jp_write_and_read_their_text() {
    let env = Env::start();
    env.pg
        .psql_db(
            DB,
            &format!(
                "CREATE TABLE notes (id int, v text); CREATE TABLE \"café\" (v text); \
                 GRANT ALL ON notes, \"café\" TO {ROLE}"
            ),
        )
        .unwrap();
    // LATIN9: '€' is 0xA4, 'ä' 0xE4.
    let mut c = Conn::open(&env, false, &[("client_encoding", "LATIN9")]);
    c.query(b"INSERT INTO notes VALUES (1, '\xa4\xe4')").ok();
    let a = c.query(b"SELECT v FROM notes WHERE id = 1").ok();
    assert_eq!(a.values(), [b"\xa4\xe4".to_vec()]);
    let a = c
        .pipeline(&[
            b"INSERT INTO notes VALUES (2, '\xa4')",
            b"SELECT v FROM notes WHERE id = 2 AND v <> '\xe4'",
        ])
        .ok();
    assert_eq!(a.values(), [b"\xa4".to_vec()]);
    // The same bytes as a name: refused, though the table exists (as "café" in LATIN9).
    let a = c.query(b"SELECT count(*) FROM \"caf\xe9\"");
    assert!(a.refused(), "{a:?}");
    assert!(a.errors[0].2.contains("client_encoding LATIN9"), "{a:?}");
    Conn::open(&env, true, &[("client_encoding", "LATIN9")])
        .query(b"SELECT count(*) FROM \"caf\xe9\"")
        .ok();
    // Chosen with SET.
    let mut c = Conn::open(&env, false, &[]);
    c.query(b"SET client_encoding = 'LATIN9'").ok();
    c.query(b"INSERT INTO notes VALUES (3, '\xa4')").ok();
    assert_eq!(
        c.query(b"SELECT v FROM notes WHERE id = 3").ok().values(),
        [b"\xa4".to_vec()]
    );
    // EUC_JP: 'さ' is 0xA4 0xB5.
    let mut c = Conn::open(&env, false, &[("client_encoding", "EUC_JP")]);
    c.query(b"INSERT INTO notes VALUES (4, '\xa4\xb5')").ok();
    assert_eq!(
        c.query(b"SELECT v FROM notes WHERE id = 4").ok().values(),
        [b"\xa4\xb5".to_vec()]
    );
    assert!(c.query(b"SELECT * FROM \"\xa4\xb5\"").refused());
    let mut c = Conn::open(&env, false, &[]);
    c.query(b"SET NAMES 'EUC_JP'").ok();
    c.pipeline(&[b"INSERT INTO notes VALUES (5, '\xa4\xb5')"])
        .ok();
    // psql, with its client encoding from the environment and a LATIN9 file.
    let file = env.dir.path().join("latin9.sql");
    std::fs::write(
        &file,
        b"INSERT INTO notes VALUES (6, '\xa4');\nSELECT v FROM notes WHERE id = 6;\n",
    )
    .unwrap();
    let out = Command::new(pgiam_tests::pg_bin_dir().join("psql"))
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .arg(env.tcp_dsn(""))
        .arg("-f")
        .arg(&file)
        .env("PGCLIENTENCODING", "LATIN9")
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .unwrap();
    assert!(out.status.success(), "psql: {}", stderr(&out));
    assert_eq!(out.stdout, b"\xa4\n");
    // The database holds the characters, and the decision records the text as read.
    assert_eq!(
        env.pg
            .psql_db(
                DB,
                "SELECT string_agg(id || '=' || v, ',' ORDER BY id) FROM notes"
            )
            .unwrap(),
        "1=€ä,2=€,3=€,4=さ,5=さ,6=€"
    );
    let records = env.audit_records();
    for sql in [
        "INSERT INTO notes VALUES (1, '€ä')",
        "INSERT INTO notes VALUES (4, 'さ')",
        "INSERT INTO notes VALUES (6, '€')",
    ] {
        assert!(
            records.iter().any(|r| r["sql"]
                .as_str()
                .is_some_and(|s| s.trim_end().trim_end_matches(';') == sql)),
            "no record of {sql}"
        );
    }
}

const SECRET: &str = "TOPSECRET";

/// `é` and `Ã¼` may be read; `Ã©` and `ü` hold the secret. The UTF-8 bytes of `é` (C3 A9)
/// read as `Ã©` in LATIN1; the LATIN1 bytes of `Ã¼` (C3 BC) read as `ü` in UTF-8.
const NAMES_POLICY: &str = r#"
permit(principal, action == PgIam::Action::"connect", resource);
permit(principal, action == PgIam::Action::"set", resource);
permit(principal, action == PgIam::Action::"execute", resource);
permit(principal, action == PgIam::Action::"select", resource == PgIam::Table::"app.public.é");
permit(principal, action == PgIam::Action::"select", resource == PgIam::Table::"app.public.Ã¼");
"#;

/// One attack: a session's startup parameters, then raw writes, each answered up to its last
/// ReadyForQuery.
struct Attack {
    name: &'static str,
    params: &'static [(&'static str, &'static str)],
    /// (bytes, how many ReadyForQuery they are answered with)
    writes: Vec<(Vec<u8>, usize)>,
}

/// Making pgiam and the server read a name differently: a client encoding changed ahead of a
/// statement (pipelined, or rolled back) gives the same bytes another meaning. Each attack
/// leaks the secret when sent straight to PostgreSQL, and must not through pgiam.
#[test]
fn names_cannot_be_read_differently_through_a_client_encoding() {
    let env = Env::with(Setup {
        policy: NAMES_POLICY.into(),
        ..Setup::default()
    });
    env.pg
        .psql_db(
            DB,
            &format!(
                "CREATE TABLE \"é\" (v text); INSERT INTO \"é\" VALUES ('fine'); \
                 CREATE TABLE \"Ã¼\" (v text); INSERT INTO \"Ã¼\" VALUES ('fine'); \
                 CREATE TABLE \"Ã©\" (v text); INSERT INTO \"Ã©\" VALUES ('{SECRET}'); \
                 CREATE TABLE \"ü\" (v text); INSERT INTO \"ü\" VALUES ('{SECRET}'); \
                 GRANT SELECT ON ALL TABLES IN SCHEMA public TO {ROLE}"
            ),
        )
        .unwrap();
    // In a session that only speaks UTF-8 the allowed names are read as written.
    let mut c = Conn::open(&env, false, &[]);
    assert_eq!(
        c.query("SELECT v FROM \"é\"".as_bytes()).ok().text(),
        "fine"
    );
    assert!(c.query("SELECT v FROM \"Ã©\"".as_bytes()).refused());
    let e_utf8 = "SELECT v FROM \"é\"".as_bytes().to_vec(); // C3 A9
    let u_latin1 = b"SELECT v FROM \"\xc3\xbc\"".to_vec(); // Ã¼ in LATIN1, ü in UTF-8
    let q = |sql: &[u8]| (query(sql), 1);
    let attacks = vec![
        Attack {
            name: "SET client_encoding, then UTF-8 bytes of an allowed name",
            params: &[],
            writes: vec![q(b"SET client_encoding = 'LATIN1'"), q(&e_utf8)],
        },
        Attack {
            name: "SET client_encoding pipelined ahead in simple queries",
            params: &[],
            writes: vec![(
                [query(b"SET client_encoding = 'LATIN1'"), query(&e_utf8)].concat(),
                2,
            )],
        },
        Attack {
            name: "set_config pipelined ahead in the extended protocol",
            params: &[],
            writes: vec![(
                pipeline(&[
                    b"SELECT set_config('client_encoding', 'LATIN1', false)",
                    &e_utf8,
                ]),
                1,
            )],
        },
        Attack {
            name: "set_config with a bound parameter pipelined ahead",
            params: &[],
            writes: vec![(
                [
                    extended(
                        b"SELECT set_config('client_encoding', $1, false)",
                        &[b"LATIN1"],
                    ),
                    pipeline(&[&e_utf8]),
                ]
                .concat(),
                1,
            )],
        },
        Attack {
            name: "client_encoding at startup",
            params: &[("client_encoding", "LATIN1")],
            writes: vec![q(&e_utf8)],
        },
        Attack {
            name: "a SET LOCAL rolled back ahead of the name",
            params: &[],
            writes: vec![(
                [
                    query(b"BEGIN"),
                    query(b"SET LOCAL client_encoding = 'LATIN1'"),
                    query(b"ROLLBACK"),
                    query(&u_latin1),
                ]
                .concat(),
                4,
            )],
        },
        Attack {
            name: "RESET pipelined ahead of the name",
            params: &[("client_encoding", "LATIN1")],
            writes: vec![(
                [
                    query(b"SET client_encoding = 'UTF8'"),
                    query(b"SET client_encoding = 'LATIN1'"),
                    query(b"RESET client_encoding; SET client_encoding = 'UTF8'"),
                    query(&u_latin1),
                ]
                .concat(),
                4,
            )],
        },
    ];
    let mut verdicts = Verdicts::default();
    for attack in &attacks {
        for direct in [false, true] {
            let mut c = Conn::open(&env, direct, attack.params);
            let mut text = String::new();
            for (bytes, answers) in &attack.writes {
                c.send(bytes);
                for _ in 0..*answers {
                    let a = c.answer();
                    text.push_str(&a.text());
                    text.push_str(&format!("{:?}\n", a.errors));
                }
            }
            let leaked = text.contains(SECRET);
            verdicts.judge(direct, leaked, || format!("{}: {text}", attack.name));
        }
    }
    verdicts.assert_clean();
}

/// set_config() of client_encoding or standard_conforming_strings with a bound parameter is
/// decided at Bind, with the parameter's value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_config_with_a_bound_parameter_is_decided_with_its_value() {
    let env = Env::start();
    let client = tokio_client(&env.tcp_dsn("")).await;
    let set = |setting: &'static str, value: &'static str| {
        let client = &client;
        async move {
            let sql = format!("SELECT set_config('{setting}', $1, false)");
            client.query(&sql, &[&value]).await
        }
    };
    let rows = set("client_encoding", "UTF8").await.unwrap();
    assert_eq!(rows[0].get::<_, String>(0), "UTF8");
    let rows = set("standard_conforming_strings", "on").await.unwrap();
    assert_eq!(rows[0].get::<_, String>(0), "on");
    for (setting, value, why) in [
        ("client_encoding", "SJIS", "can contain ASCII bytes"),
        ("client_encoding", "BIG5", "can contain ASCII bytes"),
        (
            "standard_conforming_strings",
            "off",
            "fixed for the session at on",
        ),
    ] {
        let e = set(setting, value).await.expect_err(value);
        let db = e.as_db_error().expect("pgiam's refusal");
        assert_eq!(db.code().code(), "42501", "{db:?}");
        assert!(db.detail().is_some_and(|d| d.contains(why)), "{db:?}");
    }
    // Nothing changed, and the session goes on.
    for (show, value) in [
        ("SHOW client_encoding", "UTF8"),
        ("SHOW standard_conforming_strings", "on"),
    ] {
        let rows = client.query(show, &[]).await.unwrap();
        assert_eq!(rows[0].get::<_, String>(0), value);
    }
    // An ASCII-safe encoding bound this way is read from then on.
    let mut c = Conn::open(&env, false, &[]);
    c.send(&extended(
        b"SELECT set_config('client_encoding', $1, false)",
        &[b"LATIN1"],
    ));
    c.send(&message(b'S', &[]));
    c.answer().ok();
    assert_eq!(
        c.query(b"SELECT '\xe9' || 'x'").ok().values(),
        [b"\xe9x".to_vec()]
    );
}
