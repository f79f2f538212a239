//! The job store: builds, what they pushed, their logs and provenance.
//!
//! SQLite in the data directory is the embedded default. Migrations are
//! compiled in and applied when the store opens; queries are checked at run
//! time (no `sqlx` macros, so building needs no database).

use std::borrow::Cow;
use std::path::Path;
use std::str::FromStr;

use sqlx::Row;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

const SQLITE_MIGRATIONS: &[(i64, &str, &str)] = &[(
    1,
    "builds",
    include_str!("../migrations/sqlite/0001_builds.sql"),
)];

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
    #[error("the job store failed: {0}")]
    Query(#[from] sqlx::Error),
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
    pub id: &'a str,
    pub spec_path: &'a str,
    pub spec: &'a [u8],
    /// JSON, as in the provenance's `externalParameters.source`.
    pub source: &'a str,
    pub created_at: &'a str,
}

/// One stored log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    pub step: u32,
    /// 0 stdout, 1 stderr.
    pub stream: i32,
    pub line: Vec<u8>,
    pub unix_millis: i64,
}

/// One stored output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    pub reference: String,
    pub digest: String,
    pub size: u64,
}

/// How a build ended.
pub struct Ending<'a> {
    pub state: State,
    pub finished_at: &'a str,
    pub error: Option<&'a str>,
    pub outputs: &'a [Output],
    /// Only for a build whose pushes and checks all passed.
    pub provenance: Option<&'a [u8]>,
}

/// A build as stored.
#[derive(Clone, Debug)]
pub struct BuildRecord {
    pub id: String,
    pub state: State,
    pub spec_path: String,
    pub source: String,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub error: Option<String>,
    pub has_provenance: bool,
}

#[derive(Clone, Debug)]
pub struct Store {
    pool: SqlitePool,
}

impl Store {
    /// Opens (creating if needed) the SQLite store at `path` and applies
    /// migrations.
    pub async fn open_sqlite(path: &Path) -> Result<Self, StoreError> {
        let location = path.display().to_string();
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Open {
                location: location.clone(),
                source,
            })?;
        let migrations = SQLITE_MIGRATIONS
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
            .run(&pool)
            .await
            .map_err(|source| StoreError::Migrate { location, source })?;
        Ok(Self { pool })
    }

    pub async fn insert_build(&self, build: &NewBuild<'_>) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO builds (id, state, spec_path, spec, source, created_at)
             VALUES (?, 'queued', ?, ?, ?, ?)",
        )
        .bind(build.id)
        .bind(build.spec_path)
        .bind(build.spec)
        .bind(build.source)
        .bind(build.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn mark_running(&self, id: &str, started_at: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE builds SET state = 'running', started_at = ? WHERE id = ?")
            .bind(started_at)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Appends log lines after those already stored, in order, in one
    /// transaction.
    pub async fn append_logs(&self, id: &str, lines: &[LogLine]) -> Result<(), StoreError> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        let next: i64 =
            sqlx::query("SELECT COALESCE(MAX(seq) + 1, 0) FROM log_lines WHERE build_id = ?")
                .bind(id)
                .fetch_one(&mut *tx)
                .await?
                .get(0);
        for (offset, line) in lines.iter().enumerate() {
            sqlx::query(
                "INSERT INTO log_lines (build_id, seq, step, stream, line, unix_millis)
                 VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(id)
            .bind(next + offset as i64)
            .bind(i64::from(line.step))
            .bind(line.stream)
            .bind(&line.line)
            .bind(line.unix_millis)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Records how a build ended, with its outputs and (if published) its
    /// provenance, at once.
    pub async fn finish(&self, id: &str, ending: &Ending<'_>) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE builds SET state = ?, finished_at = ?, error = ?, provenance = ? WHERE id = ?",
        )
        .bind(ending.state.as_str())
        .bind(ending.finished_at)
        .bind(ending.error)
        .bind(ending.provenance)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        for (position, output) in ending.outputs.iter().enumerate() {
            sqlx::query(
                "INSERT INTO build_outputs (build_id, position, reference, digest, size)
                 VALUES (?, ?, ?, ?, ?)",
            )
            .bind(id)
            .bind(position as i64)
            .bind(&output.reference)
            .bind(&output.digest)
            .bind(output.size as i64)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn build(&self, id: &str) -> Result<Option<BuildRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT id, state, spec_path, source, created_at, started_at, finished_at, error,
                    provenance IS NOT NULL AS has_provenance
             FROM builds WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let state: String = row.get("state");
        Ok(Some(BuildRecord {
            id: row.get("id"),
            state: state
                .parse()
                .map_err(|e: String| sqlx::Error::Decode(e.into()))?,
            spec_path: row.get("spec_path"),
            source: row.get("source"),
            created_at: row.get("created_at"),
            started_at: row.get("started_at"),
            finished_at: row.get("finished_at"),
            error: row.get("error"),
            has_provenance: row.get("has_provenance"),
        }))
    }

    /// The build's DSSE envelope, if it published one.
    pub async fn provenance(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(
            sqlx::query("SELECT provenance FROM builds WHERE id = ? AND provenance IS NOT NULL")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?
                .map(|row| row.get(0)),
        )
    }

    pub async fn logs(&self, id: &str) -> Result<Vec<LogLine>, StoreError> {
        let rows = sqlx::query(
            "SELECT step, stream, line, unix_millis FROM log_lines WHERE build_id = ? ORDER BY seq",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| LogLine {
                step: row.get::<i64, _>("step") as u32,
                stream: row.get("stream"),
                line: row.get("line"),
                unix_millis: row.get("unix_millis"),
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

    pub async fn close(&self) {
        self.pool.close().await;
    }
}
