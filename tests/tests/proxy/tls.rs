//! TLS toward clients (SSLRequest and PostgreSQL 17 direct SSL) and toward the server.

use std::io::{Read, Write};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use pgiam_tests::{PgOptions, TestCa};

use crate::fixture::*;

/// Clients that verify the server trust pgiam's CA (generated in state_dir) and are shown a
/// certificate for the very name they dialled: the host name they sent (SNI), else the
/// address. Another CA's clients are refused by their own verification.
#[test]
fn client_tls_generated_certificate_and_plaintext() {
    let env = Env::start();
    let ca = env.dir.path().join("state/client-ca.crt");
    let verify = |host: &str, mode: &str, root: &std::path::Path| {
        format!(
            "host={host} hostaddr=127.0.0.1 port={} dbname={DB} user=x sslmode={mode} sslrootcert={}",
            env.tcp.port(),
            root.display()
        )
    };
    for (host, mode) in [
        ("localhost", "verify-full"),
        ("db.example.internal", "verify-full"),
        ("127.0.0.1", "verify-full"),
        ("db.example.internal", "verify-ca"),
    ] {
        assert_eq!(
            psql_ok(&verify(host, mode, &ca), "select current_user"),
            ROLE,
            "{host} {mode}"
        );
    }
    // A client that trusts another CA refuses pgiam's certificate.
    let other = pgiam_tests::write_file(
        env.dir.path(),
        "other-ca.crt",
        &TestCa::new().cert_pem(),
        0o644,
    );
    let out = psql(&verify("localhost", "verify-full", &other), "select 1");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("certificate verify failed"),
        "{}",
        stderr(&out)
    );
    assert_eq!(psql_ok(&env.tcp_dsn("sslmode=require"), "select 1"), "1");
    assert_eq!(psql_ok(&env.tcp_dsn("sslmode=disable"), "select 1"), "1");
    let log = env.pgiam.log();
    assert!(log.contains("tls=true"), "{log}");
    assert!(log.contains("tls=false"), "{log}");
}

/// `mode = "ca"`: the operator's CA issues what clients are shown.
#[test]
fn client_tls_from_the_operators_ca() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let cert = pgiam_tests::write_file(dir.path(), "ca.crt", &ca.cert_pem(), 0o644);
    let key = pgiam_tests::write_file(dir.path(), "ca.key", &ca.key_pem(), 0o600);
    let env = Env::with(Setup {
        client_tls: format!(
            "mode = \"ca\"\ncert = \"{}\"\nkey = \"{}\"",
            cert.display(),
            key.display()
        ),
        ..Setup::default()
    });
    let dsn = format!(
        "host=db.example.internal hostaddr=127.0.0.1 port={} dbname={DB} user=x sslmode=verify-full sslrootcert={}",
        env.tcp.port(),
        cert.display()
    );
    assert_eq!(psql_ok(&dsn, "select current_user"), ROLE);
}

#[test]
fn client_tls_disabled_declines_ssl() {
    let env = Env::with(Setup {
        client_tls: "mode = \"disabled\"".into(),
        ..Setup::default()
    });
    let out = psql(&env.tcp_dsn("sslmode=require"), "select 1");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("does not support SSL"),
        "{}",
        stderr(&out)
    );
    assert_eq!(psql_ok(&env.tcp_dsn("sslmode=prefer"), "select 1"), "1");
}

/// TLS to pgiam over `tcp` (after an SSLRequest was answered), or a new connection.
fn tls_over(
    env: &Env,
    alpn: &[&[u8]],
    tcp: Option<std::net::TcpStream>,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    let cert = CertificateDer::from_pem_file(env.dir.path().join("state/client-ca.crt")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let conn =
        rustls::ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let tcp = tcp.unwrap_or_else(|| std::net::TcpStream::connect(env.tcp).unwrap());
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(15)))
        .unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// TLS to pgiam: direct SSL on a new connection.
fn tls_client(
    env: &Env,
    alpn: &[&[u8]],
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    tls_over(env, alpn, None)
}

#[test]
fn direct_ssl_needs_alpn_postgresql() {
    let env = Env::start();
    let mut tls = tls_client(&env, &[b"postgresql"]);
    tls.write_all(&Raw::startup_bytes(
        3 << 16,
        &[("user", "x"), ("database", DB)],
    ))
    .unwrap();
    let mut first = [0u8; 1];
    tls.read_exact(&mut first).unwrap();
    assert_eq!(
        first[0], b'R',
        "authentication follows a direct-SSL startup"
    );
    assert_eq!(tls.conn.alpn_protocol(), Some(&b"postgresql"[..]));

    // Without ALPN the connection is not served.
    let mut tls = tls_client(&env, &[]);
    let _ = tls.write_all(&Raw::startup_bytes(
        3 << 16,
        &[("user", "x"), ("database", DB)],
    ));
    let mut buf = [0u8; 16];
    assert!(
        !matches!(tls.read(&mut buf), Ok(n) if n > 0),
        "a direct-SSL client without ALPN must get nothing"
    );
}

fn tls_cluster(ca: &TestCa) -> (PgOptions, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca.issue_server_cert(&["localhost", "127.0.0.1"]);
    let cert = pgiam_tests::write_file(dir.path(), "server.crt", &cert, 0o644);
    let key = pgiam_tests::write_file(dir.path(), "server.key", &key, 0o600);
    (
        PgOptions {
            ssl: Some((cert, key)),
            ..PgOptions::default()
        },
        dir,
    )
}

#[test]
fn upstream_verify_full_against_a_test_ca() {
    let ca = TestCa::new();
    let (pg, _certs) = tls_cluster(&ca);
    let ca_dir = tempfile::tempdir().unwrap();
    let ca_file = pgiam_tests::write_file(ca_dir.path(), "ca.crt", &ca.cert_pem(), 0o644);
    let setup = Setup {
        pg,
        upstream: Some(format!(
        "host = \"127.0.0.1\"\nport = PGPORT\ntls = \"verify-full\"\nserver_name = \"localhost\"\nca_file = \"{}\"",
        ca_file.display()
        )),
        ..Setup::default()
    };
    let env = Env::with(setup);
    assert_eq!(
        psql_ok(
            &env.tcp_dsn(""),
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()"
        ),
        "t",
        "pgiam's connection to PostgreSQL is TLS"
    );
}

#[test]
fn upstream_verify_full_rejects_an_unknown_ca() {
    let ca = TestCa::new();
    let other = TestCa::new();
    let (pg, _certs) = tls_cluster(&ca);
    let ca_dir = tempfile::tempdir().unwrap();
    let wrong = pgiam_tests::write_file(ca_dir.path(), "other.crt", &other.cert_pem(), 0o644);
    let env = Env::with(Setup {
        pg,
        upstream: Some(format!(
            "host = \"127.0.0.1\"\nport = PGPORT\ntls = \"verify-full\"\nserver_name = \"localhost\"\nca_file = \"{}\"",
            wrong.display()
        )),
        ..Setup::default()
    });
    let out = psql(&env.tcp_dsn(""), "select 1");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("cannot open a connection to the database"),
        "{err}"
    );
    assert!(err.to_lowercase().contains("certificate"), "{err}");
}

#[test]
fn upstream_require_encrypts_without_verification() {
    let ca = TestCa::new();
    let (pg, _certs) = tls_cluster(&ca);
    let env = Env::with(Setup {
        pg,
        upstream: Some("host = \"127.0.0.1\"\nport = PGPORT\ntls = \"require\"".into()),
        ..Setup::default()
    });
    assert_eq!(
        psql_ok(
            &env.tcp_dsn(""),
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()"
        ),
        "t"
    );
}

#[test]
fn gssenc_request_inside_tls_is_refused() {
    let env = Env::start();
    let mut tls = tls_client(&env, &[b"postgresql"]);
    tls.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30])
        .unwrap();
    let mut header = [0u8; 5];
    tls.read_exact(&mut header).unwrap();
    assert_eq!(
        header[0], b'E',
        "an ErrorResponse, not an answer to the request"
    );
    let len = i32::from_be_bytes(header[1..5].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len - 4];
    tls.read_exact(&mut body).unwrap();
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains("08P01") && body.contains("GSSENCRequest inside TLS"),
        "{body}"
    );
}

/// libpq ≥ 17 (`PQcancelConn`, psycopg's `cancel_safe()`) sends its CancelRequest inside TLS,
/// after an SSLRequest or with direct SSL, and reads the connection to its end: the request
/// is routed as a plaintext one is, and the end is a TLS close_notify, not a bare EOF (which
/// libpq reports as "SSL error: unexpected eof while reading").
#[test]
fn cancel_request_inside_tls_cancels_and_closes_cleanly() {
    let env = Env::start();
    let mut raw = Raw::connect(env.tcp);
    raw.startup();
    let greeting = raw.until_ready();
    let (_, key) = greeting.iter().find(|(t, _)| *t == b'K').unwrap();
    let cancel = cancel_request(
        i32::from_be_bytes(key[0..4].try_into().unwrap()),
        i32::from_be_bytes(key[4..8].try_into().unwrap()),
    );

    for direct_ssl in [false, true] {
        raw.send(&query_bytes("SELECT pg_sleep(60)"));
        wait_for_sleep(&env);
        let mut tls = if direct_ssl {
            tls_client(&env, &[b"postgresql"])
        } else {
            let mut tcp = std::net::TcpStream::connect(env.tcp).unwrap();
            tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
                .unwrap();
            let mut answer = [0u8; 1];
            tcp.read_exact(&mut answer).unwrap();
            assert_eq!(answer[0], b'S');
            tls_over(&env, &[], Some(tcp))
        };
        tls.write_all(&cancel).unwrap();
        let mut rest = Vec::new();
        let end = tls.read_to_end(&mut rest);
        assert!(
            end.is_ok() && rest.is_empty(),
            "direct_ssl={direct_ssl}: the connection ends with close_notify and nothing else: {end:?} {rest:?}"
        );
        let answer = raw.until_ready();
        assert!(
            answer
                .iter()
                .any(|(t, b)| *t == b'E' && String::from_utf8_lossy(b).contains("57014")),
            "direct_ssl={direct_ssl}: the statement was cancelled: {answer:?}"
        );
    }
}
