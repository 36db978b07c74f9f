use super::*;

const BASE: &str = r#"
    state_dir = "/tmp/state"
    [listen]
    tcp = "127.0.0.1:6432"
    [upstream]
    host = "127.0.0.1"
    [roles.app]
    password_file = "/etc/app.pw"
    [policy]
    file = "/etc/pgiam/policy.cedar"
"#;

fn parse(extra: &str) -> Result<Config, ConfigError> {
    Config::parse(&format!("{BASE}\n{extra}"), Path::new("test.toml"))
}

#[test]
fn defaults() {
    let c = parse("").unwrap();
    assert_eq!(c.client_tls, ClientTls::Generate);
    assert_eq!(c.upstream.port, 5432);
    assert_eq!(c.upstream.tls, UpstreamTls::Disable);
    assert_eq!(c.listen.unix_mode, 0o666);
    assert_eq!(c.limits.max_message_size, 64 << 20);
    assert_eq!(c.upstream.connect, UpstreamConnect::AtLogin);
}

#[test]
fn search_path_setting_quotes_what_needs_it() {
    let mut c = parse("").unwrap();
    assert_eq!(c.policy.search_path_setting(), "public");
    c.policy.search_path = vec!["$user".into(), "App".into(), "a\"b".into(), "x_1".into()];
    assert_eq!(
        c.policy.search_path_setting(),
        r#""$user", "App", "a""b", x_1"#
    );
}

#[test]
fn first_matching_mapping_wins() {
    let c = parse(
        r#"
        [roles.admin]
        [[mapping]]
        principal = "unit:a.service"
        database = "app"
        role = "admin"
        [[mapping]]
        principal = "uid:1000"
        database = "*"
        role = "app"
        "#,
    )
    .unwrap();
    let p = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        c.find_mapping(&p(&["uid:1000", "unit:a.service"]), "app")
            .unwrap()
            .role,
        "admin"
    );
    assert_eq!(
        c.find_mapping(&p(&["uid:1000"]), "other").unwrap().role,
        "app"
    );
    assert!(c.find_mapping(&p(&["uid:1001"]), "app").is_none());
}

#[test]
fn endpoint_specs() {
    use std::net::IpAddr;
    assert_eq!(
        EndpointSpec::parse("10.0.0.0/8"),
        Ok(EndpointSpec::Net {
            addr: "10.0.0.0".parse::<IpAddr>().unwrap(),
            prefix: 8
        })
    );
    assert_eq!(
        EndpointSpec::parse("::1"),
        Ok(EndpointSpec::Net {
            addr: "::1".parse::<IpAddr>().unwrap(),
            prefix: 128
        })
    );
    assert_eq!(
        EndpointSpec::parse("db.internal"),
        Ok(EndpointSpec::Host("db.internal".into()))
    );
    assert!(EndpointSpec::parse("10.0.0.0/33").is_err());
    assert!(EndpointSpec::parse("db internal").is_err());
    let err = parse("[interception]\nendpoints = []")
        .unwrap_err()
        .to_string();
    assert!(err.contains("nothing would be intercepted"), "{err}");
    assert!(parse("[interception]\nendpoints = [\"10.0.0.7\"]").is_ok());
}

#[test]
fn invalid_files_are_explained() {
    for (extra, needle) in [
        (
            "[[mapping]]\nprincipal = \"alice\"\ndatabase = \"a\"\nrole = \"app\"",
            "KIND:VALUE",
        ),
        (
            "[[mapping]]\nprincipal = \"pod:x\"\ndatabase = \"a\"\nrole = \"app\"",
            "unknown principal kind",
        ),
        (
            "[[mapping]]\nprincipal = \"uid:1\"\ndatabase = \"a\"\nrole = \"nope\"",
            "no [roles.nope]",
        ),
        ("bogus = 1", "unknown field"),
    ] {
        let err = parse(extra).unwrap_err().to_string();
        assert!(err.contains(needle), "{err:?} should mention {needle:?}");
    }
    let err = Config::parse(
        &BASE.replace("127.0.0.1:6432", "0.0.0.0:6432"),
        Path::new("t.toml"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("only loopback"), "{err}");
    let err = Config::parse(
        &BASE.replace(
            "host = \"127.0.0.1\"",
            "host = \"db\"\ntls = \"verify-full\"",
        ),
        Path::new("t.toml"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("ca_file"), "{err}");
}
