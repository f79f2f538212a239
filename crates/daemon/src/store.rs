//! The job store: builds, what they pushed, their logs and provenance.
//!
//! SQLite in the data directory is the embedded default. Migrations are
//! compiled in and applied when the store opens; queries are checked at run
//! time (no `sqlx` macros, so building needs no database).

use std::borrow::Cow;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, AssertSqlSafe};
use sqlx::{Executor, Row};

use custody_oci::Digest;

use crate::record::{BuildId, BuildIdPrefix, Timestamp};
use crate::source::BuildSource;

type Migrations = &'static [(i64, &'static str, &'static str)];

const SQLITE_MIGRATIONS: Migrations = &[
    (
        1,
        "builds",
        include_str!("../migrations/sqlite/0001_builds.sql"),
    ),
    (
        2,
        "queue",
        include_str!("../migrations/sqlite/0002_queue.sql"),
    ),
    (
        3,
        "spec in source",
        include_str!("../migrations/sqlite/0003_spec_in_source.sql"),
    ),
    (
        4,
        "build record",
        include_str!("../migrations/sqlite/0004_build_record.sql"),
    ),
];

const POSTGRES_MIGRATIONS: Migrations = &[
    (
        1,
        "builds",
        include_str!("../migrations/postgres/0001_builds.sql"),
    ),
    (
        2,
        "queue",
        include_str!("../migrations/postgres/0002_queue.sql"),
    ),
    (
        3,
        "spec in source",
        include_str!("../migrations/postgres/0003_spec_in_source.sql"),
    ),
    (
        4,
        "build record",
        include_str!("../migrations/postgres/0004_build_record.sql"),
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the job store `{location}`: {source}")]
    Open {
        location: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot bring the job store `{location}` up to date: {source}")]
    Migrate {
        location: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error(
        "`{0}` is not a database URL: use `postgres://USER@HOST/DB`, `sqlite://PATH` or a file path"
    )]
    Url(String),
    #[error("the job store failed: {0}")]
    Query(#[from] sqlx::Error),
    #[error("the job store holds a build whose {field} cannot be read: {detail}")]
    Corrupt { field: &'static str, detail: String },
}

fn corrupt(field: &'static str) -> impl FnOnce(String) -> StoreError {
    move |detail| StoreError::Corrupt { field, detail }
}

/// Where a build is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Running => "running",
            State::Succeeded => "succeeded",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
        }
    }
}

impl FromStr for State {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "queued" => State::Queued,
            "running" => State::Running,
            "succeeded" => State::Succeeded,
            "failed" => State::Failed,
            "cancelled" => State::Cancelled,
            other => return Err(format!("unknown build state `{other}`")),
        })
    }
}

/// A build as it is first recorded.
pub struct NewBuild<'a> {
    pub id: &'a BuildId,
    pub spec_path: &'a str,
    /// The spec's bytes when it came with the request; `None` when the
    /// build reads it from its source.
    pub spec: Option<&'a [u8]>,
    pub source: &'a BuildSource,
    pub created_at: Timestamp,
    /// The build this one retries (`custody builds retry`).
    pub retry_of: Option<&'a BuildId>,
}

/// One stored log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    pub step: u32,
    /// 0 stdout, 1 stderr.
    pub stream: i32,
    pub line: Vec<u8>,
    /// When the runner read it.
    pub time: Timestamp,
}

/// One stored output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    pub reference: String,
    pub digest: Digest,
    pub size: u64,
}

/// Where a step is: `Pending` until the runner starts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepState {
    Pending,
    Running,
    Succeeded,
    Failed,
    TimedOut,
}

impl StepState {
    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Pending => "pending",
            StepState::Running => "running",
            StepState::Succeeded => "succeeded",
            StepState::Failed => "failed",
            StepState::TimedOut => "timed_out",
        }
    }
}

impl FromStr for StepState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "pending" => StepState::Pending,
            "running" => StepState::Running,
            "succeeded" => StepState::Succeeded,
            "failed" => StepState::Failed,
            "timed_out" => StepState::TimedOut,
            other => return Err(format!("unknown step state `{other}`")),
        })
    }
}

/// One step of a build, as planned and then as the runner reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepRecord {
    pub name: String,
    /// The step image's manifest digest; `None` on the host root.
    pub image: Option<Digest>,
    pub state: StepState,
    /// Its exit code once it exited (-1: a signal killed it).
    pub exit_code: Option<i32>,
    /// From when the daemon heard it start to when it heard it end.
    pub duration_ms: Option<u64>,
}

/// How a step ended, as the runner reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepEnding {
    Exited(i32),
    TimedOut,
}

/// How a build ended.
pub struct Ending<'a> {
    pub state: State,
    pub finished_at: Timestamp,
    pub error: Option<&'a str>,
    pub outputs: &'a [Output],
    /// Only for a build whose pushes and checks all passed.
    pub provenance: Option<&'a [u8]>,
}

/// A build as stored.
#[derive(Clone, Debug)]
pub struct BuildRecord {
    pub id: BuildId,
    pub state: State,
    pub spec_path: String,
    pub source: BuildSource,
    pub created_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    pub error: Option<String>,
    pub has_provenance: bool,
    /// The daemon that holds (or last held) it.
    pub owner: Option<String>,
    /// How many times a daemon claimed it.
    pub claims: i64,
    /// Set while a cancel waits for the owner to act on it.
    pub cancel_reason: Option<String>,
    /// The commit its source resolved to, once it planned.
    pub commit: Option<String>,
    /// The build this one retries.
    pub retry_of: Option<BuildId>,
}

/// A build with what it pushed and its steps.
#[derive(Clone, Debug)]
pub struct BuildDetail {
    pub record: BuildRecord,
    /// In the order the spec declares them; only a succeeded build has any.
    pub outputs: Vec<Output>,
    /// In spec order; none before the build planned.
    pub steps: Vec<StepRecord>,
}

/// What a retry starts from: the build's request as it was recorded.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub spec_path: String,
    /// `None`: read it from the source.
    pub spec: Option<Vec<u8>>,
    pub source: BuildSource,
    pub commit: Option<String>,
}

/// A queued build one daemon now holds.
#[derive(Clone, Debug)]
pub struct Claimed {
    pub id: BuildId,
    pub spec_path: String,
    /// `None`: read it from the source.
    pub spec: Option<Vec<u8>>,
    pub source: BuildSource,
    /// The build it retries.
    pub retry_of: Option<BuildId>,
}

/// What the owner of a running build learns when it renews its lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Renewal {
    /// Still ours; carry on.
    Held,
    /// Still ours, and someone asked for it to stop.
    CancelRequested(String),
    /// No longer ours (it ended, or another daemon gave up on us).
    Lost,
}

/// What cancelling a build did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelOutcome {
    /// It was queued and is now cancelled.
    Cancelled,
    /// It is running; its owner will stop it.
    Requested,
    /// It had already ended.
    AlreadyEnded(State),
    NotFound,
}

/// A build whose owner stopped renewing its lease, and what became of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reaped {
    pub id: BuildId,
    pub owner: String,
    /// `true`: its runner never started, so it went back to the queue.
    pub requeued: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

const RECORD_COLUMNS: &str = "builds.id, state, spec_path, source, created_at, started_at, \
     finished_at, error, CASE WHEN provenance IS NULL THEN 0 ELSE 1 END AS has_provenance, owner, \
     claims, cancel_reason, source_commit, retry_of";

impl Store {
    /// Opens the store a URL names: `postgres://…` (or `postgresql://…`),
    /// `sqlite://PATH`, or a plain file path for SQLite. Migrations are
    /// applied before it returns.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Self::open_postgres(url).await
        } else if let Some(path) = url.strip_prefix("sqlite://") {
            Self::open_sqlite(Path::new(path)).await
        } else if url.contains("://") {
            Err(StoreError::Url(url.to_owned()))
        } else {
            Self::open_sqlite(Path::new(url)).await
        }
    }

    /// Opens (creating if needed) the SQLite store at `path`.
    pub async fn open_sqlite(path: &Path) -> Result<Self, StoreError> {
        let location = path.display().to_string();
        let url = format!("sqlite://{location}?mode=rwc");
        let pool = connect(
            AnyPoolOptions::new()
                .max_connections(8)
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        // WAL lets readers go on while a build writes; the
                        // busy timeout queues writers instead of failing them.
                        conn.execute(
                            "PRAGMA journal_mode = WAL; PRAGMA foreign_keys = ON; \
                             PRAGMA busy_timeout = 10000; PRAGMA synchronous = NORMAL;",
                        )
                        .await?;
                        Ok(())
                    })
                }),
            &url,
            &location,
        )
        .await?;
        migrate(&pool, SQLITE_MIGRATIONS, location).await?;
        Ok(Self {
            pool,
            backend: Backend::Sqlite,
        })
    }

    async fn open_postgres(url: &str) -> Result<Self, StoreError> {
        let location = redact_url(url);
        let pool = connect(
            AnyPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(10)),
            url,
            &location,
        )
        .await?;
        migrate(&pool, POSTGRES_MIGRATIONS, location).await?;
        Ok(Self {
            pool,
            backend: Backend::Postgres,
        })
    }

    pub fn is_postgres(&self) -> bool {
        self.backend == Backend::Postgres
    }

    /// Records a build waiting in the queue.
    pub async fn enqueue(&self, build: &NewBuild<'_>) -> Result<(), StoreError> {
        self.insert(build, "queued", None).await
    }

    /// Records a build that starts at once, outside the queue (`custody
    /// build`): no daemon will claim it.
    pub async fn insert_running(
        &self,
        build: &NewBuild<'_>,
        started_at: Timestamp,
    ) -> Result<(), StoreError> {
        self.insert(build, "running", Some(started_at)).await
    }

    async fn insert(
        &self,
        build: &NewBuild<'_>,
        state: &str,
        started_at: Option<Timestamp>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO builds (id, state, spec_path, spec, source, created_at, started_at,
                                 spec_in_source, retry_of)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(build.id.as_str())
        .bind(state)
        .bind(build.spec_path)
        .bind(build.spec.unwrap_or_default())
        .bind(build.source.to_json().to_string())
        .bind(build.created_at.rfc3339())
        .bind(started_at.map(Timestamp::rfc3339))
        .bind(i64::from(build.spec.is_none()))
        .bind(build.retry_of.map(BuildId::as_str))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Takes the oldest queued build for `owner`, with a lease until
    /// `lease_until`. Exactly one daemon gets each build: on
    /// PostgreSQL concurrent claimers skip rows another holds
    /// (`FOR UPDATE SKIP LOCKED`); SQLite runs one writer at a time.
    pub async fn claim(
        &self,
        owner: &str,
        lease_until: Timestamp,
        started_at: Timestamp,
    ) -> Result<Option<Claimed>, StoreError> {
        let lock = match self.backend {
            Backend::Postgres => "FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let row = sqlx::query(AssertSqlSafe(format!(
            "UPDATE builds
             SET state = 'running', owner = $1, lease_until = $2, started_at = $3,
                 claims = claims + 1, runner_started = 0
             WHERE id = (SELECT id FROM builds WHERE state = 'queued' ORDER BY id LIMIT 1 {lock})
               AND state = 'queued'
             RETURNING id, spec_path, spec, spec_in_source, source, retry_of"
        )))
        .bind(owner)
        .bind(lease_until.unix_millis())
        .bind(started_at.rfc3339())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok(Claimed {
                id: BuildId::stored(row.get("id")),
                spec_path: row.get("spec_path"),
                spec: (row.get::<i64, _>("spec_in_source") == 0).then(|| row.get("spec")),
                source: BuildSource::from_json(row.get("source")).map_err(corrupt("source"))?,
                retry_of: row
                    .get::<Option<String>, _>("retry_of")
                    .map(BuildId::stored),
            })
        })
        .transpose()
    }

    /// Extends `owner`'s lease on a running build and says whether it should
    /// go on.
    pub async fn renew(
        &self,
        id: &BuildId,
        owner: &str,
        lease_until: Timestamp,
    ) -> Result<Renewal, StoreError> {
        let row = sqlx::query(
            "UPDATE builds SET lease_until = $1
             WHERE id = $2 AND owner = $3 AND state = 'running'
             RETURNING cancel_reason",
        )
        .bind(lease_until.unix_millis())
        .bind(id.as_str())
        .bind(owner)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            None => Renewal::Lost,
            Some(row) => match row.get::<Option<String>, _>(0) {
                Some(reason) => Renewal::CancelRequested(reason),
                None => Renewal::Held,
            },
        })
    }

    /// Notes that a runner may be running for this build from now on, so
    /// it must never be handed to another daemon.
    pub async fn mark_runner_started(&self, id: &BuildId) -> Result<(), StoreError> {
        sqlx::query("UPDATE builds SET runner_started = 1 WHERE id = $1")
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Ends every running build whose lease ran out before `now`:
    /// one whose runner never started goes back to the queue, the others
    /// fail with a reason that names the owner.
    pub async fn reap(&self, now: Timestamp) -> Result<Vec<Reaped>, StoreError> {
        let expired = sqlx::query(
            "SELECT id, owner, runner_started, lease_until FROM builds
             WHERE state = 'running' AND lease_until IS NOT NULL AND lease_until < $1",
        )
        .bind(now.unix_millis())
        .fetch_all(&self.pool)
        .await?;
        let mut reaped = Vec::new();
        for row in expired {
            let id: String = row.get("id");
            let owner: String = row.get::<Option<String>, _>("owner").unwrap_or_default();
            let requeued = row.get::<i64, _>("runner_started") == 0;
            let lease_until: i64 = row.get("lease_until");
            // The same condition again: if the owner renewed or another
            // daemon got here first, this changes nothing.
            let done = if requeued {
                sqlx::query(
                    "UPDATE builds SET state = 'queued', owner = NULL, lease_until = NULL,
                         started_at = NULL
                     WHERE id = $1 AND state = 'running' AND lease_until = $2",
                )
                .bind(&id)
                .bind(lease_until)
                .execute(&self.pool)
                .await?
            } else {
                let reason = format!(
                    "the daemon `{owner}` running this build stopped renewing its lease \
                     (it crashed or lost the database); the build's runner may have been \
                     cut off, so it was failed rather than run twice"
                );
                sqlx::query(
                    "UPDATE builds SET state = 'failed', error = $1, finished_at = $2
                     WHERE id = $3 AND state = 'running' AND lease_until = $4",
                )
                .bind(&reason)
                .bind(now.rfc3339())
                .bind(&id)
                .bind(lease_until)
                .execute(&self.pool)
                .await?
            };
            if done.rows_affected() == 1 {
                reaped.push(Reaped {
                    id: BuildId::stored(id),
                    owner,
                    requeued,
                });
            }
        }
        Ok(reaped)
    }

    /// Cancels a queued build at once, or asks the owner of a running one
    /// to stop it.
    pub async fn cancel(
        &self,
        id: &BuildId,
        reason: &str,
        now: Timestamp,
    ) -> Result<CancelOutcome, StoreError> {
        let queued = sqlx::query(
            "UPDATE builds SET state = 'cancelled', error = $1, finished_at = $2
             WHERE id = $3 AND state = 'queued'",
        )
        .bind(reason)
        .bind(now.rfc3339())
        .bind(id.as_str())
        .execute(&self.pool)
        .await?;
        if queued.rows_affected() == 1 {
            return Ok(CancelOutcome::Cancelled);
        }
        let running =
            sqlx::query("UPDATE builds SET cancel_reason = $1 WHERE id = $2 AND state = 'running'")
                .bind(reason)
                .bind(id.as_str())
                .execute(&self.pool)
                .await?;
        if running.rows_affected() == 1 {
            return Ok(CancelOutcome::Requested);
        }
        Ok(match self.build(id).await? {
            Some(record) => CancelOutcome::AlreadyEnded(record.state),
            None => CancelOutcome::NotFound,
        })
    }

    /// Appends log lines after those already stored, in order, in one
    /// transaction.
    pub async fn append_logs(&self, id: &BuildId, lines: &[LogLine]) -> Result<(), StoreError> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        let next: i64 =
            sqlx::query("SELECT COALESCE(MAX(seq) + 1, 0) FROM log_lines WHERE build_id = $1")
                .bind(id.as_str())
                .fetch_one(&mut *tx)
                .await?
                .get(0);
        // Multi-row inserts, as many rows as stay under SQLite's limit of
        // parameters per statement.
        const ROWS: usize = 100;
        for (chunk_index, chunk) in lines.chunks(ROWS).enumerate() {
            let mut sql = String::from(
                "INSERT INTO log_lines (build_id, seq, step, stream, line, unix_millis) VALUES ",
            );
            for row in 0..chunk.len() {
                let p = row * 6;
                if row > 0 {
                    sql.push(',');
                }
                sql.push_str(&format!(
                    "(${}, ${}, ${}, ${}, ${}, ${})",
                    p + 1,
                    p + 2,
                    p + 3,
                    p + 4,
                    p + 5,
                    p + 6
                ));
            }
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for (offset, line) in chunk.iter().enumerate() {
                query = query
                    .bind(id.as_str())
                    .bind(next + (chunk_index * ROWS + offset) as i64)
                    .bind(i64::from(line.step))
                    .bind(i64::from(line.stream))
                    .bind(&line.line)
                    .bind(line.time.unix_millis());
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Records how a build ended, with its outputs and (if published) its
    /// provenance, at once. Only a build still running (and, when `owner`
    /// is given, still held by it) changes: returns `false` when it had
    /// already been ended elsewhere.
    pub async fn finish(
        &self,
        id: &BuildId,
        owner: Option<&str>,
        ending: &Ending<'_>,
    ) -> Result<bool, StoreError> {
        let update = sqlx::query(
            "UPDATE builds
             SET state = $1, finished_at = $2, error = $3, provenance = $4, lease_until = NULL
             WHERE id = $5 AND state = 'running' AND ($6 IS NULL OR owner = $6)",
        )
        .bind(ending.state.as_str())
        .bind(ending.finished_at.rfc3339())
        .bind(ending.error)
        .bind(ending.provenance)
        .bind(id.as_str())
        .bind(owner);
        if ending.outputs.is_empty() {
            // One statement is atomic on its own: no transaction round trips.
            return Ok(update.execute(&self.pool).await?.rows_affected() == 1);
        }
        let mut tx = self.pool.begin().await?;
        if update.execute(&mut *tx).await?.rows_affected() == 0 {
            return Ok(false);
        }
        for (position, output) in ending.outputs.iter().enumerate() {
            sqlx::query(
                "INSERT INTO build_outputs (build_id, position, reference, digest, size)
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(id.as_str())
            .bind(position as i64)
            .bind(&output.reference)
            .bind(output.digest.to_string())
            .bind(output.size as i64)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    pub async fn build(&self, id: &BuildId) -> Result<Option<BuildRecord>, StoreError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {RECORD_COLUMNS} FROM builds WHERE id = $1"
        )))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| record(&row)).transpose()
    }

    /// The ids that begin with `prefix`, at most `limit` of them, oldest
    /// first. The prefix holds only hex digits and hyphens, so nothing in
    /// it means anything to `LIKE`.
    pub async fn ids_starting(
        &self,
        prefix: &BuildIdPrefix,
        limit: i64,
    ) -> Result<Vec<BuildId>, StoreError> {
        let rows = sqlx::query("SELECT id FROM builds WHERE id LIKE $1 ORDER BY id LIMIT $2")
            .bind(format!("{prefix}%"))
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|row| BuildId::stored(row.get("id")))
            .collect())
    }

    /// A build with its outputs and steps.
    pub async fn build_detail(&self, id: &BuildId) -> Result<Option<BuildDetail>, StoreError> {
        let Some(record) = self.build(id).await? else {
            return Ok(None);
        };
        Ok(self.details(vec![record]).await?.pop())
    }

    /// `records` with their outputs and steps: one query for all their
    /// outputs and one for all their steps, however many there are.
    pub async fn details(&self, records: Vec<BuildRecord>) -> Result<Vec<BuildDetail>, StoreError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let placeholders = (1..=records.len())
            .map(|n| format!("${n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let bind_ids = |sql: String| {
            records
                .iter()
                .fold(sqlx::query(AssertSqlSafe(sql)), |q, r| {
                    q.bind(r.id.as_str().to_owned())
                })
        };
        let output_rows = bind_ids(format!(
            "SELECT build_id, reference, digest, size FROM build_outputs
             WHERE build_id IN ({placeholders}) ORDER BY build_id, position"
        ))
        .fetch_all(&self.pool)
        .await?;
        let step_rows = bind_ids(format!(
            "SELECT build_id, name, image, state, exit_code, duration_ms FROM build_steps
             WHERE build_id IN ({placeholders}) ORDER BY build_id, position"
        ))
        .fetch_all(&self.pool)
        .await?;
        let mut outputs: std::collections::HashMap<String, Vec<Output>> = Default::default();
        for row in &output_rows {
            outputs
                .entry(row.get("build_id"))
                .or_default()
                .push(output(row)?);
        }
        let mut steps: std::collections::HashMap<String, Vec<StepRecord>> = Default::default();
        for row in &step_rows {
            steps
                .entry(row.get("build_id"))
                .or_default()
                .push(step(row)?);
        }
        Ok(records
            .into_iter()
            .map(|record| BuildDetail {
                outputs: outputs.remove(record.id.as_str()).unwrap_or_default(),
                steps: steps.remove(record.id.as_str()).unwrap_or_default(),
                record,
            })
            .collect())
    }

    /// The request build `id` was recorded with, and the commit it
    /// resolved (for a retry).
    pub async fn recorded(&self, id: &BuildId) -> Result<Option<Recorded>, StoreError> {
        let row = sqlx::query(
            "SELECT spec_path, spec, spec_in_source, source, source_commit FROM builds
             WHERE id = $1",
        )
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok(Recorded {
                spec_path: row.get("spec_path"),
                spec: (row.get::<i64, _>("spec_in_source") == 0).then(|| row.get("spec")),
                source: BuildSource::from_json(row.get("source")).map_err(corrupt("source"))?,
                commit: row.get("source_commit"),
            })
        })
        .transpose()
    }

    /// Records the commit build `id`'s source resolved to.
    pub async fn record_commit(&self, id: &BuildId, commit: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE builds SET source_commit = $1 WHERE id = $2")
            .bind(commit)
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records the steps build `id` planned, each pending with its image's
    /// digest, in place of any an earlier plan of it recorded (a build
    /// requeued before its runner started plans again).
    pub async fn record_steps(
        &self,
        id: &BuildId,
        steps: &[(String, Option<Digest>)],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM build_steps WHERE build_id = $1")
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
        for (position, (name, image)) in steps.iter().enumerate() {
            sqlx::query(
                "INSERT INTO build_steps (build_id, position, name, image, state)
                 VALUES ($1, $2, $3, $4, 'pending')",
            )
            .bind(id.as_str())
            .bind(position as i64)
            .bind(name)
            .bind(image.as_ref().map(ToString::to_string))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Records that step `index` of build `id` started at `at`. The image
    /// digest planned (the one the provenance claims) stands; the runner's
    /// `image` fills in only where none was planned.
    pub async fn step_started(
        &self,
        id: &BuildId,
        index: u32,
        name: &str,
        image: Option<&Digest>,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO build_steps (build_id, position, name, image, state, started_ms)
             VALUES ($1, $2, $3, $4, 'running', $5)
             ON CONFLICT (build_id, position) DO UPDATE
             SET state = 'running', started_ms = excluded.started_ms,
                 image = COALESCE(build_steps.image, excluded.image)",
        )
        .bind(id.as_str())
        .bind(i64::from(index))
        .bind(name)
        .bind(image.map(ToString::to_string))
        .bind(at.unix_millis())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records how step `index` of build `id` ended, at `at`.
    pub async fn step_finished(
        &self,
        id: &BuildId,
        index: u32,
        ending: StepEnding,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        let (state, exit_code) = match ending {
            StepEnding::Exited(0) => (StepState::Succeeded, Some(0)),
            StepEnding::Exited(code) => (StepState::Failed, Some(code)),
            StepEnding::TimedOut => (StepState::TimedOut, None),
        };
        sqlx::query(
            "UPDATE build_steps
             SET state = $1, exit_code = $2,
                 duration_ms = CASE WHEN started_ms IS NULL THEN NULL
                                    WHEN started_ms > $3 THEN 0
                                    ELSE $3 - started_ms END
             WHERE build_id = $4 AND position = $5",
        )
        .bind(state.as_str())
        .bind(exit_code.map(i64::from))
        .bind(at.unix_millis())
        .bind(id.as_str())
        .bind(i64::from(index))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Builds newest first: at most `limit`, only those older than
    /// `before` (an id from the previous page) and in `state` when given.
    pub async fn list(
        &self,
        state: Option<State>,
        before: Option<&BuildId>,
        limit: i64,
    ) -> Result<Vec<BuildRecord>, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {RECORD_COLUMNS} FROM builds
             WHERE ($1 IS NULL OR state = $1) AND ($2 IS NULL OR id < $2)
             ORDER BY id DESC LIMIT $3"
        )))
        .bind(state.map(State::as_str))
        .bind(before.map(BuildId::as_str))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(record).collect()
    }

    /// What a build pushed, in the order the spec declares it.
    pub async fn outputs(&self, id: &BuildId) -> Result<Vec<Output>, StoreError> {
        let rows = sqlx::query(
            "SELECT reference, digest, size FROM build_outputs WHERE build_id = $1 ORDER BY position",
        )
        .bind(id.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(output).collect()
    }

    /// How many builds are in each state.
    pub async fn count_by_state(&self) -> Result<Vec<(State, i64)>, StoreError> {
        let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM builds GROUP BY state")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| Ok((parse_state(row.get("state"))?, row.get::<i64, _>("n"))))
            .collect()
    }

    /// The build's DSSE envelope, if it published one.
    pub async fn provenance(&self, id: &BuildId) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(
            sqlx::query("SELECT provenance FROM builds WHERE id = $1 AND provenance IS NOT NULL")
                .bind(id.as_str())
                .fetch_optional(&self.pool)
                .await?
                .map(|row| row.get(0)),
        )
    }

    pub async fn logs(&self, id: &BuildId) -> Result<Vec<LogLine>, StoreError> {
        Ok(self
            .logs_after(id, -1, i64::MAX)
            .await?
            .into_iter()
            .map(|(_, line)| line)
            .collect())
    }

    /// The sequence number of the build's last stored log line (`None`
    /// before its first).
    pub async fn last_log_seq(&self, id: &BuildId) -> Result<Option<i64>, StoreError> {
        Ok(
            sqlx::query("SELECT MAX(seq) FROM log_lines WHERE build_id = $1")
                .bind(id.as_str())
                .fetch_one(&self.pool)
                .await?
                .get::<Option<i64>, _>(0),
        )
    }

    /// Up to `limit` log lines after sequence number `after`, with their
    /// sequence numbers, in order.
    pub async fn logs_after(
        &self,
        id: &BuildId,
        after: i64,
        limit: i64,
    ) -> Result<Vec<(i64, LogLine)>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, step, stream, line, unix_millis FROM log_lines
             WHERE build_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(id.as_str())
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| {
                (
                    row.get("seq"),
                    LogLine {
                        step: row.get::<i64, _>("step") as u32,
                        stream: row.get::<i64, _>("stream") as i32,
                        line: row.get("line"),
                        time: Timestamp::from_unix_millis(row.get("unix_millis")),
                    },
                )
            })
            .collect())
    }

    /// How many builds carry a provenance envelope (for audits and tests:
    /// a failed build must never have one).
    pub async fn count_provenance(&self) -> Result<i64, StoreError> {
        Ok(
            sqlx::query("SELECT COUNT(*) FROM builds WHERE provenance IS NOT NULL")
                .fetch_one(&self.pool)
                .await?
                .get(0),
        )
    }

    /// Whether the database answers (for readiness checks).
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").fetch_one(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

async fn connect(
    options: AnyPoolOptions,
    url: &str,
    location: &str,
) -> Result<AnyPool, StoreError> {
    sqlx::any::install_default_drivers();
    options
        .connect(url)
        .await
        .map_err(|source| StoreError::Open {
            location: location.to_owned(),
            source,
        })
}

async fn migrate(
    pool: &AnyPool,
    migrations: Migrations,
    location: String,
) -> Result<(), StoreError> {
    let migrations = migrations
        .iter()
        .map(|&(version, description, sql)| {
            Migration::new(
                version,
                Cow::Borrowed(description),
                MigrationType::Simple,
                sqlx::SqlStr::from_static(sql),
                false,
            )
        })
        .collect();
    Migrator::with_migrations(migrations)
        .run(pool)
        .await
        .map_err(|source| StoreError::Migrate { location, source })
}

fn record(row: &AnyRow) -> Result<BuildRecord, StoreError> {
    let time = |column: &'static str| -> Result<Option<Timestamp>, StoreError> {
        row.get::<Option<String>, _>(column)
            .map(|text| Timestamp::parse_rfc3339(&text).map_err(|e| corrupt(column)(e.to_string())))
            .transpose()
    };
    Ok(BuildRecord {
        id: BuildId::stored(row.get("id")),
        state: parse_state(row.get("state"))?,
        spec_path: row.get("spec_path"),
        source: BuildSource::from_json(row.get("source")).map_err(corrupt("source"))?,
        created_at: time("created_at")?.ok_or_else(|| corrupt("created_at")("empty".into()))?,
        started_at: time("started_at")?,
        finished_at: time("finished_at")?,
        error: row.get("error"),
        has_provenance: row.get::<i64, _>("has_provenance") != 0,
        owner: row.get("owner"),
        claims: row.get("claims"),
        cancel_reason: row.get("cancel_reason"),
        commit: row.get("source_commit"),
        retry_of: row
            .get::<Option<String>, _>("retry_of")
            .map(BuildId::stored),
    })
}

fn output(row: &AnyRow) -> Result<Output, StoreError> {
    let digest: String = row.get("digest");
    Ok(Output {
        reference: row.get("reference"),
        digest: digest
            .parse()
            .map_err(|e: custody_oci::oci_spec::OciSpecError| {
                corrupt("output digest")(e.to_string())
            })?,
        size: row.get::<i64, _>("size") as u64,
    })
}

fn step(row: &AnyRow) -> Result<StepRecord, StoreError> {
    Ok(StepRecord {
        name: row.get("name"),
        image: row
            .get::<Option<String>, _>("image")
            .map(|digest| {
                digest
                    .parse()
                    .map_err(|e: custody_oci::oci_spec::OciSpecError| {
                        corrupt("step image")(e.to_string())
                    })
            })
            .transpose()?,
        state: row
            .get::<String, _>("state")
            .parse()
            .map_err(corrupt("step state"))?,
        exit_code: row.get::<Option<i64>, _>("exit_code").map(|c| c as i32),
        duration_ms: row
            .get::<Option<i64>, _>("duration_ms")
            .map(|d| d.max(0) as u64),
    })
}

fn parse_state(state: String) -> Result<State, StoreError> {
    state
        .parse()
        .map_err(|e: String| StoreError::Query(sqlx::Error::Decode(e.into())))
}

/// The URL without its password, for messages.
fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}
