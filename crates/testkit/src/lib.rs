//! Test support for custody: real registries (Debian's `docker-registry`)
//! in every mode the client must handle, the servers around them (token
//! issuer, redirect target, a proxy that dies), throwaway PostgreSQL
//! clusters, and image fixtures built without the code under test.
//!
//! ```ignore
//! let registry = Registry::builder().tls().basic_auth("alice", "s3cret").start();
//! ```

pub mod certs;
pub mod http;
pub mod image;
pub mod netns;
pub mod postgres;
mod proxy;
mod registry;
pub mod slurm;
pub mod softhsm;
mod token;

use std::path::{Path, PathBuf};

pub use postgres::Postgres;
pub use proxy::FaultProxy;
pub use registry::{RedirectRequest, Registry, RegistryBuilder};
pub use softhsm::SoftHsm;
pub use token::TokenRequest;

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes `dir/docker/config.json` with credentials for `host`; returns the
/// directory to use as `DOCKER_CONFIG`.
pub fn write_docker_config(dir: &Path, host: &str, user: &str, password: &str) -> PathBuf {
    use base64::Engine as _;
    let docker = dir.join("docker");
    fs_err::create_dir_all(&docker).unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let config = serde_json::json!({"auths": {host: {"auth": auth}}});
    fs_err::write(docker.join("config.json"), config.to_string()).unwrap();
    docker
}

/// Runs `git -C dir ARGS` with a fixed identity and `main` as the default
/// branch; panics with git's output when it fails. Returns stdout, trimmed.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let output = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.org",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .output()
        .expect("git runs");
    assert!(
        output.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}
