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
/// Batches of one kind running at once (each holds a pooled connection). One, so that jobs
/// gather while a batch runs and batches of one instance never contend with each other for the
/// same index pages (the queue's head, the events' end). Four slots made batches of 1.4 OTPs and
/// 1,800 sends/s against 2,100-2,200 with one or two (an earlier session). Two against one,
/// alternating builds on fresh databases: dispatch 5,975-6,400 against 6,766-6,811 msg/s with one
/// instance, 5,698-5,787 against 6,184-6,424 with two; send-otp 3,521-3,597 against 3,582-3,658/s
/// (p99 19 against 13 ms).
const CONCURRENT_BATCHES: usize = 1;

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
/// Runs jobs as one database call; answers one result per job, in order. The jobs are shared,
/// not copied: the batcher keeps them only to run them again one by one after a refusal.
pub type RunBatch<J, R> = Arc<dyn Fn(Arc<[J]>) -> BatchFuture<R> + Send + Sync>;

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
    J: Clone + Send + Sync + 'static,
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
    J: Clone + Send + Sync + 'static,
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
    J: Clone + Send + Sync + 'static,
    R: Send + 'static,
{
    let (jobs, replies): (Vec<J>, Vec<_>) = batch.into_iter().map(|p| (p.job, p.reply)).unzip();
    let jobs: Arc<[J]> = jobs.into();
    let count = jobs.len();
    match run(jobs.clone()).await {
        Ok(results) if results.len() == count => {
            for (reply, result) in replies.into_iter().zip(results) {
                // The caller may have gone (a dropped request): its write stands all the same.
                let _ = reply.send(Ok(result));
            }
        }
        Ok(results) => fail_all(
            replies,
            &AppError::Internal(anyhow::anyhow!(
                "{what}: {count} jobs, {} answers",
                results.len()
            )),
        ),
        Err(BatchError::Refused(e)) if count > 1 => {
            tracing::warn!(
                error = format!("{e:#}"),
                jobs = count,
                "{what}: a batch was refused; running its jobs one by one"
            );
            for (job, reply) in jobs.iter().zip(replies) {
                let result = match run(Arc::from([job.clone()])).await {
                    Ok(mut one) => one
                        .pop()
                        .ok_or_else(|| anyhow::anyhow!("{what}: no answer").into()),
                    Err(BatchError::Refused(e) | BatchError::Failed(e)) => Err(e),
                };
                let _ = reply.send(result);
            }
        }
        // One job alone, or a failure after which the batch may have committed: the error as
        // it is, to every caller.
        Err(BatchError::Refused(e) | BatchError::Failed(e)) => fail_all(replies, &e),
    }
}

/// Answer every caller with the same error: its kind and its whole cause as text (a database
/// out of reach stays a 503, and the log shows why).
fn fail_all<R>(replies: Vec<oneshot::Sender<AppResult<R>>>, error: &AppError) {
    for reply in replies {
        let _ = reply.send(Err(error.shared()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    type Seen = Arc<Mutex<Vec<Vec<i64>>>>;

    /// A batcher whose runner records its batches, refuses any batch holding a negative job and
    /// fails (as after a lost connection) any batch holding 1000.
    fn recording() -> (Arc<Batcher<i64, i64>>, Seen) {
        let seen = Seen::default();
        let log = seen.clone();
        let run: RunBatch<i64, i64> = Arc::new(move |jobs: Arc<[i64]>| {
            let log = log.clone();
            Box::pin(async move {
                log.lock().unwrap().push(jobs.to_vec());
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
        });
        (Arc::new(Batcher::start("test", Abandoned::Skip, run)), seen)
    }

    /// Queue `jobs` before the batcher's task can run (the test runtime has one thread), so they
    /// make one batch; their answers.
    fn queue_together(
        batcher: &Batcher<i64, i64>,
        jobs: &[i64],
    ) -> Vec<oneshot::Receiver<AppResult<i64>>> {
        jobs.iter()
            .map(|&job| {
                let (reply, answer) = oneshot::channel();
                assert!(batcher.jobs.send(Pending { job, reply }).is_ok());
                answer
            })
            .collect()
    }

    #[tokio::test]
    async fn concurrent_calls_share_batches_and_each_gets_its_own_answer() {
        let (batcher, seen) = recording();
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
    async fn a_refused_batch_is_run_again_job_by_job_so_only_the_bad_job_fails() {
        let (batcher, seen) = recording();
        let jobs = [1i64, 2, -3, 4];
        let answers = queue_together(&batcher, &jobs);
        for (j, answer) in jobs.iter().zip(answers) {
            match (j, answer.await.unwrap()) {
                (-3, answer) => assert!(answer.is_err()),
                (j, answer) => assert_eq!(answer.unwrap(), j * 10),
            }
        }
        // The batch, then each job alone.
        let seen = seen.lock().unwrap();
        assert_eq!(
            *seen,
            vec![vec![1, 2, -3, 4], vec![1], vec![2], vec![-3], vec![4]]
        );
    }

    #[tokio::test]
    async fn a_batch_that_may_have_committed_is_never_run_again() {
        let (batcher, seen) = recording();
        let answers = queue_together(&batcher, &[1000, 1, 2, 3]);
        for answer in answers {
            assert!(answer.await.unwrap().is_err());
        }
        assert_eq!(*seen.lock().unwrap(), vec![vec![1000, 1, 2, 3]]);
    }

    #[tokio::test]
    async fn a_job_whose_caller_has_gone_is_not_run() {
        let (batcher, seen) = recording();
        let mut answers = queue_together(&batcher, &[7, 8]);
        // The caller of 7 stops waiting before any batch takes it.
        drop(answers.remove(0));
        assert_eq!(answers.remove(0).await.unwrap().unwrap(), 80);
        assert_eq!(*seen.lock().unwrap(), vec![vec![8]]);
    }
}
