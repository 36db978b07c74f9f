use super::*;
use crate::identity::Source;
use crate::sql::QualifiedName;

fn principal() -> Principal {
    let mut id = Identity::from_kernel_facts(Source::UnixPeerCred, 1000, 1000, None);
    id.unit = Some("billing.service".into());
    Principal::new("unit:billing.service", "billing", "app", &id)
}

#[test]
fn sessions_with_the_same_facts_share_one_principal() {
    let mut id = Identity::from_kernel_facts(Source::UnixPeerCred, 4242, 4242, None);
    id.unit = Some("pool.service".into());
    let a = Principal::shared("unit:pool.service", "pool", "app", &id);
    let b = Principal::shared("unit:pool.service", "pool", "app", &id);
    assert!(Arc::ptr_eq(&a, &b));
    // Any fact a policy can read makes another principal.
    let mut other = id.clone();
    other.exe = Some(crate::identity::Executable::Recorded(
        "/usr/bin/other".into(),
    ));
    let c = Principal::shared("unit:pool.service", "pool", "app", &other);
    assert!(!Arc::ptr_eq(&a, &c));
    assert!(!Arc::ptr_eq(
        &a,
        &Principal::shared("unit:pool.service", "pool", "db2", &id)
    ));
    assert_eq!(
        a.entity,
        Principal::new("unit:pool.service", "pool", "app", &id).entity
    );
}

/// A principal's sessions share what the policy answered it: a new session of the same
/// principal is answered without Cedar (here: the answer of a policy that has since changed,
/// under the same generation), a different principal never gets it, and a new generation
/// asks again.
#[test]
fn a_principal_s_sessions_share_its_decisions_and_nothing_else_does() {
    let allow = Policy::parse("permit(principal, action, resource);").unwrap();
    let deny =
        Policy::parse("permit(principal, action, resource) when { principal.uid == 1 };").unwrap();
    let connect = Ask::on_database(Action::Connect, "connect");
    let mut id = Identity::from_kernel_facts(Source::UnixPeerCred, 4343, 4343, None);
    id.unit = Some("shared-decisions.service".into());
    let a = Principal::shared("unit:shared-decisions.service", "r", "app", &id);
    assert!(a.decide(&allow, 7, &connect).allowed);
    // Another session of the same principal (same facts): the answer it was given.
    let b = Principal::shared("unit:shared-decisions.service", "r", "app", &id);
    assert!(Arc::ptr_eq(&a, &b));
    let mut session = DecisionCache::default();
    assert!(
        session
            .decide_all(&deny, 7, &b, std::slice::from_ref(&connect))
            .allowed
    );
    // A principal that differs in one fact is asked for itself.
    let mut other = id.clone();
    other.cgroup = Some("/elsewhere".into());
    let c = Principal::shared("unit:shared-decisions.service", "r", "app", &other);
    assert!(!c.decide(&deny, 7, &connect).allowed);
    // A newer generation asks again, and what it is answered replaces what was kept.
    assert!(!b.decide(&deny, 8, &connect).allowed);
    assert!(!a.decide(&allow, 8, &connect).allowed);
    // An older one is answered (by the policy it holds) without touching what is kept.
    assert!(a.decide(&allow, 7, &connect).allowed);
    assert!(!a.decide(&allow, 8, &connect).allowed);
    // A policy that reads the clock is never answered from what another session was told
    // (what is kept under generation 8 is a refusal), even when it names the clock by escapes.
    for clocked in [
        "permit(principal, action, resource) when { context.now > 0 };",
        r#"permit(principal, action, resource) when { context["n\u{6f}w"] > 0 };"#,
    ] {
        let clocked = Policy::parse(clocked).unwrap();
        assert!(a.decide(&clocked, 8, &connect).allowed);
    }
}

const POLICY: &str = r#"
    @id("read-public")
    permit(principal, action == PgIam::Action::"select", resource in PgIam::Schema::"app.public");
    @id("builtins")
    permit(principal, action == PgIam::Action::"execute", resource);
    @id("no-secrets")
    forbid(principal, action, resource == PgIam::Table::"app.public.secret");
    @id("no-file-functions")
    forbid(principal, action == PgIam::Action::"execute", resource)
      when { resource.name like "pg_read*" };
    @id("billing-writes")
    permit(principal, action in [PgIam::Action::"insert", PgIam::Action::"update"],
           resource == PgIam::Table::"app.public.invoices")
      when { principal has unit && principal.unit == "billing.service" };
"#;

fn decide(sql: &str) -> Decision {
    let policy = Policy::parse(POLICY).unwrap();
    let r = Resolver::new(&["public".into()], "billing");
    let stmts = crate::sql::classify(sql, true).unwrap();
    let asks: Vec<Ask> = stmts.iter().flat_map(|s| r.asks(s)).collect();
    policy.decide_all(&principal(), &asks)
}

/// A statement's decisions combine into one that names each policy once, in order; a lone
/// decision (a cached one, handed out for every statement like it) is passed on, not copied.
#[test]
fn decisions_combine_without_copying_a_lone_one() {
    let allow = |names: &[&str]| Decision {
        allowed: true,
        policies: names
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .into(),
        denied: None,
        reason: None,
    };
    let lone = allow(&["b", "a"]);
    assert_eq!(lone.policies[..], ["a", "b"]);
    let combined = Decision::all([lone.clone()]);
    assert!(Arc::ptr_eq(&combined.policies.0, &lone.policies.0));
    let combined = Decision::all([
        allow(&["read"]),
        allow(&["builtins", "read"]),
        allow(&["read"]),
    ]);
    assert_eq!(combined.policies[..], ["builtins", "read"]);
    let denied = Decision::refuse("select on table public.secret", "no");
    let combined = Decision::all([allow(&["read"]), denied.clone(), allow(&["other"])]);
    assert_eq!(combined, denied);
    assert!(Decision::all([]).allowed);
}

#[test]
fn decisions_name_their_policies() {
    let d = decide("SELECT lower(name) FROM accounts");
    assert!(d.allowed, "{d:?}");
    assert_eq!(d.policies[..], ["builtins", "read-public"]);
    let d = decide("SELECT * FROM Secret");
    assert!(!d.allowed);
    assert_eq!(d.policies[..], ["no-secrets"]);
    assert_eq!(d.denied.as_deref(), Some("select on table public.secret"));
    let d = decide("DELETE FROM accounts");
    assert!(!d.allowed);
    assert!(d.policies.is_empty(), "denied by default");
    assert!(decide("INSERT INTO invoices SELECT * FROM accounts").allowed);
    assert!(!decide("INSERT INTO invoices SELECT * FROM secret").allowed);
    assert!(!decide("SELECT pg_read_file('/etc/passwd')").allowed);
    assert!(!decide("SET ROLE postgres").allowed);
    assert!(!decide("DO $$ BEGIN END $$").allowed);
    assert!(!decide("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'select 1'").allowed);
    // Another schema, qualified, is not public.
    assert!(!decide("SELECT * FROM other.accounts").allowed);
}

#[test]
fn unqualified_names_are_checked_in_every_schema_they_could_mean() {
    // pg_settings would be pg_catalog.pg_settings, which read-public does not cover.
    assert!(!decide("SELECT * FROM pg_settings").allowed);
    let mut r = Resolver::new(&["$user".into(), "public".into()], "billing");
    let q = QualifiedName {
        schema: None,
        name: "t".into(),
    };
    assert_eq!(r.relation_schemas(&q), ["billing", "public"]);
    r.temp = true;
    assert_eq!(r.relation_schemas(&q), ["pg_temp", "billing", "public"]);
    assert_eq!(r.function_schemas(&q), ["pg_catalog", "billing", "public"]);
}

fn widen(r: &mut Resolver, sql: &str) -> Result<(), Decision> {
    for s in crate::sql::classify(sql, true).unwrap() {
        if let Some(d) = fixed_refusal(&s, false) {
            return Err(d);
        }
        r.widen_for(&s)?;
    }
    Ok(())
}

#[test]
fn pg_dumps_pg_settings_row_is_a_setting_only_from_the_catalogs_view() {
    let sql = "SELECT set_config(name, 'view', false) FROM pg_settings \
               WHERE name = 'restrict_nonsystem_relation_kind'";
    let s = crate::sql::classify(sql, true).unwrap().remove(0);
    let set_role = |r: &Resolver| r.asks(&s).iter().any(|a| a.action == Action::SetRole);
    let mut r = Resolver::new(&["public".into()], "u");
    assert!(!set_role(&r), "the catalog's view: the setting named");
    // A temporary pg_settings, or a path that puts pg_catalog after another schema,
    // could hold any row: then it is what a setting that is not a constant is.
    r.temp = true;
    assert!(set_role(&r));
    let r = Resolver::new(&["public".into(), "pg_catalog".into()], "u");
    assert!(set_role(&r));
}

#[test]
fn a_relation_every_server_has_in_pg_catalog_is_found_only_there() {
    assert!(
        CATALOG_RELATIONS.windows(2).all(|w| w[0] < w[1]),
        "sorted, no repeats"
    );
    let name = |n: &str| QualifiedName {
        schema: None,
        name: n.into(),
    };
    let mut r = Resolver::new(&["public".into(), "app".into()], "u");
    assert_eq!(r.relation_schemas(&name("pg_settings")), ["pg_catalog"]);
    // A pg_* name not in every server's catalog may be found on the path.
    assert_eq!(
        r.relation_schemas(&name("pg_stat_io")),
        ["pg_catalog", "public", "app"]
    );
    // A temporary relation shadows the catalog; a path that names pg_catalog puts it in
    // its place, after the schemas before it.
    r.temp = true;
    assert_eq!(
        r.relation_schemas(&name("pg_settings")),
        ["pg_temp", "pg_catalog"]
    );
    let r = Resolver::new(&["public".into(), "pg_catalog".into()], "u");
    assert_eq!(
        r.relation_schemas(&name("pg_settings")),
        ["public", "pg_catalog"]
    );
}

#[test]
fn every_schema_any_search_path_named_is_searched_and_the_set_only_grows() {
    let mut r = Resolver::new(&["public".into()], "billing");
    let t = QualifiedName {
        schema: None,
        name: "t".into(),
    };
    for sql in [
        r#"SET search_path = other, "$user", public"#,
        "RESET search_path",
        "SET search_path TO DEFAULT",
        "SELECT set_config('search_path', 'PG_TEMP, Public', true)",
        "SET LOCAL search_path = ''",
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET search_path = fn_path AS 'select 1'",
    ] {
        widen(&mut r, sql).unwrap();
    }
    assert_eq!(
        r.relation_schemas(&t),
        ["pg_temp", "public", "billing", "other", "fn_path"]
    );
    // Functions are never looked up in pg_temp unqualified.
    assert_eq!(
        r.function_schemas(&t),
        ["pg_catalog", "public", "billing", "other", "fn_path"]
    );
    let pg_class = QualifiedName {
        schema: None,
        name: "pg_class".into(),
    };
    assert_eq!(
        r.relation_schemas(&pg_class)[..2],
        ["pg_temp", "pg_catalog"]
    );
    // Named pg_catalog is searched for every relation, where it stands in the set.
    widen(&mut r, "SET search_path = pg_catalog").unwrap();
    assert_eq!(
        r.relation_schemas(&pg_class),
        [
            "pg_temp",
            "public",
            "billing",
            "other",
            "fn_path",
            "pg_catalog"
        ]
    );
    assert!(r.relation_schemas(&t).contains(&"pg_catalog".to_owned()));
    assert_eq!(
        r.function_schemas(&t),
        ["pg_catalog", "public", "billing", "other", "fn_path"]
    );
    // A qualified name is only itself.
    let q = QualifiedName {
        schema: Some("x".into()),
        name: "t".into(),
    };
    assert_eq!(r.relation_schemas(&q), ["x"]);
}

/// The decision on a query string, every statement's asks together.
fn decide_sql(policy: &Policy, r: &Resolver, sql: &str) -> Decision {
    let asks: Vec<Ask> = crate::sql::classify(sql, true)
        .unwrap()
        .iter()
        .flat_map(|s| r.asks(s))
        .collect();
    policy.decide_all(&principal(), &asks)
}

#[test]
fn reading_a_setting_is_one_action_however_it_is_read() {
    // POLICY permits every function and reading public tables, nothing of settings.
    let r = Resolver::new(&["public".into()], "billing");
    let decide = |policy: &Policy, sql: &str| decide_sql(policy, &r, sql);
    let none = Policy::parse(POLICY).unwrap();
    for sql in [
        "SHOW app.secret",
        "SHOW ALL",
        "SELECT current_setting('app.secret')",
        "SELECT pg_catalog.current_setting('app.secret', true)",
        "SELECT setting FROM pg_settings WHERE name = 'app.secret'",
        "SELECT * FROM pg_catalog.pg_file_settings",
        "SELECT * FROM pg_show_all_settings()",
    ] {
        let d = decide(&none, sql);
        assert!(!d.allowed, "{sql}");
        assert_eq!(d.denied.as_deref(), Some("show on database app"), "{sql}");
    }
    let work_mem = Policy::parse(&format!(
        "{POLICY}\npermit(principal, action == PgIam::Action::\"show\", resource) \
         when {{ context has parameter && context.parameter == \"work_mem\" }};"
    ))
    .unwrap();
    for sql in [
        "SHOW work_mem",
        "SHOW Work_Mem",
        "SELECT current_setting('work_mem')",
    ] {
        assert!(decide(&work_mem, sql).allowed, "{sql}");
    }
    for sql in [
        "SHOW ALL",
        "SELECT current_setting(name) FROM t",
        "SHOW app.secret",
    ] {
        assert!(!decide(&work_mem, sql).allowed, "{sql}");
    }
    // A function of that name elsewhere is a function like any other.
    let d = decide(&none, "SELECT public.current_setting('x')");
    assert_eq!(d.denied.as_deref(), Some("show on database app"));
}

#[test]
fn a_locking_read_asks_lock_on_what_it_reads() {
    let policy = Policy::parse(POLICY).unwrap();
    let r = Resolver::new(&["public".into()], "billing");
    for sql in [
        "SELECT * FROM accounts FOR UPDATE",
        "SELECT * FROM accounts FOR NO KEY UPDATE OF accounts NOWAIT",
        "SELECT * FROM accounts a FOR SHARE OF a SKIP LOCKED",
        "SELECT * FROM accounts FOR KEY SHARE",
        "SELECT * FROM (SELECT * FROM accounts FOR UPDATE) s",
        "WITH x AS (SELECT * FROM accounts FOR UPDATE) SELECT * FROM x",
    ] {
        let s = &crate::sql::classify(sql, true).unwrap()[0];
        let d = policy.decide_all(&principal(), &r.asks(s));
        assert!(!d.allowed, "{sql}");
        assert_eq!(
            d.denied.as_deref(),
            Some("lock on table public.accounts"),
            "{sql}"
        );
    }
    let s = &crate::sql::classify("SELECT * FROM accounts", true).unwrap()[0];
    assert!(policy.decide_all(&principal(), &r.asks(s)).allowed);
}

#[test]
fn a_name_forbidden_in_any_schema_a_search_path_named_is_refused() {
    let policy = Policy::parse(&format!(
        "{POLICY}\n@id(\"settings\") permit(principal, action == PgIam::Action::\"set\", resource);"
    ))
    .unwrap();
    let mut r = Resolver::new(&["public".into()], "billing");
    let decide = |r: &Resolver, sql: &str| decide_sql(&policy, r, sql);
    assert!(decide(&r, "SELECT * FROM accounts").allowed);
    widen(&mut r, "SET search_path = other").unwrap();
    let d = decide(&r, "SELECT * FROM accounts");
    assert!(!d.allowed);
    assert_eq!(d.denied.as_deref(), Some("select on table other.accounts"));
    // Qualified, the allowed table is still allowed.
    assert!(decide(&r, "SELECT * FROM public.accounts").allowed);
    // A policy can refuse the change itself.
    let no_set = Policy::parse(&format!(
        "{POLICY}\nforbid(principal, action == PgIam::Action::\"set\", resource) \
         when {{ context has parameter && context.parameter == \"search_path\" }};"
    ))
    .unwrap();
    let s = &crate::sql::classify("SET search_path = public", true).unwrap()[0];
    assert!(!no_set.decide_all(&principal(), &r.asks(s)).allowed);
    // So can it a choice made at startup: asked with every statement.
    let mut chosen = Resolver::new(&["public".into()], "billing");
    chosen.chosen_at_startup = true;
    let s = &crate::sql::classify("SELECT * FROM accounts", true).unwrap()[0];
    assert!(policy.decide_all(&principal(), &chosen.asks(s)).allowed);
    let d = no_set.decide_all(&principal(), &chosen.asks(s));
    assert_eq!(d.denied.as_deref(), Some("set on database app"));
}

#[test]
fn dollar_user_and_a_role_change_never_meet() {
    // $user named, then a role change; a role change, then $user named; both at once.
    let mut r = Resolver::new(&["$user".into(), "public".into()], "billing");
    assert_eq!(r.schemas(), ["billing", "public"]);
    assert!(widen(&mut r, "SET ROLE admin").is_err());
    let mut r = Resolver::new(&["public".into()], "billing");
    widen(&mut r, "SET ROLE admin").unwrap();
    assert!(widen(&mut r, r#"SET search_path = "$user""#).is_err());
    assert!(widen(&mut r, "SELECT set_config('search_path', '$user', false)").is_err());
    widen(&mut r, "SET search_path = other").unwrap();
    let mut r = Resolver::new(&["public".into()], "billing");
    assert!(widen(&mut r, r#"SET ROLE admin; SET search_path = "$user""#).is_err());
    let s = &crate::sql::classify(r#"SET search_path = "$user""#, true).unwrap()[0];
    assert!(Resolver::new(&[], "b").would_widen(s));
}

#[test]
fn search_paths_pgiam_cannot_read_or_bound_are_refused_by_any_policy() {
    let mut r = Resolver::new(&["public".into()], "billing");
    for sql in [
        "SELECT set_config('search_path', $1, false)",
        "SELECT set_config('search_path', lower('X'), false)",
        "SELECT set_config(lower('SEARCH_PATH'), lower('x'), false)",
    ] {
        let d = widen(&mut r, sql).unwrap_err();
        assert_eq!(d.denied.as_deref(), Some("set search_path"), "{sql}");
        assert!(d.policies.is_empty());
    }
    assert_eq!(r.schemas(), ["public"]);
    // pg_dump's first statement names nothing.
    widen(
        &mut r,
        "SELECT pg_catalog.set_config('search_path', '', false)",
    )
    .unwrap();
    assert_eq!(r.schemas(), ["public"]);
    let many: Vec<String> = (0..Resolver::MAX_SCHEMAS)
        .map(|i| format!("s{i}"))
        .collect();
    let d = widen(&mut r, &format!("SET search_path = {}", many.join(", "))).unwrap_err();
    assert!(d.reason.unwrap().contains("at most"));
}

fn refused_in(sql: &str, session: &SessionSettings) -> Option<String> {
    crate::sql::classify(sql, session.standard_conforming_strings)
        .unwrap()
        .iter()
        .find_map(|s| fixed_refusal_in(s, false, session))
        .map(|d| format!("{}: {}", d.denied.unwrap(), d.reason.unwrap()))
}

#[test]
fn standard_conforming_strings_may_be_set_to_the_value_in_force_only() {
    for at in [true, false] {
        let session = SessionSettings {
            standard_conforming_strings: at,
            standard_conforming_strings_at_login: at,
            ..SessionSettings::default()
        };
        let same = if at { "on" } else { "off" };
        let other = if at { "off" } else { "on" };
        for sql in [
            format!("SET standard_conforming_strings = {same}"),
            format!(
                "SET LOCAL standard_conforming_strings TO '{}'",
                same.to_uppercase()
            ),
            format!("SET standard_conforming_strings = {}", u8::from(at)),
            format!(
                "SET standard_conforming_strings = {}",
                if at { "yes" } else { "no" }
            ),
            format!(
                "SET standard_conforming_strings = {}",
                if at { "t" } else { "f" }
            ),
            format!("SELECT set_config('standard_conforming_strings', '{same}', false)"),
            "RESET standard_conforming_strings".into(),
            "SET standard_conforming_strings TO DEFAULT".into(),
            "RESET ALL".into(),
            "SELECT set_config('standard_conforming_strings', NULL, false)".into(),
            format!("ALTER ROLE r SET standard_conforming_strings = {same}"),
            format!(
                "CREATE FUNCTION f() RETURNS int LANGUAGE sql \
                 SET standard_conforming_strings = {same} AS 'select 1'"
            ),
            // Not a boolean, so not standard_conforming_strings if the setting is it.
            "SELECT set_config(name, 'view, foreign-table', false) FROM pg_settings".into(),
        ] {
            assert_eq!(refused_in(&sql, &session), None, "{sql} (at {same})");
        }
        for sql in [
            format!("SET standard_conforming_strings = {other}"),
            format!("SET LOCAL standard_conforming_strings = {other}"),
            format!("SELECT set_config('standard_conforming_strings', '{other}', true)"),
            format!("ALTER SYSTEM SET standard_conforming_strings = {same}"),
            format!("SELECT set_config(name, '{other}', false) FROM pg_settings"),
            "SET standard_conforming_strings = o".into(),
            "SET standard_conforming_strings = 'maybe'".into(),
            "SELECT set_config('standard_conforming_strings', lower('ON'), false)".into(),
            // No Bind to read it at.
            "SELECT set_config('standard_conforming_strings', $1, false)".into(),
        ] {
            let why = refused_in(&sql, &session).unwrap_or_else(|| panic!("{sql}"));
            assert!(
                why.contains(&format!("fixed for the session at {same}")),
                "{sql}: {why}"
            );
        }
    }
    // A value changed by a route pgiam did not see: RESET would change it back.
    let drifted = SessionSettings {
        standard_conforming_strings: false,
        standard_conforming_strings_at_login: true,
        ..SessionSettings::default()
    };
    assert!(refused_in("RESET standard_conforming_strings", &drifted).is_some());
    assert!(refused_in("SET standard_conforming_strings = off", &drifted).is_none());
    // A Parse leaves a bound parameter to its Bind.
    let parse = SessionSettings {
        parameters_at_bind: true,
        ..SessionSettings::default()
    };
    assert!(refused_in(
        "SELECT set_config('standard_conforming_strings', $1, false)",
        &parse
    )
    .is_none());
}

#[test]
fn client_encodings_must_be_ascii_safe_and_constant() {
    let session = SessionSettings::default();
    for sql in [
        "SET client_encoding = 'UTF8'",
        "SET client_encoding = 'LATIN1'",
        "SET NAMES 'latin-9'",
        "SET LOCAL client_encoding = euc_jp",
        "SET client_encoding TO DEFAULT",
        "RESET client_encoding",
        "SELECT set_config('client_encoding', 'EUC_KR', false)",
        "SELECT set_config('client_encoding', NULL, false)",
        "ALTER ROLE r SET client_encoding = 'WIN1251'",
        "SELECT set_config(name, 'view, foreign-table', false) FROM pg_settings",
    ] {
        assert_eq!(refused_in(sql, &session), None, "{sql}");
    }
    for (sql, why) in [
        ("SET client_encoding = 'SJIS'", "can contain ASCII bytes"),
        (
            "SET client_encoding TO 'Shift_JIS'",
            "can contain ASCII bytes",
        ),
        ("SET NAMES 'big5'", "can contain ASCII bytes"),
        ("SET LOCAL client_encoding = gbk", "can contain ASCII bytes"),
        (
            "SELECT set_config('client_encoding', 'GB18030', false)",
            "can contain ASCII bytes",
        ),
        (
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET client_encoding = 'UHC' \
             AS 'select 1'",
            "can contain ASCII bytes",
        ),
        (
            "SELECT set_config(name, 'JOHAB', false) FROM pg_settings",
            "can contain ASCII bytes",
        ),
        ("SET client_encoding = 'klingon'", "not an encoding name"),
        (
            "SELECT set_config('client_encoding', lower('SJIS'), false)",
            "must be a constant",
        ),
        (
            "SELECT set_config('client_encoding', $1, false)",
            "must be a constant",
        ),
    ] {
        let got = refused_in(sql, &session).unwrap_or_else(|| panic!("{sql}"));
        assert!(got.contains(why), "{sql}: {got}");
    }
}

#[test]
fn names_outside_ascii_are_refused_once_an_encoding_other_than_utf8_was_used() {
    let sql = r#"SELECT * FROM "é" WHERE v = 'ü' -- ß"#;
    assert_eq!(refused_in(sql, &SessionSettings::default()), None);
    let latin1 = SessionSettings {
        non_utf8_encoding: Some(ClientEncoding::Latin1),
        ..SessionSettings::default()
    };
    let why = refused_in(sql, &latin1).unwrap();
    assert!(why.contains("client_encoding LATIN1"), "{why}");
    assert_eq!(
        refused_in("SELECT * FROM t WHERE v = 'ü' -- ß", &latin1),
        None
    );
}

#[test]
fn bad_policies_are_refused_with_the_reason() {
    let e = Policy::parse("permit(principal, action == PgIam::Action::\"selekt\", resource);")
        .err()
        .unwrap();
    assert!(e.contains("selekt"), "{e}");
    let e = Policy::parse("permit(principal, action, resource) when { principal.nope == 1 };")
        .err()
        .unwrap();
    assert!(e.contains("nope"), "{e}");
    assert!(Policy::parse("permit(principal, action, resource").is_err());
    assert!(Policy::parse("@id(\"a\") permit(principal, action, resource);\n@id(\"a\") permit(principal, action, resource);").is_err());
    assert_eq!(Policy::parse("").unwrap().len(), 0);
}
