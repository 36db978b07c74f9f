//! The audit log's write-ahead ring: what keeps `durability = "always"` to one device flush.
//!
//! Appending to the log and syncing it changes the file's size every time, and on ext4 (like
//! most journaling file systems) a size change makes `fdatasync` commit the journal: a second
//! flush, done by a kernel thread that has to win a core on a busy host first. The ring is a
//! file of fixed size, zero-filled when it is created, so writing into it changes no metadata
//! and syncing it is one flush. Every batch goes to the log (not synced) and to the ring, in
//! order; a batch someone waits for is then synced in the ring. Before the ring wraps, the log
//! is synced: what the ring is about to overwrite is then durable where it belongs.
//!
//! On open, records the log lacks (lost with the page cache when the host lost power, or a
//! torn last line) are recovered from the ring by following the hash chain from the log's last
//! complete line. Only a line whose hash matches after the hash wanted is taken, so a stale or
//! half-overwritten entry is never followed.
//! An empty log is not recovered into: it is a rotated one, and starts a new chain.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::follows;

/// Large enough that the log is synced once per tens of thousands of records.
pub const DEFAULT_SIZE: u64 = 32 << 20;

/// Where the ring of the log at `log` lives.
pub fn path_for(log: &Path) -> PathBuf {
    let mut p = log.as_os_str().to_owned();
    p.push(".wal");
    PathBuf::from(p)
}

pub struct Ring {
    file: File,
    size: u64,
    at: u64,
}

impl Ring {
    /// Opens the ring at `path`, creating it zero-filled (and synced, size and all) when it is
    /// missing or shorter than `size`. Writing starts at the beginning: whatever the ring held
    /// was recovered into the log before.
    pub fn open(path: &Path, size: u64) -> io::Result<Ring> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        let len = file.metadata()?.len();
        if len < size {
            // Written, not fallocated: an unwritten extent would be converted (a journal
            // commit) on its first write.
            let zeros = vec![0u8; 1 << 20];
            let mut at = len;
            while at < size {
                let n = (size - at).min(zeros.len() as u64) as usize;
                file.write_all_at(&zeros[..n], at)?;
                at += n as u64;
            }
            file.sync_all()?;
        }
        Ok(Ring {
            file,
            size: len.max(size),
            at: 0,
        })
    }

    /// Writes `batch` after the previous one, and with `sync` makes everything written so far
    /// durable. `sync_log` is called first when the batch does not fit in what is left (or in
    /// the ring at all): the log then holds durably what the ring gives up.
    pub fn append(
        &mut self,
        batch: &[u8],
        sync: bool,
        sync_log: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        let len = batch.len() as u64;
        if len > self.size {
            return sync_log();
        }
        if self.at + len > self.size {
            sync_log()?;
            self.at = 0;
        }
        self.file.write_all_at(batch, self.at)?;
        self.at += len;
        if sync {
            self.file.sync_data()?;
        }
        Ok(())
    }
}

/// The lines the ring at `path` holds that continue the chain after `prev`, in order, each
/// with its hash. None if there is no ring.
pub fn continuation(path: &Path, prev: &str) -> io::Result<Vec<(String, String)>> {
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let pieces: Vec<&[u8]> = data
        .split(|b| *b == b'\n')
        .filter(|p| p.first() == Some(&b'{'))
        .collect();
    // A line names no predecessor: the one that follows is the one whose hash matches after
    // the wanted hash. Batches are written one after the other, so that is almost always the
    // next piece; only a wrap (or the first line) needs a search. Stale and half-overwritten
    // entries never match.
    let mut out = Vec::new();
    let mut want = prev.to_owned();
    let mut next = 0;
    loop {
        let found = (next..pieces.len())
            .chain(0..next)
            .find_map(|i| Some((i, follows(pieces[i], &want).ok()?)));
        let Some((i, hash)) = found else { break };
        out.push((
            String::from_utf8_lossy(pieces[i]).into_owned(),
            hash.clone(),
        ));
        want = hash;
        next = i + 1;
        if out.len() > pieces.len() {
            break;
        }
    }
    Ok(out)
}
