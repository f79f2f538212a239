//! A throwaway PostgreSQL cluster for a test: `initdb` in a temp dir, a
//! server on its own port, stopped and deleted when dropped. Tests take
//! fresh databases from one cluster with `create_database`, which is much
//! cheaper than a cluster each.
//!
//! PostgreSQL refuses to run as root, so when the tests do (CI, the Slurm
//! tests) the server tools run as `nobody` through `runuser`.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// How long `pg_ctl` may take to start the server.
const START_TIMEOUT_SECS: &str = "30";

/// Settings that trade crash safety for speed: a test's cluster never has
/// to survive a crash.
const FAST_SETTINGS: &str = "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n";

/// A running cluster with the superuser `postgres` (trust auth, TCP on
/// 127.0.0.1 only); stopped and removed on drop.
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    as_nobody: bool,
}

impl Postgres {
    /// Starts a cluster with fsync and synchronous commit off, for tests.
    /// Panics, with the server log, when it cannot.
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// Starts a cluster with PostgreSQL's default durability (fsync,
    /// synchronous commit, full-page writes), for benchmarks whose numbers
    /// must mean what they would in production.
    pub fn start_durable() -> Self {
        Self::start_with(true)
    }

    fn start_with(durable: bool) -> Self {
        let bin = bin_dir();
        let as_nobody = is_root();
        let dir = temp_dir(as_nobody);
        // `nobody` must reach the directory and own everything in it.
        fs_err::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        if as_nobody {
            run(Command::new("chown")
                .arg("-R")
                .arg("nobody")
                .arg(dir.path()));
        }
        let mut postgres = Postgres {
            dir,
            bin,
            port: 0,
            as_nobody,
        };

        let data = postgres.data_dir();
        let mut initdb = postgres.server_tool("initdb");
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
            // The caller's locale may not exist here; C always does.
            .arg("--locale=C");
        run(&mut initdb);

        let mut settings = format!(
            "\n# custody-testkit\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nmax_connections = 200\n",
            postgres.dir.path().display()
        );
        if !durable {
            settings.push_str(FAST_SETTINGS);
        }
        let mut conf = fs_err::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        std::io::Write::write_all(&mut conf, settings.as_bytes()).unwrap();

        // free_port can race with another test taking the same port: retry
        // with a new one when the bind is what failed.
        for attempt in 1.. {
            postgres.port = crate::free_port();
            let before = postgres.log().len();
            let output = postgres
                .server_tool("pg_ctl")
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(postgres.log_path())
                .args(["-w", "-t", START_TIMEOUT_SECS])
                .arg("-o")
                .arg(format!("-p {}", postgres.port))
                .arg("start")
                .output()
                .expect("pg_ctl runs");
            if output.status.success() {
                return postgres;
            }
            let log = postgres.log();
            let this_attempt = log.get(before..).unwrap_or(&log);
            if attempt < 5 && this_attempt.contains("Address already in use") {
                continue;
            }
            panic!(
                "pg_ctl start (port {}) failed:\n{}{}\nserver log:\n{log}",
                postgres.port,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
            );
        }
        unreachable!()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`
    pub fn url(&self) -> String {
        self.database_url("postgres")
    }

    /// Creates the database `name` (letters, digits, `_`, `-`) and returns
    /// its URL.
    pub fn create_database(&self, name: &str) -> String {
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
            "database name {name:?}: use letters, digits, _ and - so the URL needs no escaping"
        );
        run(self.client("createdb").arg(name));
        self.database_url(name)
    }

    /// Runs `sql` with `psql -Atc` in `database`, independently of the code
    /// under test; returns its output, trimmed. Panics when psql fails.
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let mut psql = self.client("psql");
        psql.args(["-d", database, "-v", "ON_ERROR_STOP=1", "-Atc", sql]);
        String::from_utf8_lossy(&run(&mut psql).stdout)
            .trim()
            .to_owned()
    }

    /// `pg_dump` of `database` (plain SQL, data included), as bytes.
    pub fn dump(&self, database: &str) -> Vec<u8> {
        run(self.client("pg_dump").arg(database)).stdout
    }

    /// The PostgreSQL client program `tool`, connecting to this cluster as
    /// `postgres`.
    fn client(&self, tool: &str) -> Command {
        let mut command = Command::new(self.bin.join(tool));
        command.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        command.args(["-U", "postgres"]);
        command
    }

    /// The cluster's data directory (inside the temp dir removed on drop).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        fs_err::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn database_url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// A server tool (`initdb`, `pg_ctl`), as `nobody` when we are root.
    /// It runs in the temp dir: `nobody` may not be able to enter ours.
    fn server_tool(&self, name: &str) -> Command {
        let program = self.bin.join(name);
        let mut command = if self.as_nobody {
            let mut command = Command::new("runuser");
            command.args(["-u", "nobody", "--"]).arg(program);
            command
        } else {
            Command::new(program)
        };
        command.current_dir(self.dir.path());
        command
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Immediate: nothing needs to be flushed, the data is deleted next.
        // `-w` waits for the postmaster to exit, so the port is free after.
        let _ = self
            .server_tool("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "-w", "stop"])
            .output();
        // The TempDir removes the directory when it drops, right after.
    }
}

/// The directory with `initdb`, `pg_ctl` and `postgres`: Debian's highest
/// `/usr/lib/postgresql/VERSION/bin`, else what `pg_config --bindir` says.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = fs_err::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return bin;
    }
    let bin = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .filter(|bin| bin.join("initdb").exists());
    bin.expect(
        "PostgreSQL's server binaries (initdb) are in neither /usr/lib/postgresql/*/bin nor \
         `pg_config --bindir`; run scripts/setup",
    )
}

/// Whether the effective uid is 0 (read from /proc: no unsafe geteuid).
fn is_root() -> bool {
    let status = fs_err::read_to_string("/proc/self/status").unwrap_or_default();
    match status.lines().find_map(|l| l.strip_prefix("Uid:")) {
        // Real, effective, saved, filesystem.
        Some(uids) => uids.split_whitespace().nth(1) == Some("0"),
        None => Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0"),
    }
}

/// A temp dir; for `nobody`, one whose every ancestor it can traverse (a
/// root `TMPDIR` under /root would not do), else one in /tmp.
fn temp_dir(for_nobody: bool) -> tempfile::TempDir {
    let mut builder = tempfile::Builder::new();
    builder.prefix("custody-pg-");
    let base = std::env::temp_dir();
    let traversable = |dir: &Path| {
        dir.ancestors()
            .all(|d| fs_err::metadata(d).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
    };
    if for_nobody && !traversable(&base) {
        builder.tempdir_in("/tmp")
    } else {
        builder.tempdir_in(base)
    }
    .expect("a temp dir")
}

/// Runs `command`; panics with its output when it fails.
fn run(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?} could not run: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The stores a service test runs on: SQLite in its data directory, or a
/// database on a throwaway PostgreSQL cluster (stopped when dropped).
pub enum Backend {
    Sqlite,
    Postgres { cluster: Postgres, url: String },
}

impl Backend {
    /// A fresh cluster with a `custody` database.
    pub fn postgres() -> Self {
        let cluster = Postgres::start();
        let url = cluster.create_database("custody");
        Backend::Postgres { cluster, url }
    }

    /// The database URL to pass to the service; `None` for SQLite.
    pub fn url(&self) -> Option<&str> {
        match self {
            Backend::Sqlite => None,
            Backend::Postgres { url, .. } => Some(url),
        }
    }
}

/// Runs each named `async fn NAME(backend: Backend)` twice, as
/// `sqlite::NAME` and `postgres::NAME` tokio tests.
#[macro_export]
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test]
            async fn $name() {
                super::$name($crate::postgres::Backend::Sqlite).await;
            })*
        }
        mod postgres {
            $(#[tokio::test]
            async fn $name() {
                super::$name($crate::postgres::Backend::postgres()).await;
            })*
        }
    };
}
