//! Bulk import of a clinic's calendar from CSV (`prism-messaging import appointments|follow-ups|
//! subscriptions FILE.csv`).
//!
//! Each row is validated by exactly the functions behind the host app's `PUT` calls; a refused
//! row writes nothing and is reported with its line number and reason. An id may appear once per
//! file (a second row for it is refused: which one would win is only the file's order). Valid rows are written
//! [`BATCH`] at a time, each batch in one transaction, and a row already stored exactly so is
//! left alone: importing the same file twice changes nothing the second time.

use std::collections::HashMap;
use std::io::Read;
use std::sync::{Arc, Mutex, PoisonError};

use serde::Serialize;

use super::{AppointmentRequest, FollowUpRequest, Reminders, SubscriptionRequest};
use crate::error::AppError;
use crate::store::{ScheduledItem, SubjectType, Subscription, Upserted};

/// Valid rows written per transaction.
const BATCH: usize = 1_000;

/// What a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportKind {
    Appointments,
    FollowUps,
    Subscriptions,
}

impl ImportKind {
    /// The header the file must have (in any order).
    pub fn columns(self) -> &'static [&'static str] {
        match self {
            ImportKind::Appointments => &["id", "user_id", "starts_at", "time_zone", "status"],
            ImportKind::FollowUps => &["id", "user_id", "due_at", "time_zone"],
            ImportKind::Subscriptions => {
                &["id", "user_id", "plan", "renews_at", "expires_at", "status"]
            }
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ImportKind::Appointments => "appointments",
            ImportKind::FollowUps => "follow-ups",
            ImportKind::Subscriptions => "subscriptions",
        }
    }
}

/// A row that was not imported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    /// The line the row starts on (the header is line 1).
    pub line: u64,
    /// The error code the `PUT` call would answer (`invalid_time`, ...), `duplicate_id` or
    /// `invalid_csv`.
    pub code: String,
    pub message: String,
}

/// What an import did.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct ImportSummary {
    pub rows: u64,
    pub created: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub refused: Vec<Refusal>,
}

impl ImportSummary {
    fn count(&mut self, outcomes: &[Upserted]) {
        for outcome in outcomes {
            match outcome {
                Upserted::Created => self.created += 1,
                Upserted::Updated => self.updated += 1,
                Upserted::Unchanged => self.unchanged += 1,
            }
        }
    }
}

/// Valid rows waiting for their transaction.
enum Pending {
    Items(SubjectType, Vec<ScheduledItem>),
    Subscriptions(Vec<Subscription>),
}

impl Pending {
    fn len(&self) -> usize {
        match self {
            Pending::Items(_, items) => items.len(),
            Pending::Subscriptions(items) => items.len(),
        }
    }

    async fn flush(&mut self, reminders: &Reminders) -> anyhow::Result<Vec<Upserted>> {
        Ok(match self {
            Pending::Items(kind, items) => {
                let outcomes = reminders.import_items(*kind, items).await?;
                items.clear();
                outcomes
            }
            Pending::Subscriptions(items) => {
                let outcomes = reminders.import_subscriptions(items).await?;
                items.clear();
                outcomes
            }
        })
    }
}

/// The input as it is read, noting where each line's content starts (its first byte that is
/// not a line break) and which line that is. The csv crate's own line numbers run one short
/// after a `\r\n` (as Excel saves a file) or a blank line (found by review): a record's start
/// is kept before the line break that ends the line above. A record that starts at byte `b`
/// is on the first line whose content starts at or after `b`.
struct LineStarts<R> {
    inner: R,
    read: u64,
    line: u64,
    awaiting_content: bool,
    /// The last byte was a `\r`: a `\n` now ends the same line (`\r\n`), anything else
    /// follows a lone `\r`, which the csv crate also takes as a line end (old Mac files).
    after_cr: bool,
    starts: Arc<Mutex<Vec<(u64, u64)>>>,
}

impl<R: Read> Read for LineStarts<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut starts = self.starts.lock().unwrap_or_else(PoisonError::into_inner);
        for (i, byte) in buf[..n].iter().enumerate() {
            match byte {
                b'\n' if self.after_cr => {}
                b'\n' | b'\r' => {
                    self.line += 1;
                    self.awaiting_content = true;
                }
                _ if self.awaiting_content => {
                    starts.push((self.read + i as u64, self.line));
                    self.awaiting_content = false;
                }
                _ => {}
            }
            self.after_cr = *byte == b'\r';
        }
        self.read += n as u64;
        Ok(n)
    }
}

/// The line of the record that starts at byte `at`, from `LineStarts`' notes.
fn line_at(starts: &Mutex<Vec<(u64, u64)>>, at: u64) -> u64 {
    let starts = starts.lock().unwrap_or_else(PoisonError::into_inner);
    let first_after = starts.partition_point(|&(start, _)| start < at);
    starts
        .get(first_after)
        .or(starts.last())
        .map_or(1, |&(_, line)| line)
}

/// Import `input`, a CSV file of `kind`. `progress` is called with the bytes read so far after
/// each batch. A header that does not name exactly the expected columns is an error and nothing
/// is written; so is a database error (the batches before it stay written, and importing the
/// file again completes it).
pub async fn import_csv<R: Read>(
    reminders: &Reminders,
    kind: ImportKind,
    input: R,
    mut progress: impl FnMut(u64),
) -> anyhow::Result<ImportSummary> {
    let starts = Arc::new(Mutex::new(Vec::new()));
    let input = LineStarts {
        inner: input,
        read: 0,
        line: 1,
        awaiting_content: true,
        after_cr: false,
        starts: starts.clone(),
    };
    let line_at = |at: u64| line_at(&starts, at);
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_reader(input);
    let header: Vec<String> = reader
        .headers()?
        .iter()
        .map(|h| h.trim_start_matches('\u{feff}').to_string())
        .collect();
    let expected = kind.columns();
    let mut index = Vec::with_capacity(expected.len());
    for column in expected {
        match header.iter().position(|h| h == column) {
            Some(i) => index.push(i),
            None => anyhow::bail!(
                "the header must name the columns {} (in any order); it has {}",
                expected.join(","),
                header.join(",")
            ),
        }
    }
    if header.len() != expected.len() {
        anyhow::bail!(
            "the header must name exactly the columns {} (in any order); it has {}",
            expected.join(","),
            header.join(",")
        );
    }

    let mut summary = ImportSummary::default();
    let mut pending = match kind {
        ImportKind::Appointments => Pending::Items(SubjectType::Appointment, Vec::new()),
        ImportKind::FollowUps => Pending::Items(SubjectType::FollowUp, Vec::new()),
        ImportKind::Subscriptions => Pending::Subscriptions(Vec::new()),
    };
    // The line each imported id is on.
    let mut seen: HashMap<String, u64> = HashMap::new();
    let mut record = csv::StringRecord::new();
    loop {
        let line = line_at(reader.position().byte());
        match reader.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                if let csv::ErrorKind::Io(_) = e.kind() {
                    return Err(e.into());
                }
                summary.rows += 1;
                let line = e.position().map_or(line, |p| line_at(p.byte()));
                summary.refused.push(Refusal {
                    line,
                    code: "invalid_csv".into(),
                    message: csv_error_message(&e),
                });
                continue;
            }
        }
        summary.rows += 1;
        let line = record.position().map_or(line, |p| line_at(p.byte()));
        // Column `i` of the expected ones; an empty cell is a value left out.
        let cell = |i: usize| record.get(index[i]).unwrap_or_default().to_string();
        let optional = |i: usize| Some(cell(i)).filter(|v| !v.is_empty());
        let id = cell(0);
        if let Some(first) = seen.get(&id) {
            // Which row would win is the file's order, not a fact: importing it again would
            // flip the item back and forth. Each item once per file.
            summary.refused.push(Refusal {
                line,
                code: "duplicate_id".into(),
                message: format!("id {id:?} is already on line {first}"),
            });
            continue;
        }
        let added: Result<(), AppError> = match &mut pending {
            Pending::Items(SubjectType::Appointment, items) => reminders
                .appointment_item(
                    &cell(0),
                    AppointmentRequest {
                        user_id: cell(1),
                        starts_at: cell(2),
                        time_zone: optional(3),
                        status: optional(4),
                    },
                )
                .map(|item| items.push(item)),
            Pending::Items(_, items) => reminders
                .follow_up_item(
                    &cell(0),
                    FollowUpRequest {
                        user_id: cell(1),
                        due_at: cell(2),
                        time_zone: optional(3),
                    },
                )
                .map(|item| items.push(item)),
            Pending::Subscriptions(items) => reminders
                .subscription_record(
                    &cell(0),
                    SubscriptionRequest {
                        user_id: cell(1),
                        plan: cell(2),
                        renews_at: optional(3),
                        expires_at: optional(4),
                        status: optional(5),
                    },
                )
                .map(|item| items.push(item)),
        };
        match added {
            Ok(()) => {
                seen.insert(id, line);
            }
            Err(e) => summary.refused.push(Refusal {
                line,
                code: e.code().to_string(),
                message: e.to_string(),
            }),
        }
        if pending.len() >= BATCH {
            let outcomes = pending.flush(reminders).await?;
            summary.count(&outcomes);
            progress(reader.position().byte());
        }
    }
    if pending.len() > 0 {
        let outcomes = pending.flush(reminders).await?;
        summary.count(&outcomes);
    }
    progress(reader.position().byte());
    Ok(summary)
}

/// A CSV format error, without the crate's own position prefix (the line is reported apart).
fn csv_error_message(e: &csv::Error) -> String {
    match e.kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => format!("the row has {len} fields; the header has {expected_len}"),
        csv::ErrorKind::Utf8 { .. } => "the row is not valid UTF-8".to_string(),
        _ => e.to_string(),
    }
}
