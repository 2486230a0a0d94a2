//! Group commit for SQLite: commits run with `synchronous=NORMAL` (written to the write-ahead log,
//! not yet forced to disk), and a write is acknowledged only after an fsync of the log that
//! started after its commit. Requests that finish while one fsync runs share the next one, so a
//! busy service pays one fsync per group of commits instead of one per commit, and nothing it
//! acknowledged can be lost to a power cut.
//!
//! Why the log alone: in WAL mode a commit is durable once its frames are on disk; SQLite itself
//! syncs the log before a checkpoint copies frames into the database, and the database after, so
//! frames leave the log only once they are durable elsewhere.
//!
//! (The log's name in its directory is SQLite's: it opens the log with its directory-sync flag
//! and, even with `synchronous=NORMAL`, syncs a new or restarted log's header, and with it the
//! directory, before the first commit's frames are written.)
//!
//! Which log: the one SQLite writes, at the database's real path. A `DATABASE_URL` that names a
//! symbolic link has its log beside the file the link points to (SQLite resolves links), so the
//! path is resolved here too. Once the service runs the log always exists (the writer thread's
//! connection never closes); a log that cannot be opened means the files are not where they
//! were, and no write waiting for it is acknowledged.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::AppResult;

pub struct GroupSync {
    wal: PathBuf,
    /// Waiters so far: each takes the next number once its commit has returned.
    requested: AtomicU64,
    /// Every waiter numbered up to this is covered by a completed fsync.
    synced: AtomicU64,
    /// Held by the one waiter running an fsync; the others queue behind it (FIFO).
    leader: tokio::sync::Mutex<()>,
    /// fsyncs run, for tests and metrics.
    syncs: AtomicU64,
}

impl GroupSync {
    /// For the database file at `database` (which exists: its connections are open): its log is
    /// `database-wal`, beside the file any symbolic link leads to.
    pub fn new(database: PathBuf) -> GroupSync {
        let database = std::fs::canonicalize(&database).unwrap_or(database);
        let mut wal = database.into_os_string();
        wal.push("-wal");
        GroupSync {
            wal: PathBuf::from(wal),
            requested: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            leader: tokio::sync::Mutex::new(()),
            syncs: AtomicU64::new(0),
        }
    }

    /// Return once everything committed before this call is on disk.
    pub async fn wait(&self) -> AppResult<()> {
        let mine = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let _leader = self.leader.lock().await;
        if self.synced.load(Ordering::SeqCst) >= mine {
            // The fsync that just finished started after our commit: it covered us.
            return Ok(());
        }
        // Everyone numbered so far committed before this fsync starts.
        let target = self.requested.load(Ordering::SeqCst);
        let wal = self.wal.clone();
        let synced = tokio::task::spawn_blocking(move || sync_log(&wal))
            .await
            .map_err(|e| anyhow::anyhow!("the fsync task failed: {e}"))?;
        match synced {
            Ok(()) => {}
            // Nothing was flushed, so nothing is known lost, and nothing is known durable: this
            // write is not acknowledged (its caller gets an error, though what it committed
            // stays), and the next waiter tries again.
            Err(SyncFailure::Open(e)) => {
                return Err(anyhow::anyhow!("opening the SQLite log to fsync it: {e}").into())
            }
            // After a failed fsync the kernel may have dropped the dirty pages: a later fsync
            // succeeding proves nothing. Stop, as PostgreSQL does; recovery replays the log.
            Err(SyncFailure::Flush(e)) => {
                tracing::error!(
                    error = format!("{e:#}"),
                    "fsync of the SQLite log failed: stopping"
                );
                std::process::abort();
            }
        }
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.synced.fetch_max(target, Ordering::SeqCst);
        Ok(())
    }

    /// How many fsyncs ran.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }
}

/// Why a group fsync did not happen.
#[derive(Debug)]
enum SyncFailure {
    /// The log could not be opened: nothing was flushed.
    Open(std::io::Error),
    /// The flush itself failed.
    Flush(std::io::Error),
}

fn sync_log(wal: &std::path::Path) -> Result<(), SyncFailure> {
    let log = std::fs::File::open(wal).map_err(SyncFailure::Open)?;
    log.sync_data().map_err(SyncFailure::Flush)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiters_that_arrive_together_share_an_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("t.db");
        std::fs::write(dir.path().join("t.db-wal"), b"frames").unwrap();
        let sync = Arc::new(GroupSync::new(db));
        // Ten commits finish while an fsync is running (the leader lock is held)...
        let running = sync.leader.lock().await;
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..10 {
            let sync = sync.clone();
            tasks.spawn(async move { sync.wait().await.unwrap() });
        }
        while sync.requested.load(Ordering::SeqCst) < 10 {
            tokio::task::yield_now().await;
        }
        drop(running);
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
        // ... and the next fsync covers them all.
        let syncs = sync.syncs();
        assert_eq!(syncs, 1);
        // A wait after them all needs an fsync of its own: none started after it yet.
        sync.wait().await.unwrap();
        assert_eq!(sync.syncs(), syncs + 1);
    }

    #[tokio::test]
    async fn a_missing_log_fails_the_wait_without_counting_a_sync() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.db"), b"pages").unwrap();
        let sync = GroupSync::new(dir.path().join("t.db"));
        // No log where SQLite would write it: not acknowledged, and the process goes on.
        assert!(sync.wait().await.is_err());
        assert_eq!(sync.syncs(), 0);
        // Once the log is there, the next waiter's fsync goes through.
        std::fs::write(dir.path().join("t.db-wal"), b"frames").unwrap();
        sync.wait().await.unwrap();
        assert_eq!(sync.syncs(), 1);
    }

    #[tokio::test]
    async fn a_database_named_through_a_link_has_its_log_beside_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("real.db"), b"pages").unwrap();
        std::fs::write(data.join("real.db-wal"), b"frames").unwrap();
        let link = dir.path().join("link.db");
        std::os::unix::fs::symlink(data.join("real.db"), &link).unwrap();
        let sync = GroupSync::new(link);
        assert_eq!(sync.wal, data.join("real.db-wal").canonicalize().unwrap());
        sync.wait().await.unwrap();
        assert_eq!(sync.syncs(), 1);
    }
}
