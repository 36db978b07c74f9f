use super::*;

const INTERVAL: Duration = Duration::from_millis(100);

async fn write_three(path: &Path) {
    let log = AuditLog::open(path, Durability::Always, INTERVAL).unwrap();
    for i in 0..3 {
        log.record(crate::audit_fields! {"kind" => "test", "n" => i, "text" => "a\"b\n"})
            .await
            .unwrap();
    }
}

/// Every session's gate holds a handle: one pointer, nothing allocated per session (the run's
/// id prefix and the id sequence live behind it).
#[test]
fn a_handle_is_one_pointer() {
    assert_eq!(
        std::mem::size_of::<AuditLog>(),
        std::mem::size_of::<usize>()
    );
}

#[tokio::test]
async fn chain_verifies_and_continues_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write_three(&path).await;
    write_three(&path).await;
    assert_eq!(verify(&path).unwrap(), Verified::Intact { records: 6 });
}

#[tokio::test]
async fn any_single_byte_edit_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write_three(&path).await;
    let original = std::fs::read(&path).unwrap();
    for at in (0..original.len()).filter(|i| original[*i] != b'\n') {
        let mut edited = original.clone();
        edited[at] ^= 0x01;
        std::fs::write(&path, &edited).unwrap();
        assert!(
            matches!(verify(&path).unwrap(), Verified::Broken { .. }),
            "flipping byte {at} went unnoticed"
        );
    }
}

#[tokio::test]
async fn removed_or_reordered_lines_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write_three(&path).await;
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    std::fs::write(&path, format!("{}\n{}\n", lines[0], lines[2])).unwrap();
    assert!(matches!(
        verify(&path).unwrap(),
        Verified::Broken { line: 2, .. }
    ));
    std::fs::write(&path, format!("{}\n{}\n{}\n", lines[1], lines[0], lines[2])).unwrap();
    assert!(matches!(
        verify(&path).unwrap(),
        Verified::Broken { line: 1, .. }
    ));
}

/// A record nobody waits for is not kept back for long: it is in the file soon after,
/// with no other record to carry it, and a record waited for takes it along at once.
#[tokio::test]
async fn records_nobody_waits_for_are_written_soon_and_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(&path, Durability::Always, INTERVAL).unwrap();
    log.record_later(crate::audit_fields! {"kind" => "later", "n" => 1});
    let mut waited = std::time::Duration::ZERO;
    while std::fs::read_to_string(&path).unwrap().lines().count() < 1 {
        assert!(waited < std::time::Duration::from_secs(10), "never written");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        waited += std::time::Duration::from_millis(5);
    }
    log.record_later(crate::audit_fields! {"kind" => "later", "n" => 2});
    log.record(crate::audit_fields! {"kind" => "waited", "n" => 3})
        .await
        .unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let ns: Vec<u64> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["n"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(ns, [1, 2, 3]);
    assert_eq!(verify(&path).unwrap(), Verified::Intact { records: 3 });
}

/// A flush (at shutdown) writes the records still held back, and no line of its own.
#[tokio::test]
async fn a_large_batch_gives_its_room_back_once_flushed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(&path, Durability::Changes, INTERVAL).unwrap();
    // One batch of ~2.5 MB between two flushes, as a stalled flush leaves behind.
    let records = (0..5000)
        .map(|n| crate::audit_fields! {"kind" => "test", "n" => n, "pad" => "x".repeat(400)})
        .collect();
    let at = log.append(records).unwrap();
    log.durable(at).wait().await.unwrap();
    let room = log.inner.lock().unsynced.capacity();
    assert!(room <= BATCH_ROOM_KEPT, "{room} bytes kept");
    assert_eq!(verify(&path).unwrap(), Verified::Intact { records: 5000 });
}

#[tokio::test]
async fn a_flush_writes_what_is_held_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(&path, Durability::Always, INTERVAL).unwrap();
    log.record_later(crate::audit_fields! {"kind" => "completion", "n" => 1});
    log.flush().wait().await.unwrap();
    assert_eq!(verify(&path).unwrap(), Verified::Intact { records: 1 });
    log.flush().wait().await.unwrap();
    log.record(crate::audit_fields! {"kind" => "waited", "n" => 2})
        .await
        .unwrap();
    assert_eq!(verify(&path).unwrap(), Verified::Intact { records: 2 });
}

#[tokio::test]
async fn a_failing_sink_fails_every_record() {
    let log = AuditLog::open(Path::new("/dev/full"), Durability::Always, INTERVAL);
    // /dev/full accepts the open and fails every write.
    let log = log.unwrap();
    assert!(log
        .record(crate::audit_fields! {"kind" => "x"})
        .await
        .is_err());
    assert!(log
        .record(crate::audit_fields! {"kind" => "y"})
        .await
        .is_err());
}

async fn write_n(path: &Path, ring_size: u64, n: usize) {
    let log = AuditLog::open_with_ring(path, Durability::Always, INTERVAL, ring_size).unwrap();
    for i in 0..n {
        log.record(
            crate::audit_fields! {"kind" => "test", "n" => i, "pad" => "x".repeat(i % 7 * 10)},
        )
        .await
        .unwrap();
    }
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// What a power failure can leave: the log's last records gone with the page cache, the
/// one before them torn. They come back from the ring, and the chain goes on.
#[tokio::test]
async fn a_lost_tail_is_recovered_from_the_ring() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write_n(&path, 64 * 1024, 6).await;
    let all = lines(&path);
    let torn = &all[3][..all[3].len() / 2];
    std::fs::write(&path, format!("{}\n{}\n{}\n{torn}", all[0], all[1], all[2])).unwrap();
    write_n(&path, 64 * 1024, 2).await;
    assert_eq!(verify(&path).unwrap(), Verified::Intact { records: 8 });
    assert_eq!(lines(&path)[..6], all[..]);
}

/// Records from before the ring wrapped are durable in the log; the ones after are found
/// past the wrap, and stale entries the wrap half overwrote are never followed.
#[tokio::test]
async fn the_ring_wraps_and_still_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write_n(&path, 2048, 40).await;
    let all = lines(&path);
    std::fs::write(&path, all[..38].join("\n") + "\n").unwrap();
    write_n(&path, 2048, 1).await;
    assert_eq!(verify(&path).unwrap(), Verified::Intact { records: 41 });
    assert_eq!(lines(&path)[..40], all[..]);
}

/// Rotation (the log moved away or truncated): the new log starts a new chain, and the
/// ring's records, which belong to the old one, stay out of it.
#[tokio::test]
async fn an_empty_log_starts_a_new_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write_n(&path, 64 * 1024, 4).await;
    std::fs::rename(&path, dir.path().join("audit.jsonl.1")).unwrap();
    write_n(&path, 64 * 1024, 1).await;
    assert_eq!(verify(&path).unwrap(), Verified::Intact { records: 1 });
    assert_eq!(lines(&path).len(), 1);
}

#[tokio::test]
async fn a_torn_line_that_is_not_the_next_record_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write_n(&path, 64 * 1024, 3).await;
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("{\"forged\":");
    std::fs::write(&path, &text).unwrap();
    let Err(err) = AuditLog::open_with_ring(&path, Durability::Always, INTERVAL, 64 * 1024) else {
        panic!("must refuse")
    };
    assert!(
        err.to_string().contains("not a pgiam audit record"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        text,
        "left as it was"
    );
}

fn record(n: usize) -> Record {
    crate::audit_fields! {"kind" => "test", "n" => n}
}

/// `changes`: a record is in the file (the kernel's page cache) as soon as it is appended,
/// with no flush; the periodic flush makes it durable though nobody asks, and what it
/// flushed is in the ring, to be recovered if the log's own pages are lost.
#[tokio::test]
async fn changes_writes_at_once_and_flushes_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(&path, Durability::Changes, Duration::from_millis(20)).unwrap();
    let at = log.append(vec![record(0), record(1)]).unwrap();
    assert_eq!(at, Position(2));
    assert_eq!(lines(&path).len(), 2, "in the file before any flush");
    let synced = log.inner.synced.subscribe();
    let mut waited = Duration::ZERO;
    while synced.borrow().upto < 2 {
        assert!(waited < Duration::from_secs(10), "never flushed");
        tokio::time::sleep(Duration::from_millis(5)).await;
        waited += Duration::from_millis(5);
    }
    assert_eq!(log.inner.lock().wanted, 0, "flushed without being asked");
    let at = log.append(vec![record(2)]).unwrap();
    log.durable(at).wait().await.unwrap();
    let all = lines(&path);
    drop(log);
    // The log's last two lines lost (a power failure before the page cache was written).
    std::fs::write(&path, format!("{}\n", all[0])).unwrap();
    let log = AuditLog::open(&path, Durability::Changes, INTERVAL).unwrap();
    log.record(record(3)).await.unwrap();
    assert_eq!(verify(&path).unwrap(), Verified::Intact { records: 4 });
    assert_eq!(lines(&path)[..3], all[..]);
}

/// Many appenders at once: the file holds every record once, in chain order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appenders_keep_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(&path, Durability::Changes, Duration::from_millis(1)).unwrap();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..200 {
                let at = log.append(vec![record(t * 1000 + n)]).unwrap();
                if n % 10 == 0 {
                    log.durable(at).wait().await.unwrap();
                }
                if n % 3 == 0 {
                    log.record_later(record(t * 1000 + n + 500));
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    log.flush().wait().await.unwrap();
    assert_eq!(
        verify(&path).unwrap(),
        Verified::Intact {
            records: 8 * (200 + 67)
        }
    );
}

/// `buffered`: records stay in memory for up to the interval, then are written in order.
#[tokio::test]
async fn buffered_holds_records_for_the_interval() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(&path, Durability::Buffered, Duration::from_millis(300)).unwrap();
    log.append(vec![record(0)]).unwrap();
    log.record(record(1)).await.unwrap();
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "",
        "held in memory"
    );
    let mut waited = Duration::ZERO;
    while lines(&path).len() < 2 {
        assert!(waited < Duration::from_secs(10), "never written");
        tokio::time::sleep(Duration::from_millis(10)).await;
        waited += Duration::from_millis(10);
    }
    assert_eq!(verify(&path).unwrap(), Verified::Intact { records: 2 });
}

#[tokio::test]
async fn a_failing_sink_fails_the_append_in_every_mode() {
    for d in [Durability::Changes, Durability::Always] {
        let log = AuditLog::open(Path::new("/dev/full"), d, INTERVAL).unwrap();
        assert!(log.append(vec![record(0)]).is_err());
        assert!(log.append(vec![record(1)]).is_err(), "stays broken");
    }
}

/// Lines of format 1 (each carried its `prev`) still verify, and the chain goes on after
/// them in format 2.
#[tokio::test]
async fn format_1_lines_verify_and_the_chain_continues() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let mut text = String::new();
    let mut prev = GENESIS.to_owned();
    for n in 0..2 {
        let body = format!("{{\"kind\":\"old\",\"n\":{n},\"prev\":\"{prev}\"");
        prev = sha256_hex(&[body.as_bytes()]);
        text.push_str(&format!("{body},\"hash\":\"{prev}\"}}\n"));
    }
    std::fs::write(&path, &text).unwrap();
    assert_eq!(verify(&path).unwrap(), Verified::Intact { records: 2 });
    write_n(&path, 64 * 1024, 2).await;
    assert_eq!(verify(&path).unwrap(), Verified::Intact { records: 4 });
}

#[test]
fn timestamps_are_rfc3339_utc_microseconds_of_the_moment_sealed() {
    const FULL: &[time::format_description::FormatItem<'_>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
    );
    let now = || time::OffsetDateTime::now_utc().format(FULL).unwrap();
    let mut clock = Clock::new();
    for stale in [false, true, false] {
        if stale {
            // A prefix from another second is never reused.
            clock.second -= 1;
            clock.prefix = b"1999-01-01T00:00:00.".to_vec();
        }
        let before = now();
        let mut out = Vec::new();
        clock.stamp(&mut out);
        let after = now();
        let stamp = String::from_utf8(out).unwrap();
        // Same length, fixed fields: the strings sort as the instants do.
        assert_eq!(stamp.len(), before.len(), "{stamp}");
        assert!(
            before <= stamp && stamp <= after,
            "{before} <= {stamp} <= {after}"
        );
    }
}

#[test]
fn a_foreign_file_is_not_appended_to() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    std::fs::write(&path, "hello\n").unwrap();
    let Err(err) = AuditLog::open(&path, Durability::Always, INTERVAL) else {
        panic!("must refuse")
    };
    assert!(
        err.to_string().contains("not a pgiam audit record"),
        "{err}"
    );
}
