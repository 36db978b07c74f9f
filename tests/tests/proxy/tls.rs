//! TLS toward clients (SSLRequest and PostgreSQL 17 direct SSL) and toward the server.

use std::io::{Read, Write};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use pgiam_tests::{PgOptions, TestCa};

use crate::fixture::*;

#[test]
fn client_tls_generated_certificate_and_plaintext() {
    let env = Env::start();
    let cert = env.dir.path().join("state/client-tls.crt");
    // verify-full against the generated certificate proves the channel is TLS with pgiam's key.
    let dsn = format!(
        "host=localhost hostaddr=127.0.0.1 port={} dbname={DB} user=x sslmode=verify-full sslrootcert={}",
        env.tcp.port(),
        cert.display()
    );
    assert_eq!(psql_ok(&dsn, "select current_user"), ROLE);
    assert_eq!(psql_ok(&env.tcp_dsn("sslmode=require"), "select 1"), "1");
    assert_eq!(psql_ok(&env.tcp_dsn("sslmode=disable"), "select 1"), "1");
    let log = env.pgiam.log();
    assert!(log.contains("tls=true"), "{log}");
    assert!(log.contains("tls=false"), "{log}");
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

fn tls_client(
    env: &Env,
    alpn: &[&[u8]],
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    let cert = CertificateDer::from_pem_file(env.dir.path().join("state/client-tls.crt")).unwrap();
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
    let tcp = std::net::TcpStream::connect(env.tcp).unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(15)))
        .unwrap();
    rustls::StreamOwned::new(conn, tcp)
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
