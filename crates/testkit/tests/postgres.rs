//! The throwaway cluster: databases from one cluster are usable through
//! psql, and nothing is left running or on disk after drop.

use std::net::TcpStream;
use std::process::Command;

use custody_testkit::Postgres;

fn select_one(port: u16, database: &str) -> String {
    let output = Command::new("psql")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args(["-d", database, "-Atc", "select 1"])
        .output()
        .expect("psql runs");
    assert!(
        output.status.success(),
        "psql -d {database}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

#[test]
fn databases_work_and_drop_stops_the_cluster() {
    let postgres = Postgres::start();
    let port = postgres.port();
    assert_eq!(
        postgres.url(),
        format!("postgres://postgres@127.0.0.1:{port}/postgres")
    );
    let a = postgres.create_database("first");
    let b = postgres.create_database("second");
    assert_eq!(a, format!("postgres://postgres@127.0.0.1:{port}/first"));
    assert_eq!(b, format!("postgres://postgres@127.0.0.1:{port}/second"));
    assert_eq!(select_one(port, "first"), "1");
    assert_eq!(select_one(port, "second"), "1");

    // Isolated: a table in one database is not in the other.
    postgres.psql("first", "create table t (x int); insert into t values (7)");
    assert_eq!(postgres.psql("first", "select x from t"), "7");
    assert_eq!(
        postgres.psql(
            "second",
            "select count(*) from pg_tables where tablename = 't'"
        ),
        "0"
    );
    assert_eq!(postgres.psql("postgres", "show fsync"), "off");

    let data = postgres.data_dir();
    assert!(data.exists());
    drop(postgres);
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "something still listens on {port} after drop"
    );
    assert!(!data.exists(), "{} is left behind", data.display());
}

#[test]
fn durable_keeps_fsync_on() {
    let postgres = Postgres::start_durable();
    assert_eq!(postgres.psql("postgres", "show fsync"), "on");
    assert_eq!(postgres.psql("postgres", "show synchronous_commit"), "on");
}
