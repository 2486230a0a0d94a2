//! The one SQLite writer: a thread that owns a write connection and runs the hot writes (an OTP
//! issued, a message marked `sending`, a send's outcome, a status callback, a send slot) of many
//! requests in one transaction, then answers each request.
//!
//! Why: SQLite has one writer at a time. Through the pool, every statement of a request was a
//! round trip to a connection's worker thread, and concurrent requests queued on the write lock
//! in SQLite's busy handler, which sleeps for milliseconds. Here a request's whole unit of work
//! is one hop to this thread, runs on prepared statements, and requests that arrive while a
//! batch runs share the next batch's commit.
//!
//! Each job runs inside a savepoint: a job that fails is rolled back alone and answered with its
//! error; the others in the batch still commit. A job is answered once its batch commits (with
//! `synchronous=NORMAL`, in the log, not yet on disk): what is acknowledged to a caller waits for
//! the group fsync as every other commit does (`group_sync.rs`: the `durable_writes` middleware,
//! and the dispatcher before it calls the provider). Answering at commit lets a request's several
//! writes go one after another without an fsync between each.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::mpsc;

use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::{Connection, OpenFlags, Statement, ToSql};

use crate::error::{AppError, AppResult};

/// The most jobs one transaction takes: enough to share a commit widely, few enough that the
/// first job's answer does not wait long behind the rest.
const MAX_BATCH: usize = 256;

pub struct SqliteWriter {
    jobs: mpsc::Sender<Box<dyn Job>>,
}

impl SqliteWriter {
    /// Open the writer's connection to the database file at `path` (already created and
    /// migrated) and start its thread. The thread ends when the writer is dropped.
    pub fn start(path: &Path) -> AppResult<SqliteWriter> {
        let conn = open(path)?;
        let (jobs, queue) = mpsc::channel::<Box<dyn Job>>();
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || serve(conn, queue))
            .map_err(|e| anyhow::anyhow!("starting the SQLite writer thread: {e}"))?;
        Ok(SqliteWriter { jobs })
    }

    /// Run `work` in the writer's next transaction; its answer once the transaction commits.
    /// An `Err` from `work` undoes what it wrote (and only that). Like any commit here, it is
    /// on disk once `MessageStore::durable` returns (the group fsync, `group_sync.rs`).
    pub async fn write<T, F>(&self, work: F) -> AppResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> AppResult<T> + Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = Work {
            work: Some(work),
            result: None,
            reply,
        };
        self.jobs
            .send(Box::new(job))
            .map_err(|_| anyhow::anyhow!("the SQLite writer has stopped"))?;
        answer
            .await
            .map_err(|_| anyhow::anyhow!("the SQLite writer stopped before answering"))?
    }
}

fn open(path: &Path) -> AppResult<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)?;
    // The pool's settings (see `SqliteStore::connect`): NORMAL, because nothing is acknowledged
    // before the group fsync that follows its commit.
    // `temp_store = MEMORY`: each job's savepoint journal stays in memory, not in a temp file.
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA secure_delete = ON; \
         PRAGMA foreign_keys = ON; PRAGMA temp_store = MEMORY;",
    )?;
    conn.busy_handler(Some(super::wait_for_the_lock))?;
    conn.set_prepared_statement_cache_capacity(128);
    Ok(conn)
}

/// A unit of work and the caller waiting for it.
trait Job: Send {
    /// Run inside the batch's transaction; `false` when it failed (its writes are undone).
    fn run(&mut self, conn: &Connection) -> bool;
    /// Answer the caller once the batch's fate is known.
    fn answer(self: Box<Self>, committed: &Result<(), AppError>);
}

struct Work<T, F> {
    work: Option<F>,
    result: Option<AppResult<T>>,
    reply: tokio::sync::oneshot::Sender<AppResult<T>>,
}

impl<T, F> Job for Work<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> AppResult<T> + Send + 'static,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let Some(work) = self.work.take() else {
            return false;
        };
        // A bug in one job must not take the writer (and every later request) down with it.
        let result = catch_unwind(AssertUnwindSafe(|| work(conn))).unwrap_or_else(|_| {
            Err(AppError::Internal(anyhow::anyhow!(
                "a SQLite write panicked"
            )))
        });
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn answer(self: Box<Self>, committed: &Result<(), AppError>) {
        let answer = match (self.result, committed) {
            (Some(Err(e)), _) => Err(e),
            (Some(Ok(value)), Ok(())) => Ok(value),
            // Each job of the batch gets the batch's error, of the same kind (a lock not had in
            // time stays a 503).
            (_, Err(e)) => Err(match e.shared() {
                AppError::Internal(cause) => {
                    AppError::Internal(cause.context("the write was not committed"))
                }
                other => other,
            }),
            (None, Ok(())) => Err(anyhow::anyhow!("the write was never run").into()),
        };
        // The caller may have gone (a dropped request): its write stands all the same.
        let _ = self.reply.send(answer);
    }
}

/// The writer thread: take every job waiting (up to `MAX_BATCH`), run them in one transaction,
/// answer them, and go on with the next batch.
fn serve(conn: Connection, queue: mpsc::Receiver<Box<dyn Job>>) {
    while let Ok(first) = queue.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let result = run_batch(&conn, &mut jobs).map_err(AppError::from);
        if let Err(e) = &result {
            tracing::error!(
                error = format!("{e:#}"),
                jobs = jobs.len(),
                "a SQLite write batch failed"
            );
        }
        for job in jobs {
            job.answer(&result);
        }
    }
}

fn run_batch(conn: &Connection, batch: &mut [Box<dyn Job>]) -> rusqlite::Result<()> {
    if !conn.is_autocommit() {
        roll_back(conn);
    }
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let ran = batch.iter_mut().try_for_each(|job| {
        conn.execute_batch("SAVEPOINT job")?;
        if !job.run(conn) {
            conn.execute_batch("ROLLBACK TO job")?;
        }
        conn.execute_batch("RELEASE job")
    });
    match ran.and_then(|()| conn.execute_batch("COMMIT")) {
        Ok(()) => Ok(()),
        Err(e) => {
            roll_back(conn);
            Err(e)
        }
    }
}

/// End a failed batch's transaction. SQLite may already have rolled it back by itself (a full
/// disk, an I/O error): then `ROLLBACK` fails, harmlessly. What must not happen is the writer
/// staying inside a transaction, holding the write lock, with every later batch refused; the
/// next batch tries again before it begins (`run_batch`).
fn roll_back(conn: &Connection) {
    let _ = conn.execute_batch("ROLLBACK");
    if !conn.is_autocommit() {
        tracing::error!("the SQLite writer could not end a failed transaction");
    }
}

/// A prepared (cached) statement with its `$1`, `$2`, ... bound: the statements are the ones
/// the pool runs, written with sqlx's numbered parameters, which SQLite reads as names.
pub(super) fn prepare<'c>(
    conn: &'c Connection,
    sql: &str,
    params: &[&dyn ToSql],
) -> rusqlite::Result<rusqlite::CachedStatement<'c>> {
    let mut statement = conn.prepare_cached(sql)?;
    bind(&mut statement, params)?;
    Ok(statement)
}

fn bind(statement: &mut Statement<'_>, params: &[&dyn ToSql]) -> rusqlite::Result<()> {
    for (i, value) in params.iter().enumerate() {
        if let Some(index) = statement.parameter_index(&format!("${}", i + 1))? {
            statement.raw_bind_parameter(index, value)?;
        }
    }
    Ok(())
}

/// Run a statement; the rows it changed.
pub(super) fn execute(conn: &Connection, sql: &str, params: &[&dyn ToSql]) -> AppResult<usize> {
    Ok(prepare(conn, sql, params)?.raw_execute()?)
}

/// The first row's first column, if there is a row.
pub(super) fn scalar<T: rusqlite::types::FromSql>(
    conn: &Connection,
    sql: &str,
    params: &[&dyn ToSql],
) -> AppResult<Option<T>> {
    let mut statement = prepare(conn, sql, params)?;
    let mut rows = statement.raw_query();
    Ok(match rows.next()? {
        Some(row) => Some(row.get(0)?),
        None => None,
    })
}

/// A time as sqlx writes it to SQLite (RFC 3339, `+00:00`), so text comparisons in SQL agree
/// whichever connection wrote the value.
pub(super) fn ts(time: &DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::AutoSi, false)
}

/// A time written by either connection.
pub(super) fn parse_ts(text: &str) -> AppResult<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .or_else(|_| DateTime::parse_from_str(text, "%F %T%.f%:z"))
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| anyhow::anyhow!("a stored time is not RFC 3339 ({text}): {e}").into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer_on_new_file() -> (tempfile::TempDir, SqliteWriter) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; CREATE TABLE t (k TEXT PRIMARY KEY, v INTEGER)",
        )
        .unwrap();
        let writer = SqliteWriter::start(&path).unwrap();
        (dir, writer)
    }

    /// A full disk (here the file's page limit) fails the batch, and SQLite may roll the whole
    /// transaction back by itself: the next batch still begins, commits and is seen.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_disk_fails_its_batch_and_the_next_one_commits() {
        let (dir, writer) = writer_on_new_file();
        let full = writer
            .write(|conn| {
                let pages: Option<i64> = scalar(conn, "PRAGMA page_count", &[])?;
                let limit = pages.unwrap_or(0) + 2;
                conn.execute_batch(&format!("PRAGMA max_page_count = {limit}"))?;
                for i in 0..100i64 {
                    execute(
                        conn,
                        "INSERT INTO t (k, v) VALUES ($1 || randomblob(3000), $2)",
                        &[&i.to_string(), &i],
                    )?;
                }
                Ok(())
            })
            .await;
        let error = format!("{:#}", full.unwrap_err());
        assert!(error.contains("full"), "{error}");
        writer
            .write(|conn| {
                conn.execute_batch("PRAGMA max_page_count = 1073741823")?;
                execute(conn, "INSERT INTO t (k, v) VALUES ('after', 1)", &[])?;
                Ok(())
            })
            .await
            .unwrap();
        let other = Connection::open(dir.path().join("w.db")).unwrap();
        let rows: i64 = other
            .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 1, "only the write after the failure");
        other.execute_batch("BEGIN IMMEDIATE; ROLLBACK").unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_job_is_undone_alone() {
        use std::sync::Arc;
        let (_dir, writer) = writer_on_new_file();
        let writer = Arc::new(writer);
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..50i64 {
            let writer = writer.clone();
            tasks.spawn(async move {
                writer
                    .write(move |conn| {
                        execute(conn, "INSERT INTO t (k, v) VALUES ($1, $2)", &[&i, &i])?;
                        if i % 5 == 0 {
                            return Err(AppError::bad_request("odd", "refused"));
                        }
                        Ok(i)
                    })
                    .await
            });
        }
        let mut ok = 0;
        while let Some(done) = tasks.join_next().await {
            if done.unwrap().is_ok() {
                ok += 1;
            }
        }
        assert_eq!(ok, 40);
        let count: Option<i64> = writer
            .write(|conn| scalar(conn, "SELECT COUNT(*) FROM t WHERE v % 5 <> 0", &[]))
            .await
            .unwrap();
        let all: Option<i64> = writer
            .write(|conn| scalar(conn, "SELECT COUNT(*) FROM t", &[]))
            .await
            .unwrap();
        assert_eq!((count, all), (Some(40), Some(40)));
    }

    #[tokio::test]
    async fn a_panicking_job_leaves_the_writer_running() {
        let (_dir, writer) = writer_on_new_file();
        let failed = writer
            .write(|_conn| -> AppResult<()> { panic!("a bug") })
            .await;
        assert!(failed.is_err());
        let value: Option<i64> = writer
            .write(|conn| scalar(conn, "SELECT $2 + $1", &[&1i64, &2i64]))
            .await
            .unwrap();
        assert_eq!(value, Some(3));
    }

    #[test]
    fn times_round_trip_in_sqlx_format() {
        let t = DateTime::parse_from_rfc3339("2026-11-26T09:00:00.123456Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(ts(&t), "2026-11-26T09:00:00.123456+00:00");
        assert_eq!(parse_ts(&ts(&t)).unwrap(), t);
    }
}
