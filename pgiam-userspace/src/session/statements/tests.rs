//! The gate's tests: decisions on every protocol route, prepared statements and portals,
//! settings that change how statements are read, and the records each decision leaves.

use super::*;
use crate::policy::Policy;
use bytes::BytesMut;

const ITEMS: &str = r#"permit(principal, action == PgIam::Action::"select",
    resource == PgIam::Table::"app.public.items");"#;

fn test_info(session: Option<&str>, identity: &crate::identity::Identity) -> SessionInfo {
    crate::admin::registry::Live::new(
        crate::admin::registry::Facts {
            id: session.unwrap_or("local-0").into(),
            audited: session.is_some(),
            principal: internment::ArcIntern::from_ref("uid:1000"),
            role: internment::ArcIntern::from_ref("app"),
            database: internment::ArcIntern::from_ref("app"),
            identity: internment::ArcIntern::new(identity.clone()),
            upstream: internment::ArcIntern::from_ref("127.0.0.1:5432"),
            peer: "test".into(),
            tls: false,
            pool: crate::config::PoolMode::None,
        },
        crate::admin::registry::State::Idle,
    )
}

fn gate(policy: &str) -> (Gate, Arc<PolicyStore>) {
    let store = Arc::new(PolicyStore::fixed(Policy::parse(policy).unwrap()));
    let identity = crate::identity::Identity::for_principal("uid", "1000").unwrap();
    let mut gate = Gate::new(
        None,
        store.clone(),
        store.generation(),
        Principal::shared("uid:1000", "app", "app", &identity),
        Resolver::new(&["public".into()], "app"),
        false,
        test_info(None, &identity),
    );
    gate.use_catalog(Ok(Arc::new(crate::catalog::Snapshot::default())));
    (gate, store)
}

fn forwarded(gate: &mut Gate, m: FrontendMessage<'_>) -> bool {
    let mut expects = Vec::new();
    let c = gate.check(&m, &[], true, &mut expects);
    assert_eq!(expects.len(), 1, "{m:?}");
    assert_eq!(
        expects[0].refused.is_some(),
        matches!(c, Checked::Substitute(_)),
        "a substitute always comes with the refusal that replaces its error"
    );
    matches!(c, Checked::Forward(_))
}

fn query(sql: &str) -> FrontendMessage<'_> {
    FrontendMessage::Query {
        sql: sql.as_bytes(),
    }
}

#[test]
fn prepared_statements_share_one_namespace_and_portals_keep_their_plan() {
    let (mut g, store) = gate(ITEMS);
    assert!(forwarded(
        &mut g,
        query("PREPARE p AS SELECT * FROM items; EXECUTE p")
    ));
    assert!(forwarded(&mut g, query("EXECUTE p")));
    assert!(!forwarded(&mut g, query("EXECUTE nope")));
    // Protocol Parse of the unnamed statement, bound, then the name reused: the portal
    // runs what was bound.
    let parse = |sql: &'static str| FrontendMessage::Parse {
        name: b"",
        sql: sql.as_bytes(),
        param_types: 0,
    };
    assert!(forwarded(&mut g, parse("SELECT * FROM items")));
    assert!(forwarded(
        &mut g,
        FrontendMessage::Bind {
            portal: b"c",
            statement: b"",
            params: 0
        }
    ));
    assert!(!forwarded(&mut g, parse("SELECT * FROM secret")));
    let execute = || FrontendMessage::Execute {
        portal: b"c",
        max_rows: 0,
    };
    assert!(forwarded(&mut g, execute()));
    // Revoked: the next Execute of the same portal is refused.
    store.replace(Policy::parse("").unwrap());
    g.refresh_policy();
    assert!(!forwarded(&mut g, execute()));
    // SQL EXECUTE of the protocol's statement is checked against the policy now too.
    assert!(!forwarded(&mut g, query("EXECUTE p")));
}

/// items in the starting path (public) may be read; other.items may not; any setting may
/// be changed, and every function called.
const PATHS: &str = r#"permit(principal, action == PgIam::Action::"select",
    resource == PgIam::Table::"app.public.items");
    permit(principal, action == PgIam::Action::"set", resource);
    permit(principal, action == PgIam::Action::"execute", resource);
    permit(principal, action == PgIam::Action::"function_call", resource);"#;

fn parse<'a>(sql: &'a str) -> FrontendMessage<'a> {
    FrontendMessage::Parse {
        name: b"",
        sql: sql.as_bytes(),
        param_types: 0,
    }
}

fn bind() -> FrontendMessage<'static> {
    FrontendMessage::Bind {
        portal: b"",
        statement: b"",
        params: 0,
    }
}

fn execute() -> FrontendMessage<'static> {
    FrontendMessage::Execute {
        portal: b"",
        max_rows: 0,
    }
}

#[test]
fn the_starting_path_and_changes_back_to_it_are_allowed() {
    let (mut g, _) = gate(PATHS);
    for sql in [
        "SELECT * FROM items",
        "SET search_path = public",
        "SET search_path TO public; SELECT * FROM items",
        "RESET search_path",
        "SET search_path TO DEFAULT",
        "SELECT pg_catalog.set_config('search_path', '', false)",
        "SELECT * FROM items",
        "SELECT * FROM public.items",
    ] {
        assert!(forwarded(&mut g, query(sql)), "{sql}");
    }
}

#[test]
fn a_search_path_set_ahead_of_a_statement_is_searched_when_it_is_decided() {
    // In one query string.
    let (mut g, _) = gate(PATHS);
    assert!(!forwarded(
        &mut g,
        query("SET search_path = other; SELECT * FROM items")
    ));
    // A refused string runs nothing, so it widens nothing.
    assert!(forwarded(&mut g, query("SELECT * FROM items")));
    // In an extended-protocol pipeline: decided at Execute, before the server answers.
    assert!(forwarded(&mut g, parse("SET search_path = other")));
    assert!(forwarded(&mut g, bind()));
    assert!(forwarded(&mut g, execute()));
    assert!(!forwarded(&mut g, parse("SELECT * FROM items")));
    // Qualified, the allowed table still is.
    assert!(forwarded(&mut g, query("SELECT * FROM public.items")));
    // Parsed before the SET ran, executed after: decided again at Execute.
    let (mut g, _) = gate(PATHS);
    assert!(forwarded(
        &mut g,
        FrontendMessage::Parse {
            name: b"s",
            sql: b"SELECT * FROM items",
            param_types: 0
        }
    ));
    assert!(forwarded(&mut g, query("SET LOCAL search_path = other")));
    assert!(forwarded(
        &mut g,
        FrontendMessage::Bind {
            portal: b"",
            statement: b"s",
            params: 0
        }
    ));
    assert!(!forwarded(&mut g, execute()));
}

/// Sessions that start alike share one resolver (an idle session's memory): what one session's
/// search_path or temporary table widens is its own, never its neighbour's.
#[test]
fn a_shared_search_path_widens_for_its_own_session_only() {
    let (mut a, _) = gate(PATHS);
    let (mut b, _) = gate(PATHS);
    assert!(std::ptr::eq(&*a.resolver, &*b.resolver), "shared at login");
    assert!(forwarded(&mut a, query("SET search_path = other, pg_temp")));
    assert!(!forwarded(&mut a, query("SELECT * FROM items")));
    assert!(a.resolver.temp && !b.resolver.temp);
    assert_eq!(b.resolver.schemas(), ["public"]);
    assert!(forwarded(&mut b, query("SELECT * FROM items")));
    let size = std::mem::size_of::<Gate>();
    assert!(size <= 216, "a session's gate: {size} bytes");
}

#[test]
fn the_set_of_schemas_never_shrinks() {
    for steps in [
        &["BEGIN", "SET search_path = other", "ROLLBACK"][..],
        &["BEGIN", "SET LOCAL search_path = other", "COMMIT"],
        &["SET search_path = other", "RESET search_path"],
        &["SET search_path = other", "RESET ALL"],
        &["SELECT set_config('search_path', 'other', true)"],
        // Wherever the value sits: a prepared statement, a cursor, a function's SET
        // clause (which lasts only for its calls, but is asked for all the same).
        &["PREPARE p AS SELECT set_config('search_path', 'other', false)"],
        &[
            "BEGIN",
            "DECLARE c CURSOR FOR SELECT set_config('search_path', 'other', false)",
        ],
        &["EXPLAIN SELECT set_config('search_path', 'other', false)"],
    ] {
        let (mut g, _) = gate(PATHS);
        for sql in steps {
            assert!(forwarded(&mut g, query(sql)), "{sql}");
        }
        assert!(
            !forwarded(&mut g, query("SELECT * FROM items")),
            "{steps:?}"
        );
    }
}

#[test]
fn search_paths_pgiam_cannot_read_are_refused_on_every_route() {
    let everything = "permit(principal, action, resource);";
    let (mut g, _) = gate(everything);
    assert!(!forwarded(
        &mut g,
        parse("SELECT set_config('search_path', $1, false)")
    ));
    assert!(!forwarded(
        &mut g,
        query("SELECT set_config('search_path', current_setting('x'), false)")
    ));
    assert!(!forwarded(
        &mut g,
        FrontendMessage::FunctionCall {
            function_oid: SET_CONFIG_OID,
            args: 3,
        }
    ));
    assert!(forwarded(
        &mut g,
        query("SELECT set_config('search_path', 'a, \"B\"', false)")
    ));
}

/// Checks a message given as its bytes, as the session does.
fn sent(gate: &mut Gate, frame: &[u8], scs: bool) -> bool {
    let m = crate::wire::decode_frontend(frame[0], &frame[5..]).unwrap();
    let mut expects = Vec::new();
    let c = gate.check(&m, frame, scs, &mut expects);
    assert_eq!(expects.len(), 1, "{m:?}");
    assert_eq!(
        expects[0].refused.is_some(),
        matches!(c, Checked::Substitute(_))
    );
    matches!(c, Checked::Forward(_))
}

fn raw_query(sql: &[u8]) -> Vec<u8> {
    let mut b = vec![b'Q'];
    b.extend_from_slice(&(sql.len() as i32 + 5).to_be_bytes());
    b.extend_from_slice(sql);
    b.push(0);
    b
}

fn parse_frame(name: &str, sql: &str, types: &[u32]) -> BytesMut {
    let mut b = BytesMut::new();
    postgres_protocol::message::frontend::parse(name, sql, types.iter().copied(), &mut b).unwrap();
    b
}

/// A Bind of `values` (`None`: NULL) in one format for all.
fn bind_frame(portal: &str, statement: &str, format: i16, values: &[Option<&str>]) -> BytesMut {
    use postgres_protocol::IsNull;
    let mut b = BytesMut::new();
    postgres_protocol::message::frontend::bind(
        portal,
        statement,
        [format],
        values.iter(),
        |v, buf| match v {
            Some(v) => {
                buf.extend_from_slice(v.as_bytes());
                Ok(IsNull::No)
            }
            None => Ok(IsNull::Yes),
        },
        [0i16],
        &mut b,
    )
    .map_err(|_| "bind")
    .unwrap();
    b
}

fn execute_frame(portal: &str) -> BytesMut {
    let mut b = BytesMut::new();
    postgres_protocol::message::frontend::execute(portal, 0, &mut b).unwrap();
    b
}

const EVERYTHING: &str = "permit(principal, action, resource);";

/// A gate whose session logged in with this client_encoding.
fn gate_in(policy: &str, encoding: Option<&str>) -> Gate {
    let (mut g, _) = gate(policy);
    g.login_client_encoding(encoding);
    g
}

#[test]
fn standard_conforming_strings_may_be_set_to_the_value_it_is_fixed_at() {
    for fixed in [true, false] {
        let (mut g, _) = gate(EVERYTHING);
        let (same, other) = if fixed { ("on", "off") } else { ("off", "on") };
        for sql in [
            format!("SET standard_conforming_strings = {same}"),
            "RESET standard_conforming_strings".to_owned(),
            format!("SET standard_conforming_strings TO {same}; SELECT 1"),
        ] {
            assert!(sent(&mut g, &raw_query(sql.as_bytes()), fixed), "{sql}");
        }
        let sql = format!("SET standard_conforming_strings = {other}");
        assert!(!sent(&mut g, &raw_query(sql.as_bytes()), fixed), "{sql}");
    }
    // RESET goes back to the value at login, which is what the first message is checked
    // with: once the server reports another (a route pgiam did not see), RESET changes it.
    let (mut g, _) = gate(EVERYTHING);
    assert!(sent(&mut g, &raw_query(b"SELECT 1"), true));
    assert!(!sent(
        &mut g,
        &raw_query(b"RESET standard_conforming_strings"),
        false
    ));
    assert!(sent(
        &mut g,
        &raw_query(b"SET standard_conforming_strings = off"),
        false
    ));
}

#[test]
fn statements_in_an_ascii_safe_encoding_are_read_transcoded() {
    let (mut g, _) = gate(EVERYTHING);
    // A session that only spoke UTF-8 refuses text that is not.
    assert!(!sent(&mut g, &raw_query(b"SELECT '\xa4'"), true));
    let mut g = gate_in(EVERYTHING, Some("LATIN9"));
    assert!(sent(&mut g, &raw_query(b"SELECT '\xa4' FROM items"), true));
    let frame = parse_frame("s", "SELECT 1", &[]);
    let mut latin9 = frame.to_vec();
    // The same Parse with LATIN9 text: 'ä€' (0xE4 0xA4).
    latin9.truncate(5);
    latin9.extend_from_slice(b"s\0SELECT '\xe4\xa4' FROM items\0\0\0");
    let len = (latin9.len() as i32 - 1).to_be_bytes();
    latin9[1..5].copy_from_slice(&len);
    assert!(sent(&mut g, &latin9, true));
    assert_eq!(
        &*g.prepared.get(b"s").unwrap().plan.sql,
        "SELECT 'ä€' FROM items",
        "recorded as read"
    );
    // A name that is not ASCII is refused, whatever its bytes.
    assert!(!sent(&mut g, &raw_query(b"SELECT * FROM \"\xe4\""), true));
    assert!(!sent(
        &mut g,
        &raw_query("SELECT * FROM \"ä\"".as_bytes()),
        true
    ));
    // EUC_JP: 'さ' is 0xA4 0xB5.
    let mut g = gate_in(EVERYTHING, Some("EUC_JP"));
    assert!(sent(
        &mut g,
        &raw_query(b"SELECT '\xa4\xb5' FROM items"),
        true
    ));
    assert!(!sent(
        &mut g,
        &raw_query(b"SELECT * FROM \"\xa4\xb5\""),
        true
    ));
    // SJIS is never read.
    let mut g = gate_in(EVERYTHING, Some("SJIS"));
    assert!(!sent(&mut g, &raw_query(b"SELECT 1"), true));
}

#[test]
fn once_an_encoding_other_than_utf8_is_used_names_must_be_ascii() {
    let named = "SELECT * FROM \"é\"".as_bytes();
    for steps in [
        &["SET client_encoding = 'LATIN1'"][..],
        &["BEGIN", "SET LOCAL client_encoding = 'LATIN1'", "ROLLBACK"],
        &["SET client_encoding = 'LATIN1'", "RESET client_encoding"],
        &["SELECT set_config('client_encoding', 'EUC_JP', false)"],
        &[
            "SET client_encoding = 'SQL_ASCII'",
            "SET client_encoding = 'UTF8'",
        ],
        &[
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET client_encoding = 'LATIN1' \
           AS 'select 1'",
        ],
    ] {
        let (mut g, _) = gate(EVERYTHING);
        assert!(sent(&mut g, &raw_query(named), true), "UTF-8 only");
        for sql in steps {
            assert!(sent(&mut g, &raw_query(sql.as_bytes()), true), "{sql}");
        }
        assert!(!sent(&mut g, &raw_query(named), true), "{steps:?}");
        // String literals and comments may hold anything.
        assert!(sent(&mut g, &raw_query("SELECT 'é' -- ü".as_bytes()), true));
    }
    // Pipelined ahead: in the same query string, and in an extended-protocol pipeline
    // (decided before the server has answered the SET).
    let (mut g, _) = gate(EVERYTHING);
    assert!(!sent(
        &mut g,
        &raw_query("SET client_encoding = 'LATIN1'; SELECT * FROM \"é\"".as_bytes()),
        true
    ));
    let (mut g, _) = gate(EVERYTHING);
    assert!(sent(
        &mut g,
        &parse_frame("", "SET client_encoding = 'LATIN1'", &[]),
        true
    ));
    assert!(sent(&mut g, &bind_frame("", "", 0, &[]), true));
    assert!(sent(&mut g, &execute_frame(""), true));
    assert!(!sent(
        &mut g,
        &parse_frame("", "SELECT * FROM \"é\"", &[]),
        true
    ));
    // Reported by the server (a route pgiam did not see).
    let (mut g, _) = gate(EVERYTHING);
    g.client_encoding_reported("WIN1251");
    assert!(!sent(&mut g, &raw_query(named), true));
    // Protocol names too.
    assert!(!sent(&mut g, &parse_frame("é", "SELECT 1", &[]), true));
    assert!(sent(&mut g, &parse_frame("s", "SELECT 1", &[]), true));
    assert!(!sent(&mut g, &bind_frame("é", "s", 0, &[]), true));
    assert!(!sent(&mut g, &execute_frame("é"), true));
}

#[test]
fn set_config_of_a_bound_parameter_is_decided_at_bind() {
    let (mut g, _) = gate(EVERYTHING);
    let enc = parse_frame("e", "SELECT set_config('client_encoding', $1, false)", &[]);
    assert!(sent(&mut g, &enc, true), "decided at Bind");
    let scs = parse_frame(
        "c",
        "SELECT set_config('standard_conforming_strings', $1, false)",
        &[],
    );
    assert!(sent(&mut g, &scs, true));
    for (statement, value, format, allowed) in [
        ("e", Some("UTF8"), 0, true),
        ("e", Some("utf-8"), 1, true),
        ("e", None, 0, true),
        ("e", Some("SJIS"), 0, false),
        ("e", Some("Shift_JIS"), 1, false),
        ("e", Some("klingon"), 0, false),
        ("c", Some("on"), 0, true),
        ("c", Some("ON"), 1, true),
        ("c", None, 0, true),
        ("c", Some("off"), 0, false),
        ("c", Some("0"), 1, false),
    ] {
        let b = bind_frame("p", statement, format, &[value]);
        assert_eq!(
            sent(&mut g, &b, true),
            allowed,
            "{statement} {value:?} {format}"
        );
        if allowed {
            assert!(sent(&mut g, &execute_frame("p"), true));
        }
    }
    // Bound to a non-UTF-8 encoding: names must be ASCII from then on.
    assert!(sent(
        &mut g,
        &raw_query("SELECT * FROM \"é\"".as_bytes()),
        true
    ));
    assert!(sent(
        &mut g,
        &bind_frame("p", "e", 0, &[Some("LATIN1")]),
        true
    ));
    assert!(!sent(
        &mut g,
        &raw_query("SELECT * FROM \"é\"".as_bytes()),
        true
    ));
    // A declared type pgiam does not read as text.
    let typed = parse_frame(
        "t",
        "SELECT set_config('client_encoding', $1, false)",
        &[23],
    );
    assert!(sent(&mut g, &typed, true));
    assert!(!sent(
        &mut g,
        &bind_frame("p", "t", 0, &[Some("UTF8")]),
        true
    ));
    // A parameter the Bind does not bind.
    assert!(!sent(&mut g, &bind_frame("p", "e", 0, &[]), true));
    // SQL EXECUTE of it has no Bind to read the value at.
    assert!(!sent(&mut g, &raw_query(b"EXECUTE e('UTF8')"), true));
    // Nor does a Parse that is executed without the statement's own Bind.
    assert!(!sent(
        &mut g,
        &raw_query(b"PREPARE q(text) AS SELECT set_config('client_encoding', $1, false)"),
        true
    ));
}

#[test]
fn a_prepared_statement_the_server_did_not_create_is_forgotten() {
    let (mut g, _) = gate(ITEMS);
    let mut expects = Vec::new();
    let m = query("PREPARE q AS SELECT * FROM items");
    assert!(matches!(
        g.check(&m, &[], true, &mut expects),
        Checked::Forward(_)
    ));
    let (_, name, generation) = expects[0].creates[0].clone();
    assert!(forwarded(&mut g, query("EXECUTE q")));
    g.forget_prepared(&name, generation);
    assert!(!forwarded(&mut g, query("EXECUTE q")));
}

/// A gate whose records go to an audit file; returns what the file holds after each step.
struct Audited {
    gate: Gate,
    store: Arc<PolicyStore>,
    log: AuditLog,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// An audit log in a directory of its own, written only when flushed.
fn buffered_log() -> (tempfile::TempDir, std::path::PathBuf, AuditLog) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(
        &path,
        crate::audit::Durability::Buffered,
        std::time::Duration::from_secs(60),
    )
    .unwrap();
    (dir, path, log)
}

impl Audited {
    fn new(policy: &str) -> Audited {
        let (dir, path, log) = buffered_log();
        let (gate, store) = gate(policy);
        let info = test_info(Some("s-0"), &gate.info.facts.identity);
        let mut gate = Gate::new(
            Some(log.clone()),
            store.clone(),
            store.generation(),
            gate.principal,
            (*gate.resolver).clone(),
            false,
            info,
        );
        gate.use_catalog(Ok(Arc::new(crate::catalog::Snapshot::default())));
        Audited {
            gate,
            store,
            log,
            path,
            _dir: dir,
        }
    }

    /// Checks `m` and returns the records it wrote.
    fn check(&mut self, m: FrontendMessage<'_>) -> Vec<Value> {
        let before = self.lines().len();
        forwarded(&mut self.gate, m);
        let records = self.gate.take_records().records;
        self.log.append(records).unwrap();
        let _ = self.log.flush();
        self.lines().split_off(before)
    }

    /// Checks `messages` as one batch (read together, recorded before any is forwarded);
    /// returns the records written and the responses expected.
    fn batch(&mut self, messages: &[FrontendMessage<'_>]) -> (Vec<Value>, Vec<Expect>) {
        let before = self.lines().len();
        let mut expects = Vec::new();
        for m in messages {
            self.gate.check(m, &[], true, &mut expects);
        }
        self.log.append(self.gate.take_records().records).unwrap();
        let _ = self.log.flush();
        (self.lines().split_off(before), expects)
    }

    fn lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// The record's fields, in order.
fn keys(r: &Value) -> String {
    let keys: Vec<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
    keys.join(" ")
}

#[test]
fn an_execution_points_to_its_statement_record_and_says_its_own_decision() {
    let mut a = Audited::new(ITEMS);
    let parse = FrontendMessage::Parse {
        name: b"s",
        sql: b"SELECT * FROM items",
        param_types: 0,
    };
    let bind = FrontendMessage::Bind {
        portal: b"",
        statement: b"s",
        params: 0,
    };
    let [p] = &a.check(parse)[..] else { panic!() };
    assert_eq!(
        keys(p),
        "v id kind session principal role database protocol statement decision policies \
         sql statements ts hash"
    );
    assert_eq!(
        (&p["v"], &p["kind"], &p["statement"]),
        (&json!(2), &json!("statement"), &json!("s"))
    );
    assert_eq!(
        p["statements"],
        json!([{"command": "select", "node": "SelectStmt",
                "relations": [{"name": "items", "access": "select"}]}])
    );
    assert!(a.check(bind).is_empty(), "an allowed Bind decides nothing");
    let [e] = &a.check(execute())[..] else {
        panic!()
    };
    // Allowed by the policies that allowed its statement: they are not repeated.
    assert_eq!(keys(e), "v id kind of decision ts hash");
    assert_eq!((&e["kind"], &e["of"]), (&json!("execute"), &p["id"]));
    // Allowed by another policy now (reloaded): the execution names it.
    a.store
        .replace(Policy::parse(&format!("@id(\"other\")\n{ITEMS}")).unwrap());
    a.gate.refresh_policy();
    let [o] = &a.check(execute())[..] else {
        panic!()
    };
    assert_eq!(keys(o), "v id kind of decision policies ts hash");
    assert_eq!(o["policies"], json!(["other"]));
    // Revoked: the next Execute of the same portal is a deny that points to it too.
    a.store.replace(Policy::parse("").unwrap());
    a.gate.refresh_policy();
    let [d] = &a.check(execute())[..] else {
        panic!()
    };
    assert_eq!((&d["of"], &d["decision"]), (&p["id"], &json!("deny")));
    assert_eq!(d["denied"], "select on table public.items");
    assert!(d.get("policies").is_none() && d.get("sql").is_none(), "{d}");
}

/// Parse, Bind, Execute of the unnamed statement in one batch (pgbench -M extended, most
/// drivers): one decision record, which says it was executed, and one completion (the
/// Execute's); a ParseComplete writes none.
#[test]
fn an_unnamed_statement_run_at_once_has_one_record() {
    let mut a = Audited::new(ITEMS);
    let describe = FrontendMessage::Describe {
        target: Target::Portal,
        name: b"",
    };
    let select = || parse("SELECT * FROM items");
    let (records, expects) =
        a.batch(&[select(), bind(), describe, execute(), FrontendMessage::Sync]);
    let [p] = &records[..] else {
        panic!("{records:?}")
    };
    assert_eq!(
        (&p["kind"], &p["executed"]),
        (&json!("statement"), &json!(true))
    );
    assert_eq!(p["sql"], "SELECT * FROM items");
    let owed: Vec<_> = expects
        .iter()
        .map(|e| (e.kind, e.record.clone(), e.execution_follows))
        .collect();
    let id = p["id"].as_str().map(str::to_owned);
    assert_eq!(
        owed,
        [
            (ExpectKind::Parse, id.clone(), true),
            (ExpectKind::Bind, None, false),
            (ExpectKind::Describe, None, false),
            (ExpectKind::Execute, id.clone(), false),
            (ExpectKind::Sync, None, false),
        ]
    );
    // Executed twice: the second execution has its record, pointing to the first.
    let (records, _) = a.batch(&[select(), bind(), execute(), execute()]);
    let [p, e] = &records[..] else {
        panic!("{records:?}")
    };
    assert_eq!((&p["executed"], &e["of"]), (&json!(true), &p["id"]));
    // Executed in a later batch than its Parse (whose record is written by then).
    let (records, _) = a.batch(&[select()]);
    assert!(records[0].get("executed").is_none());
    let (records, _) = a.batch(&[bind(), execute()]);
    assert_eq!(records[0]["kind"], "execute");
    // A named statement, or a named portal: the execution is a record of its own.
    let named = FrontendMessage::Parse {
        name: b"s",
        sql: b"SELECT * FROM items",
        param_types: 0,
    };
    let bind_named = FrontendMessage::Bind {
        portal: b"",
        statement: b"s",
        params: 0,
    };
    let (records, _) = a.batch(&[named, bind_named, execute()]);
    assert_eq!((records.len(), &records[1]["kind"]), (2, &json!("execute")));
    let to_portal = FrontendMessage::Bind {
        portal: b"p",
        statement: b"",
        params: 0,
    };
    let run_portal = FrontendMessage::Execute {
        portal: b"p",
        max_rows: 0,
    };
    let (records, _) = a.batch(&[select(), to_portal, run_portal]);
    assert_eq!((records.len(), &records[1]["kind"]), (2, &json!("execute")));
    // Decided by other policies than its Parse (a reload between the two): its own record.
    let mut expects = Vec::new();
    a.gate.check(&select(), &[], true, &mut expects);
    a.gate.check(&bind(), &[], true, &mut expects);
    a.store
        .replace(Policy::parse(&format!("@id(\"other\")\n{ITEMS}")).unwrap());
    a.gate.refresh_policy();
    a.gate.check(&execute(), &[], true, &mut expects);
    let records = a.gate.take_records().records;
    assert_eq!(records.len(), 2);
    assert!(expects.iter().all(|e| !e.execution_follows));
}

#[test]
fn executions_whose_statement_record_is_not_known_carry_their_own_text() {
    let mut a = Audited::new(EVERYTHING);
    // Prepared by SQL PREPARE: its record is the whole query string's.
    a.check(query("PREPARE q AS SELECT 1; SELECT 2"));
    a.check(FrontendMessage::Bind {
        portal: b"p",
        statement: b"q",
        params: 0,
    });
    let [e] = &a.check(FrontendMessage::Execute {
        portal: b"p",
        max_rows: 0,
    })[..] else {
        panic!()
    };
    assert!(e.get("of").is_none(), "{e}");
    assert_eq!(
        (&e["kind"], &e["session"]),
        (&json!("execute"), &json!("s-0"))
    );
    assert_eq!((&e["portal"], &e["statement"]), (&json!("p"), &json!("q")));
    assert_eq!(e["sql"], "PREPARE q AS SELECT 1; SELECT 2");
    assert_eq!(e["statements"][0]["prepares"], "q");
    // A cursor's portal, never bound: nothing to point to, and the session is named.
    let [c] = &a.check(FrontendMessage::Execute {
        portal: b"c",
        max_rows: 10,
    })[..] else {
        panic!()
    };
    assert_eq!(
        keys(c),
        "v id kind session principal role database portal decision reason ts hash"
    );
}

#[test]
fn completions_say_each_fact_once() {
    let (_dir, path, log) = buffered_log();
    log.append(vec![
        completion_record("r-1", Some("00000"), Some(1), Some("SELECT 1"), 7),
        completion_record("r-2", Some("00000"), Some(3), Some("INSERT 0 2"), 7),
        completion_record("r-3", Some("42501"), None, None, 7),
        completion_record("r-4", None, None, None, 7),
        completion_record("r-5", Some("00000"), Some(0), None, 7),
    ])
    .unwrap();
    let _ = log.flush();
    let text = std::fs::read_to_string(&path).unwrap();
    let bodies: Vec<&str> = text
        .lines()
        .map(|l| &l[..l.find(",\"ts\":").unwrap()])
        .collect();
    assert_eq!(
        bodies,
        [
            r#"{"v":2,"kind":"completion","of":"r-1","tag":"SELECT 1","duration_us":7"#,
            // A query string of several statements: the tag is the last one's.
            r#"{"v":2,"kind":"completion","of":"r-2","tag":"INSERT 0 2","rows":3,"duration_us":7"#,
            r#"{"v":2,"kind":"completion","of":"r-3","sqlstate":"42501","duration_us":7"#,
            r#"{"v":2,"kind":"completion","of":"r-4","skipped":true,"duration_us":7"#,
            // An empty query: no tag.
            r#"{"v":2,"kind":"completion","of":"r-5","rows":0,"duration_us":7"#,
        ]
    );
}

/// Whether a simple Query of `sql` is forwarded.
fn runs(gate: &mut Gate, sql: &str) -> bool {
    forwarded(gate, query(sql))
}

#[test]
fn a_policy_tells_a_function_s_overloads_apart_by_what_the_call_may_run() {
    let (mut gate, _) = gate(
        r#"
        permit(principal, action, resource);
        forbid(principal, action == PgIam::Action::"execute", resource)
          when { context has overloads && context.overloads.contains("f(text, text)") };
        "#,
    );
    let functions = crate::catalog::Snapshot::TEST_OVERLOADS;
    gate.use_catalog(Ok(Arc::new(crate::catalog::Snapshot::for_tests(
        &[],
        &functions,
    ))));
    assert!(runs(&mut gate, "SELECT f(1)"));
    assert!(!runs(&mut gate, "SELECT f('a', 'b')"));
    assert!(!runs(&mut gate, "SELECT public.f(a => 'a', b => 'b')"));
    assert!(!runs(
        &mut gate,
        "SELECT f(1) FROM t WHERE f('a', 'b') IS NULL"
    ));
    assert!(runs(&mut gate, "SELECT * FROM f(2)"));
    // Another schema's f is not that overload.
    assert!(runs(&mut gate, "SELECT other.f('a', 'b')"));
    // An operator's function is named by its signature too.
    let rows = [["o", "===", "public", "public", "f", "text, text"]];
    gate.use_catalog(Ok(Arc::new(crate::catalog::Snapshot::for_tests(
        &rows, &functions,
    ))));
    assert!(!runs(&mut gate, "SELECT 'a' === 'b'"));
}

#[test]
fn operators_and_casts_ask_for_the_functions_the_catalog_says_they_run() {
    let (mut gate, _) = gate(
        r#"
        permit(principal, action, resource);
        forbid(principal, action == PgIam::Action::"execute",
               resource == PgIam::Function::"app.public.leak");
        "#,
    );
    assert!(runs(&mut gate, "SELECT 1 === 2"));
    let catalog = crate::catalog::Snapshot::for_tests(
        &[["o", "===", "public", "public", "leak", "integer, integer"]],
        &[],
    );
    gate.use_catalog(Ok(Arc::new(catalog)));
    assert!(!runs(&mut gate, "SELECT 1 === 2"));
    assert!(!runs(&mut gate, "SELECT 1 OPERATOR(public.===) 2"));
    assert!(runs(&mut gate, "SELECT 1 OPERATOR(other.===) 2"));
    assert!(runs(&mut gate, "SELECT 1 = 2"));
    // No catalog: a statement that needs it is refused; one that does not goes on.
    gate.use_catalog(Err(Arc::from("connection refused")));
    assert!(!runs(&mut gate, "SELECT 1 = 2"));
    assert!(!runs(&mut gate, "SELECT * FROM t"));
    assert!(runs(&mut gate, "BEGIN"));
}
