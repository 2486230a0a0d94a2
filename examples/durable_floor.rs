//! Benchmark helper (not a test, not the service): the floor under a durable `send-otp` on this
//! machine, for `bench/write-path.sh`. It answers `POST /api/messaging/send-otp` with the least a
//! durable write can do: parse the JSON body, append one row through one writer thread that
//! commits whatever requests are waiting as one batch, and answer each request once an fsync of
//! the log that started after its commit has finished. As in the service (`store/group_sync.rs`)
//! the commit runs with `synchronous=NORMAL` and the fsync on a thread of its own, which covers
//! every batch committed while the one before ran, so the writer goes on to the next batch while
//! the disk flushes. Nothing else: no validation, no limits, no encryption, no message row.
//!
//! `durable_floor <database-file> <port> <random-keys> [row-bytes] [side]`: the row also carries
//! `random-keys` columns, each indexed and given a fresh random 64-hex-digit key (the width of a
//! blind index) per request, and, with `row-bytes`, random hex filling the row to about that
//! size (a code's rows are sealed, so random). Once an index has many more leaf pages than a
//! batch has rows, a key that no recent request shares lands on a page of its own, so each adds
//! a page that no other row of the batch shares to what the commit writes to the log and what
//! the checkpoint copies back; `send-otp` writes entries under several such keys (see the
//! README's "Benchmarks"). With `side`, the keys go instead to tables of their own in a second
//! file, attached to the same connection and written in the same transaction but never synced
//! (`synchronous=OFF`): the design in which the lookups are a cache that a start after an unclean
//! stop rebuilds from the rows, so that only the rows wait for the disk. `bench/write-path.sh`
//! runs it with 0, 1, 3 and 7 keys, with rows of a code's size, and with 7 keys in the side file,
//! under the same load as the service.

use std::sync::mpsc;

use anyhow::Context;
use axum::{extract::State, http::StatusCode, routing::post, Json, Router};
use rand::Rng;
use tokio::sync::oneshot;

/// One request's row: its body, its random keys, and where to say it is on disk.
struct Append {
    body: String,
    keys: Vec<String>,
    written: oneshot::Sender<bool>,
}

/// A batch is whatever is waiting, up to this many.
const MAX_BATCH: usize = 256;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (file, port, keys, row_bytes, side) = match args.as_slice() {
        [_, file, port, keys] => (file, port, keys, "0", false),
        [_, file, port, keys, row_bytes] => (file, port, keys, row_bytes.as_str(), false),
        [_, file, port, keys, row_bytes, side] if side == "side" => {
            (file, port, keys, row_bytes.as_str(), true)
        }
        _ => anyhow::bail!(
            "usage: durable_floor <database-file> <port> <random-keys> [row-bytes] [side]"
        ),
    };
    let keys: usize = keys.parse().context("random-keys: a number")?;
    let row_bytes: usize = row_bytes.parse().context("row-bytes: a number")?;
    let connection = open(file, keys, side)?;
    let keys_side = side;
    let log = std::fs::File::open(format!("{file}-wal")).context("opening the log")?;
    let (appends, waiting) = mpsc::channel::<Append>();
    let (committed, to_sync) = mpsc::channel::<Vec<Append>>();
    std::thread::spawn(move || {
        if let Err(e) = write_batches(&connection, keys, keys_side, &waiting, &committed) {
            eprintln!("the writer stopped: {e:#}");
            std::process::exit(1);
        }
    });
    std::thread::spawn(move || {
        if let Err(e) = sync_batches(&log, &to_sync) {
            eprintln!("the fsync failed: {e}");
            std::process::exit(1);
        }
    });
    let app = Router::new()
        .route("/api/messaging/send-otp", post(send_otp))
        .with_state(Floor {
            appends,
            keys,
            row_bytes,
        });
    tokio::runtime::Runtime::new()?.block_on(async {
        let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await?;
        axum::serve(listener, app).await?;
        Ok(())
    })
}

/// What every request needs: the way to the writer, and what to write.
#[derive(Clone)]
struct Floor {
    appends: mpsc::Sender<Append>,
    keys: usize,
    row_bytes: usize,
}

async fn send_otp(
    State(floor): State<Floor>,
    Json(body): Json<serde_json::Value>,
) -> (StatusCode, Json<serde_json::Value>) {
    let mut body = body.to_string();
    let keys = {
        let mut rng = rand::thread_rng();
        while body.len() < floor.row_bytes {
            body.push_str(&format!("{:032x}", rng.gen::<u128>()));
        }
        (0..floor.keys)
            .map(|_| format!("{:032x}{:032x}", rng.gen::<u128>(), rng.gen::<u128>()))
            .collect()
    };
    let (written, on_disk) = oneshot::channel();
    let queued = floor
        .appends
        .send(Append {
            body,
            keys,
            written,
        })
        .is_ok();
    if queued && on_disk.await == Ok(true) {
        (StatusCode::OK, Json(serde_json::json!({"success": true})))
    } else {
        let error = serde_json::json!({"success": false, "error": "not stored"});
        (StatusCode::INTERNAL_SERVER_ERROR, Json(error))
    }
}

fn open(file: &str, keys: usize, side: bool) -> anyhow::Result<rusqlite::Connection> {
    let connection = rusqlite::Connection::open(file)?;
    connection.pragma_update(None, "journal_mode", "WAL")?;
    connection.pragma_update(None, "synchronous", "NORMAL")?;
    let columns: String = (0..keys).map(|i| format!(", k{i} TEXT NOT NULL")).collect();
    if side {
        // The keys in a file of their own that is never synced (a lookup that could be rebuilt
        // from the rows after an unclean stop), the rows in the synced one.
        connection.execute(&format!("ATTACH DATABASE '{file}-side' AS side"), [])?;
        connection
            .execute_batch("PRAGMA side.journal_mode = WAL; PRAGMA side.synchronous = OFF;")?;
        connection.execute_batch(
            "CREATE TABLE IF NOT EXISTS appends (id INTEGER PRIMARY KEY, body TEXT NOT NULL)",
        )?;
        for i in 0..keys {
            connection.execute_batch(&format!(
                "CREATE TABLE IF NOT EXISTS side.keys{i} (k TEXT NOT NULL, id INTEGER NOT NULL, \
                 PRIMARY KEY (k, id)) WITHOUT ROWID"
            ))?;
        }
        return Ok(connection);
    }
    connection.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS appends (id INTEGER PRIMARY KEY, body TEXT NOT NULL{columns})"
    ))?;
    for i in 0..keys {
        connection.execute_batch(&format!(
            "CREATE INDEX IF NOT EXISTS appends_k{i} ON appends (k{i})"
        ))?;
    }
    Ok(connection)
}

/// Commit what waits, batch after batch, until every sender is gone; each committed batch goes
/// to the fsync thread.
fn write_batches(
    connection: &rusqlite::Connection,
    keys: usize,
    side: bool,
    waiting: &mpsc::Receiver<Append>,
    committed: &mpsc::Sender<Vec<Append>>,
) -> anyhow::Result<()> {
    let columns: String = (0..keys).map(|i| format!(", k{i}")).collect();
    let values: String = (0..keys).map(|i| format!(", ?{}", i + 2)).collect();
    let insert = if side {
        "INSERT INTO appends (body) VALUES (?1)".to_string()
    } else {
        format!("INSERT INTO appends (body{columns}) VALUES (?1{values})")
    };
    while let Ok(first) = waiting.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match waiting.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        connection.execute_batch("BEGIN IMMEDIATE")?;
        {
            let mut statement = connection.prepare_cached(&insert)?;
            for append in &batch {
                if side {
                    statement.execute([&append.body])?;
                    let id = connection.last_insert_rowid();
                    for (i, key) in append.keys.iter().enumerate() {
                        connection
                            .prepare_cached(&format!("INSERT INTO side.keys{i} VALUES (?1, ?2)"))?
                            .execute(rusqlite::params![key, id])?;
                    }
                    continue;
                }
                let mut params: Vec<&dyn rusqlite::ToSql> = vec![&append.body];
                params.extend(append.keys.iter().map(|k| k as &dyn rusqlite::ToSql));
                statement.execute(params.as_slice())?;
            }
        }
        connection.execute_batch("COMMIT")?;
        committed.send(batch)?;
    }
    Ok(())
}

/// One fsync of the log for every batch committed so far, then their answers; again.
fn sync_batches(
    log: &std::fs::File,
    committed: &mpsc::Receiver<Vec<Append>>,
) -> std::io::Result<()> {
    while let Ok(first) = committed.recv() {
        let mut batches = vec![first];
        batches.extend(committed.try_iter());
        log.sync_data()?;
        for append in batches.into_iter().flatten() {
            let _ = append.written.send(true);
        }
    }
    Ok(())
}
