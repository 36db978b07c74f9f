//! Every session decision is in the audit log, with the verified identity, before it takes
//! effect; the log's hash chain catches edits; a failing log refuses sessions.

use std::process::Command;

use crate::fixture::*;

#[test]
fn session_decisions_are_audited_and_the_chain_catches_edits() {
    let env = Env::start();
    assert_eq!(psql_ok(&env.tcp_dsn(""), "select current_user"), ROLE);
    let mut cmd = Command::new(pgiam_tests::pg_bin_dir().join("psql"));
    cmd.args(["-X", "-c", "select 1", &env.unix_dsn("")]);
    pgiam_tests::run_as(&mut cmd, "nobody");
    let refused = cmd.output().unwrap();
    let refused_err = stderr(&refused);
    assert!(refused_err.contains("pgiam audit record"), "{refused_err}");

    // The end record is written after the session; wait for it.
    let records = env.audit_records_until(|r| r.iter().any(|r| r["kind"] == "session_end"));
    let allow = records
        .iter()
        .find(|r| r["decision"] == "allow")
        .expect("an allow record");
    assert_eq!(allow["role"], ROLE);
    assert_eq!(allow["database"], DB);
    assert_eq!(allow["identity"]["uid"], nix::unistd::geteuid().as_raw());
    assert_eq!(allow["identity"]["source"], "loopback-proc");
    assert!(allow["identity"]["exe"].as_str().unwrap().ends_with("psql"));
    let end = records
        .iter()
        .find(|r| r["kind"] == "session_end")
        .expect("a session_end record");
    assert_eq!(end["session"], allow["id"]);

    let deny = records
        .iter()
        .find(|r| r["decision"] == "deny")
        .expect("a deny record");
    assert_eq!(deny["code"], "28000");
    assert_eq!(deny["identity"]["uid"], 65534);
    assert!(
        refused_err.contains(deny["id"].as_str().unwrap()),
        "the client's hint names the record: {refused_err}"
    );

    let path = env.audit_path();
    let (ok, out) = verify(&path);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("{} records, hash chain intact", records.len())),
        "{out}"
    );

    // One byte changed in the first record (uid 0 -> 1, say): verify fails and says where.
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.iter().position(|&b| b == b'"').unwrap() + 1;
    bytes[at] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let (ok, out) = verify(&path);
    assert!(!ok);
    assert!(out.contains("line 1"), "{out}");
}

#[test]
fn a_failing_audit_log_refuses_sessions() {
    let env = Env::with(Setup {
        // Opens fine, fails every write (ENOSPC).
        audit_path: Some("/dev/full".into()),
        ..Setup::default()
    });
    let before = env.connections_received();
    let out = psql(&env.tcp_dsn(""), "select 1");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("audit log is unavailable"), "{err}");
    assert_eq!(
        env.connections_received(),
        before,
        "nothing reached PostgreSQL"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_statement_is_audited_before_it_runs() {
    let env = Env::start();
    let client = tokio_client(&env.tcp_dsn("")).await;
    client
        .batch_execute("CREATE TABLE audited(a int); INSERT INTO audited VALUES (1)")
        .await
        .unwrap();
    let prepared = client
        .prepare("SELECT a FROM audited WHERE a = $1")
        .await
        .unwrap();
    for _ in 0..3 {
        client.query(&prepared, &[&1i32]).await.unwrap();
    }
    client
        .batch_execute(&format!("ALTER ROLE {ROLE} PASSWORD 'hunter2-secret'"))
        .await
        .unwrap();
    assert!(client.simple_query("SELECT 1/0").await.is_err());
    drop(client);

    let records = env.audit_records_until(|r| r.iter().any(|r| r["kind"] == "session_end"));
    let session = records
        .iter()
        .find(|r| r["decision"] == "allow")
        .expect("session record")["id"]
        .clone();
    let statements: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["kind"] == "statement")
        .collect();
    assert!(statements
        .iter()
        .all(|r| r["session"] == session && r["role"] == ROLE));

    // The multi-statement Query: one record, both statements classified.
    let batch = statements
        .iter()
        .find(|r| {
            r["sql"]
                .as_str()
                .is_some_and(|s| s.starts_with("CREATE TABLE audited"))
        })
        .expect("the batch");
    assert_eq!(batch["protocol"], "simple");
    let kinds: Vec<&str> = batch["statements"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["command"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["ddl", "insert"]);
    assert_eq!(batch["statements"][1]["relations"][0]["name"], "audited");

    // Extended protocol: the Parse, and each of the three Executes with its SQL.
    let parse = statements
        .iter()
        .find(|r| r["protocol"] == "parse" && r["sql"] == "SELECT a FROM audited WHERE a = $1")
        .expect("the Parse");
    assert_eq!(parse["statements"][0]["relations"][0]["access"], "select");
    let executes = statements
        .iter()
        .filter(|r| r["protocol"] == "execute" && r["sql"] == "SELECT a FROM audited WHERE a = $1")
        .count();
    assert_eq!(executes, 3);

    // Each decision names the policy that decided it, and each statement that ran has a
    // completion record: its SQLSTATE, rows and time.
    // (A statement that touches nothing, such as SELECT 1/0, needs no policy.)
    assert!(statements.iter().all(|r| r["decision"] == "allow"));
    assert_eq!(parse["policies"], serde_json::json!(["test-allow-all"]));
    assert_eq!(batch["policies"], serde_json::json!(["test-allow-all"]));
    let completion = |id: &serde_json::Value| {
        records
            .iter()
            .find(|r| r["kind"] == "completion" && &r["statement"] == id)
            .unwrap_or_else(|| panic!("no completion for {id}"))
    };
    let c = completion(&batch["id"]);
    assert_eq!(
        (c["sqlstate"].as_str(), c["rows"].as_u64()),
        (Some("00000"), Some(1))
    );
    assert!(c["duration_us"].as_u64().is_some());
    for e in statements.iter().filter(|r| r["protocol"] == "execute") {
        let c = completion(&e["id"]);
        assert_eq!(
            (c["sqlstate"].as_str(), c["rows"].as_u64()),
            (Some("00000"), Some(1))
        );
    }
    let division = statements
        .iter()
        .find(|r| r["sql"] == "SELECT 1/0")
        .unwrap();
    assert_eq!(completion(&division["id"])["sqlstate"], "22012");

    // The password never reaches the log.
    let text = std::fs::read_to_string(env.audit_path()).unwrap();
    assert!(
        !text.contains("hunter2"),
        "a password was written to the audit log"
    );
    assert!(statements.iter().any(|r| r["sql"]
        .as_str()
        .is_some_and(|s| s.starts_with("ALTER ROLE") && s.contains("$1"))));

    let (ok, out) = verify(&env.audit_path());
    assert!(ok, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_split_as_the_server_splits_them_with_the_sessions_string_rules() {
    let env = Env::start();
    // The session starts with standard_conforming_strings off (a role default), which the
    // server reports at login.
    env.pg
        .psql(&format!(
            "ALTER ROLE {ROLE} SET standard_conforming_strings = off"
        ))
        .unwrap();
    let client = tokio_client(&env.tcp_dsn("")).await;
    // Clients cannot change it mid-session (pipelined statements would split differently).
    let e = client
        .batch_execute("SET standard_conforming_strings = on")
        .await
        .unwrap_err();
    assert_eq!(e.as_db_error().map(|d| d.code().code()), Some("42501"));
    // With the setting off, \' escapes the quote: one statement returning one string.
    let probe = r"SELECT 'a\'; SELECT 1; --'";
    let rows = client.simple_query(probe).await.unwrap();
    let values: Vec<String> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .collect();
    assert_eq!(values, ["a'; SELECT 1; --"], "the server saw one statement");
    drop(client);
    let records = env.audit_records();
    let record = records
        .iter()
        .find(|r| r["sql"] == probe)
        .expect("the probe's record");
    assert_eq!(
        record["statements"].as_array().unwrap().len(),
        1,
        "pgiam split it like the server: {record}"
    );
}

/// A tmpfs of its own, so that a test can fill it; unmounted when dropped (after the pgiam
/// writing to it: declare it first).
struct TinyFs {
    dir: tempfile::TempDir,
}

impl TinyFs {
    fn mount(kib: u32) -> TinyFs {
        let dir = tempfile::Builder::new()
            .prefix("pgiam-tinyfs-")
            .tempdir()
            .unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kib}k,mode=0755")])
            .arg("pgiam-test")
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mount a tmpfs on {}",
            dir.path().display()
        );
        TinyFs { dir }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    /// Fills it: from now on a write that needs another block fails with ENOSPC.
    fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.path("filler")).unwrap();
        while f.write_all(&[0u8; 4096]).is_ok() {}
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// A read runs while its decision record is being synced, but its answer waits for the
/// record: when the record cannot be written, the client gets an error and no rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_answer_reaches_the_client_before_its_record_is_on_disk() {
    let fs = TinyFs::mount(256);
    let audit = fs.path("audit.jsonl");
    let env = Env::with(Setup {
        audit_path: Some(audit.display().to_string()),
        ..Setup::default()
    });
    env.pg
        .psql_db(
            DB,
            &format!(
                "CREATE TABLE secret (v text); INSERT INTO secret VALUES ('top-secret'); \
                 GRANT ALL ON secret TO {ROLE}"
            ),
        )
        .unwrap();
    let client = tokio_client(&env.tcp_dsn("")).await;
    // A plain read: pgiam forwards it without waiting for the sync.
    let read = client.prepare("SELECT v FROM secret").await.unwrap();
    assert_eq!(client.query(&read, &[]).await.unwrap().len(), 1);
    fs.fill();
    let mut answered = 1;
    let err = loop {
        match client.query(&read, &[]).await {
            Ok(rows) => {
                assert_eq!(rows.len(), 1);
                answered += 1;
                assert!(answered < 2000, "the full audit log never failed a read");
            }
            Err(e) => break e,
        }
    };
    assert_eq!(
        err.as_db_error().map(|e| e.code().code()),
        Some("58030"),
        "{err}"
    );
    // Every answer the client got has its record on disk (whole lines only: the failed
    // write may have left a torn one).
    let text = std::fs::read(&audit).unwrap();
    let executes = String::from_utf8_lossy(&text)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["protocol"] == "execute" && r["sql"] == "SELECT v FROM secret")
        .count();
    assert!(
        executes >= answered,
        "{answered} answers, {executes} records"
    );
}

/// A shutdown writes what the audit writer still held: the completion of the last statement
/// answered before SIGTERM (written with the next record waited for, or a moment later) is in
/// the file once pgiam has exited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_writes_the_records_the_writer_still_held() {
    let mut env = Env::start();
    let client = tokio_client(&env.tcp_dsn("")).await;
    client.simple_query("SELECT 42").await.unwrap();
    env.pgiam.stop();
    let records = env.audit_records();
    let statement = records
        .iter()
        .find(|r| r["kind"] == "statement" && r["sql"] == "SELECT 42")
        .expect("the decision record");
    assert!(
        records
            .iter()
            .any(|r| r["kind"] == "completion" && r["statement"] == statement["id"]),
        "no completion for {statement}"
    );
}
