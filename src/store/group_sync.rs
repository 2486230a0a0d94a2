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
//! Why the directory too, once: a new database's log is created by the first connection and
//! lives as long as the service (the writer thread's connection never closes), but a file's
//! name is in its directory, which an fsync of the file does not cover. SQLite syncs the
//! directory on the log's first sync of its own, which with `synchronous=NORMAL` is the first
//! checkpoint; a power cut before it could lose the log, name and all, with every commit in it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::error::AppResult;

pub struct GroupSync {
    database: PathBuf,
    wal: PathBuf,
    /// The directory's entries (the database's and its log's) are on disk.
    directory_synced: AtomicBool,
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
    /// For the database file at `database`: its log is `database-wal`.
    pub fn new(database: PathBuf) -> GroupSync {
        let mut wal = database.clone().into_os_string();
        wal.push("-wal");
        GroupSync {
            database,
            wal: PathBuf::from(wal),
            directory_synced: AtomicBool::new(false),
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
        let (database, wal) = (self.database.clone(), self.wal.clone());
        let with_directory = !self.directory_synced.load(Ordering::SeqCst);
        let synced = tokio::task::spawn_blocking(move || sync_log(&database, &wal, with_directory))
            .await
            .map_err(|e| anyhow::anyhow!("the fsync task failed: {e}"))?;
        match synced {
            Ok(()) => {}
            // Nothing was flushed, so nothing is known lost: this write is not acknowledged
            // (its caller gets an error), and the next waiter tries again.
            Err(SyncFailure::Open(e)) => {
                return Err(anyhow::anyhow!("opening the SQLite log to fsync it: {e}").into())
            }
            // After a failed fsync the kernel may have dropped the dirty pages: a later fsync
            // succeeding proves nothing. Stop, as PostgreSQL does; recovery replays the log.
            Err(SyncFailure::Flush(e)) => {
                tracing::error!(error = %e, "fsync of the SQLite log failed: stopping");
                std::process::abort();
            }
        }
        self.directory_synced.store(true, Ordering::SeqCst);
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
    /// The file to flush could not be opened (the log and the database both gone): nothing
    /// was flushed.
    Open(std::io::Error),
    /// The flush itself failed.
    Flush(std::io::Error),
}

/// fsync the log of `database` (`wal`), and first its directory when `with_directory`.
fn sync_log(
    database: &std::path::Path,
    wal: &std::path::Path,
    with_directory: bool,
) -> Result<(), SyncFailure> {
    if with_directory {
        sync_directory(database)?;
    }
    let file = match std::fs::File::open(wal) {
        Ok(file) => file,
        // No log: the last connection closed and checkpointed it into the database, which is
        // then where the commits are.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::File::open(database).map_err(SyncFailure::Open)?
        }
        Err(e) => return Err(SyncFailure::Open(e)),
    };
    file.sync_data().map_err(SyncFailure::Flush)
}

/// fsync the directory that names `database` and its log. As SQLite does for its own directory
/// syncs, a directory that cannot be opened is passed over (some systems refuse to open one);
/// a flush that fails is a failure.
fn sync_directory(database: &std::path::Path) -> Result<(), SyncFailure> {
    let directory = match database.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => std::path::Path::new("."),
    };
    match std::fs::File::open(directory) {
        Ok(directory) => directory.sync_all().map_err(SyncFailure::Flush),
        Err(_) => Ok(()),
    }
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

    #[test]
    fn without_a_log_the_database_is_synced_and_without_either_it_fails() {
        let dir = tempfile::tempdir().unwrap();
        let (db, wal) = (dir.path().join("t.db"), dir.path().join("t.db-wal"));
        let neither = sync_log(&db, &wal, true).unwrap_err();
        assert!(
            matches!(&neither, SyncFailure::Open(e) if e.kind() == std::io::ErrorKind::NotFound),
            "{neither:?}"
        );
        std::fs::write(&db, b"pages").unwrap();
        sync_log(&db, &wal, true).unwrap();
        std::fs::write(&wal, b"frames").unwrap();
        sync_log(&db, &wal, false).unwrap();
        // A directory that is gone, with its files: nothing to flush, an error for the waiter.
        let gone = dir.path().join("gone");
        let failed = sync_log(&gone.join("t.db"), &gone.join("t.db-wal"), true).unwrap_err();
        assert!(matches!(failed, SyncFailure::Open(_)), "{failed:?}");
    }

    #[tokio::test]
    async fn the_directory_is_synced_with_the_first_fsync_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.db-wal"), b"frames").unwrap();
        let sync = GroupSync::new(dir.path().join("t.db"));
        assert!(!sync.directory_synced.load(Ordering::SeqCst));
        sync.wait().await.unwrap();
        assert!(sync.directory_synced.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_log_and_database_gone_fail_the_wait_without_counting_a_sync() {
        let dir = tempfile::tempdir().unwrap();
        let sync = GroupSync::new(dir.path().join("t.db"));
        assert!(sync.wait().await.is_err());
        assert_eq!(sync.syncs(), 0);
        // Once there is something to flush, the next waiter's sync goes through.
        std::fs::write(dir.path().join("t.db"), b"pages").unwrap();
        sync.wait().await.unwrap();
        assert_eq!(sync.syncs(), 1);
    }
}
