//! The flush thread: it writes what lingers, and makes what is written durable when someone
//! waits for it (all waiting at that moment share the flush) or the interval is up.
//!
//! One thread, one flush at a time. Two in flight (a second thread starting the next flush
//! while one is in the device) was measured on this VM and gained nothing: a flush costs
//! ~60 µs of CPU here (two VM exits), busy hosts are short of CPU rather than of flush
//! latency, and a COMMIT under row locks finds no flush under way to overlap with.

use std::time::{Duration, Instant};

use super::{ring, Durability, Inner, BATCH_ROOM_KEPT, LINGER};

/// The flush thread's loop. It ends with the last handle to the log.
pub fn flusher(inner: std::sync::Weak<Inner>, mut ring: Option<ring::Ring>) {
    let mut last_flush = Instant::now();
    let mut seen = 0;
    loop {
        let Some(inner) = inner.upgrade() else { return };
        let mut state = inner.lock();
        // A write failed (a full disk): tried again every interval, until the disk has room.
        if state.recoverable && Instant::now() >= last_flush + inner.interval {
            last_flush = Instant::now();
            if state.try_recover(inner.durability != Durability::Buffered) {
                inner.synced.send_modify(|s| s.failed = None);
            }
        }
        // By age, also while no record comes.
        state.rotate_if_due(inner.durability != Durability::Buffered);
        let now = Instant::now();
        let synced = inner.synced.borrow().upto;
        let buffered = inner.durability == Durability::Buffered;
        let linger = if buffered { inner.interval } else { LINGER };
        let write_due = state.held_since.is_some_and(|t| now >= t + linger);
        let failure_unpublished = state.broken.is_some() && inner.synced.borrow().failed.is_none();
        let flush_wanted = state.wanted > synced && state.broken.is_none();
        // Written since the last flush: the periodic one has work to do.
        let dirty = state.written > synced;
        let periodic_due = !buffered && dirty && now >= last_flush + inner.interval;
        if !(write_due || flush_wanted || periodic_due || failure_unpublished) {
            // Sleep until the next thing due (bounded, so a dropped log is noticed); while
            // records come, no longer than LINGER.
            let active = state.sealed != seen;
            seen = state.sealed;
            state.flusher_idle = !active;
            let nap = if active {
                LINGER
            } else {
                inner.interval.min(Duration::from_millis(500))
            };
            let mut until = now + nap;
            if let Some(t) = state.held_since {
                until = until.min(t + linger);
            }
            if !buffered && dirty {
                until = until.min(last_flush + inner.interval);
            }
            let _ = inner
                .wake
                .wait_timeout(state, until.saturating_duration_since(now));
            continue;
        }
        // What lingers goes out first: a flush covers every record before the one waited for.
        let _ = state.write_out(!buffered);
        if let Some(e) = &state.broken {
            let e = e.clone();
            inner.synced.send_modify(|s| s.failed = Some(e));
        }
        if !(flush_wanted || periodic_due) || state.broken.is_some() {
            continue;
        }
        // Everything written so far: the lock is released for the flush itself, so appenders
        // go on writing meanwhile (the next flush takes theirs).
        let upto = state.written;
        let batch = std::mem::take(&mut state.unsynced);
        let file = state.file.clone();
        drop(state);
        let started = Instant::now();
        let flushed = match &mut ring {
            Some(ring) => ring.append(&batch, true, || file.sync_data()),
            None => file.sync_data(),
        };
        last_flush = Instant::now();
        crate::metrics::get()
            .audit_flush
            .observe(last_flush.duration_since(started).as_secs_f64());
        let mut batch = batch;
        batch.clear();
        let mut state = inner.lock();
        // Its room is kept for the next batch, unless a stall (a long flush, records piling up
        // meanwhile) made it large: that room would otherwise stay taken for good.
        if state.unsynced.is_empty() && batch.capacity() <= BATCH_ROOM_KEPT {
            state.unsynced = batch;
        }
        match flushed {
            Ok(()) => {
                inner.synced.send_modify(|s| {
                    s.upto = s.upto.max(upto);
                    s.at = Some(std::time::SystemTime::now());
                });
            }
            Err(e) => {
                let e = state.break_with(e);
                inner.synced.send_modify(|s| s.failed = Some(e));
            }
        }
    }
}
