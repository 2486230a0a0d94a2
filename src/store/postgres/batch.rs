//! Group commit for PostgreSQL's hot writes: calls of one kind that arrive while earlier ones run
//! go to the database together, as one call of a batch function (`functions.rs`) in one
//! transaction, and each caller gets its own job's answer.
//!
//! Why: at load most of an OTP send or a dispatched message was round trips and commits, each
//! costing both processes a wake-up and the server a protocol exchange. With a batch those are
//! paid once for many jobs. At low load a job goes alone at once: nothing waits for a batch to
//! fill.
//!
//! A batch the server refused (an error with an SQLSTATE: a constraint, a deadlock with another
//! instance, a bug) is run again one job at a time, so a bad job fails alone and the others still
//! commit: the server rolled the batch's transaction back, so running its jobs again is safe. Any
//! other failure (a lost connection, an answer that does not decode) goes to every caller as it
//! is: the batch may have committed, and running a job twice would answer it wrongly (a second
//! OTP issue hits the cooldown, a second mark finds the claim moved on).
//!
//! With `Abandoned::Skip`, a job whose caller has gone (a request dropped while its job waited)
//! is left out: as with a transaction dropped before its commit, nothing of it is written. Not for
//! a send's record: the message has gone out, and recording it beats leaving it to recovery.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::error::{AppError, AppResult};

/// Most jobs in one call: big enough to share a commit widely, small enough that the first job
/// does not wait long behind the rest.
const MAX_BATCH: usize = 64;
/// Batches of one kind running at once (each holds a pooled connection). Few, so that jobs
/// gather: at 16 connections' load, one or two slots made batches of about four OTPs and
/// 2,100-2,200 sends/s; four slots made batches of 1.4 and 1,800/s.
const CONCURRENT_BATCHES: usize = 2;

/// Why a batch failed.
pub enum BatchError {
    /// The server refused it and rolled it back: each job may run again alone.
    Refused(AppError),
    /// Anything else: the batch may have committed; every caller gets the error.
    Failed(AppError),
}

impl From<sqlx::Error> for BatchError {
    fn from(e: sqlx::Error) -> BatchError {
        match e {
            sqlx::Error::Database(_) => BatchError::Refused(e.into()),
            other => BatchError::Failed(other.into()),
        }
    }
}

impl From<AppError> for BatchError {
    fn from(e: AppError) -> BatchError {
        BatchError::Failed(e)
    }
}

type BatchFuture<R> = Pin<Box<dyn Future<Output = Result<Vec<R>, BatchError>> + Send>>;
/// Runs jobs as one database call; answers one result per job, in order.
pub type RunBatch<J, R> = Arc<dyn Fn(Vec<J>) -> BatchFuture<R> + Send + Sync>;

struct Pending<J, R> {
    job: J,
    reply: oneshot::Sender<AppResult<R>>,
}

/// What to do with a job whose caller stopped waiting before its batch ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abandoned {
    Skip,
    Run,
}

pub struct Batcher<J, R> {
    jobs: mpsc::UnboundedSender<Pending<J, R>>,
}

impl<J, R> Batcher<J, R>
where
    J: Clone + Send + 'static,
    R: Send + 'static,
{
    /// Start the task that gathers jobs into batches for `run` (it ends with the batcher).
    /// `what` names the kind of job in errors.
    pub fn start(what: &'static str, abandoned: Abandoned, run: RunBatch<J, R>) -> Batcher<J, R> {
        let (jobs, queue) = mpsc::unbounded_channel();
        tokio::spawn(gather(what, abandoned, queue, run));
        Batcher { jobs }
    }

    /// Run `job` in the next batch; its own answer.
    pub async fn call(&self, job: J) -> AppResult<R> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Pending { job, reply })
            .map_err(|_| anyhow::anyhow!("the batch writer has stopped"))?;
        answer
            .await
            .map_err(|_| anyhow::anyhow!("the batch writer stopped before answering"))?
    }
}

/// Take the jobs waiting (up to `MAX_BATCH`) once a batch slot is free, and run them.
async fn gather<J, R>(
    what: &'static str,
    abandoned: Abandoned,
    mut queue: mpsc::UnboundedReceiver<Pending<J, R>>,
    run: RunBatch<J, R>,
) where
    J: Clone + Send + 'static,
    R: Send + 'static,
{
    let slots = Arc::new(Semaphore::new(CONCURRENT_BATCHES));
    while let Some(first) = queue.recv().await {
        // While every slot is busy, jobs keep arriving and join the next batch.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(pending) => batch.push(pending),
                Err(_) => break,
            }
        }
        if abandoned == Abandoned::Skip {
            batch.retain(|pending| !pending.reply.is_closed());
        }
        if batch.is_empty() {
            continue;
        }
        let run = run.clone();
        tokio::spawn(async move {
            run_and_answer(what, batch, &run).await;
            drop(slot);
        });
    }
}

async fn run_and_answer<J, R>(what: &'static str, batch: Vec<Pending<J, R>>, run: &RunBatch<J, R>)
where
    J: Clone + Send + 'static,
    R: Send + 'static,
{
    let jobs: Vec<J> = batch.iter().map(|p| p.job.clone()).collect();
    let count = jobs.len();
    match run(jobs).await {
        Ok(results) if results.len() == count => {
            for (pending, result) in batch.into_iter().zip(results) {
                // The caller may have gone (a dropped request): its write stands all the same.
                let _ = pending.reply.send(Ok(result));
            }
        }
        Ok(results) => {
            let e = format!("{what}: {count} jobs, {} answers", results.len());
            for pending in batch {
                let _ = pending
                    .reply
                    .send(Err(AppError::Internal(anyhow::anyhow!("{e}"))));
            }
        }
        Err(BatchError::Refused(e)) if count > 1 => {
            tracing::warn!(error = %e, jobs = count, "{what}: a batch was refused; running its jobs one by one");
            for pending in batch {
                let result = match run(vec![pending.job.clone()]).await {
                    Ok(mut one) => one
                        .pop()
                        .ok_or_else(|| anyhow::anyhow!("{what}: no answer").into()),
                    Err(BatchError::Refused(e) | BatchError::Failed(e)) => Err(e),
                };
                let _ = pending.reply.send(result);
            }
        }
        // One job alone, or a failure after which the batch may have committed: the error as
        // it is, to every caller.
        Err(BatchError::Refused(e) | BatchError::Failed(e)) => {
            let e = e.to_string();
            for pending in batch {
                let _ = pending
                    .reply
                    .send(Err(AppError::Internal(anyhow::anyhow!("{e}"))));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A runner that records its batches and fails any batch holding a negative job.
    fn recording(seen: Arc<Mutex<Vec<Vec<i64>>>>) -> RunBatch<i64, i64> {
        Arc::new(move |jobs: Vec<i64>| {
            let seen = seen.clone();
            Box::pin(async move {
                seen.lock().unwrap().push(jobs.clone());
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                if jobs.iter().any(|j| *j < 0) {
                    return Err(BatchError::Refused(anyhow::anyhow!("bad job").into()));
                }
                if jobs.contains(&1000) {
                    return Err(BatchError::Failed(
                        anyhow::anyhow!("connection lost").into(),
                    ));
                }
                Ok(jobs.iter().map(|j| j * 10).collect())
            })
        })
    }

    #[tokio::test]
    async fn concurrent_calls_share_batches_and_each_gets_its_own_answer() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let batcher = Arc::new(Batcher::start(
            "test",
            Abandoned::Skip,
            recording(seen.clone()),
        ));
        let mut tasks = tokio::task::JoinSet::new();
        for j in 0..200i64 {
            let batcher = batcher.clone();
            tasks.spawn(async move { (j, batcher.call(j).await.unwrap()) });
        }
        while let Some(done) = tasks.join_next().await {
            let (j, answer) = done.unwrap();
            assert_eq!(answer, j * 10);
        }
        let seen = seen.lock().unwrap();
        let jobs: usize = seen.iter().map(Vec::len).sum();
        assert_eq!(jobs, 200);
        assert!(seen.len() < 200, "no batch held more than one job");
        assert!(seen.iter().all(|b| b.len() <= MAX_BATCH));
    }

    #[tokio::test]
    async fn a_failing_batch_is_run_again_job_by_job_so_only_the_bad_job_fails() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let batcher = Arc::new(Batcher::start(
            "test",
            Abandoned::Skip,
            recording(seen.clone()),
        ));
        let mut tasks = tokio::task::JoinSet::new();
        for j in [1i64, 2, -3, 4, 5, 6, 7, 8] {
            let batcher = batcher.clone();
            tasks.spawn(async move { (j, batcher.call(j).await) });
        }
        while let Some(done) = tasks.join_next().await {
            let (j, answer) = done.unwrap();
            match j {
                -3 => assert!(answer.is_err()),
                _ => assert_eq!(answer.unwrap(), j * 10),
            }
        }
    }

    #[tokio::test]
    async fn a_batch_that_may_have_committed_is_never_run_again() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let batcher = Arc::new(Batcher::start(
            "test",
            Abandoned::Skip,
            recording(seen.clone()),
        ));
        let mut tasks = tokio::task::JoinSet::new();
        for j in [1000i64, 1, 2, 3] {
            let batcher = batcher.clone();
            tasks.spawn(async move { (j, batcher.call(j).await) });
        }
        let mut failed = 0;
        while let Some(done) = tasks.join_next().await {
            if done.unwrap().1.is_err() {
                failed += 1;
            }
        }
        assert!(failed >= 1);
        // Every job ran once: none was run again after the failure.
        let seen = seen.lock().unwrap();
        let runs: usize = seen.iter().map(Vec::len).sum();
        assert_eq!(runs, 4, "{seen:?}");
    }

    #[tokio::test]
    async fn a_job_whose_caller_has_gone_is_not_run() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let batcher = Batcher::start("test", Abandoned::Skip, recording(seen.clone()));
        // Its reply channel closed before any batch takes it.
        let (reply, answer) = oneshot::channel();
        drop(answer);
        batcher
            .jobs
            .send(Pending { job: 7, reply })
            .map_err(|_| ())
            .unwrap();
        assert_eq!(batcher.call(8).await.unwrap(), 80);
        let seen = seen.lock().unwrap();
        assert!(seen.iter().flatten().all(|j| *j != 7), "{seen:?}");
    }
}
