//! One `custody serve` process as users run it: a configuration file, a
//! free port, `CUSTODY_TOKEN`, its log in a file; stopped when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use custody_server::client::Client;
use custody_testkit::free_port;

use super::CUSTODY;

pub const TOKEN: &str = "test-token-5f2b";

/// One `custody serve` process.
pub struct Daemon {
    child: Option<Child>,
    pub port: u16,
    pub log: PathBuf,
}

pub struct DaemonOptions<'a> {
    pub name: &'a str,
    pub data_dir: &'a Path,
    pub database_url: Option<&'a str>,
    pub concurrency: u32,
    pub lease_seconds: u64,
    pub grace_seconds: u64,
    pub extra: Vec<String>,
    /// The configuration file's text (by default: local `file:` sources
    /// allowed, as the tests' repositories are), and where to write it
    /// (default: beside the daemon's log).
    pub config: String,
    pub config_path: Option<PathBuf>,
    /// The daemon's open-file limit (`ulimit -n`), when given.
    pub open_files: Option<u32>,
    /// More environment for the daemon (`SOFTHSM2_CONF` for a token).
    pub env: Vec<(String, std::ffi::OsString)>,
}

impl<'a> DaemonOptions<'a> {
    pub fn new(name: &'a str, data_dir: &'a Path) -> Self {
        Self {
            name,
            data_dir,
            database_url: None,
            concurrency: 2,
            lease_seconds: 30,
            grace_seconds: 30,
            extra: Vec::new(),
            config: "[sources]\nschemes = [\"file\"]\n".to_owned(),
            config_path: None,
            open_files: None,
            env: Vec::new(),
        }
    }
}

impl Daemon {
    pub fn start(options: DaemonOptions<'_>) -> Self {
        let port = free_port();
        let log = options.data_dir.join(format!("{}.log", options.name));
        fs_err::create_dir_all(options.data_dir).unwrap();
        let config = options
            .config_path
            .clone()
            .unwrap_or_else(|| options.data_dir.join(format!("{}.toml", options.name)));
        fs_err::write(&config, &options.config).unwrap();
        // Through `sh` only to lower the open-file limit: it `exec`s, so
        // the pid is the daemon's.
        let limit = options
            .open_files
            .map_or(String::new(), |n| format!("ulimit -n {n} && "));
        let mut command = Command::new("sh");
        command
            .args(["-c", &format!("{limit}exec \"$0\" \"$@\""), CUSTODY])
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--data-dir", &options.data_dir.display().to_string()])
            .args(["--daemon-name", options.name])
            .args(["--concurrency", &options.concurrency.to_string()])
            .args(["--lease-seconds", &options.lease_seconds.to_string()])
            .args(["--grace-seconds", &options.grace_seconds.to_string()])
            .args(["--poll-millis", "100"])
            .args(["--config", &config.display().to_string()])
            .args(&options.extra)
            .env("CUSTODY_TOKEN", TOKEN)
            .env("CUSTODY_LOG", "info")
            .envs(options.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(fs_err::File::create(&log).unwrap().into_parts().0);
        if let Some(url) = options.database_url {
            command.args(["--database-url", url]);
        }
        let child = command.spawn().expect("custody serve starts");
        let mut daemon = Self {
            child: Some(child),
            port,
            log,
        };
        daemon.wait_ready();
        daemon
    }

    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::{Read, Write};
                let _ = stream.write_all(b"GET /readyz HTTP/1.0\r\n\r\n");
                let mut answer = String::new();
                let _ = stream.read_to_string(&mut answer);
                if answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200") {
                    return;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("custody serve exited ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "not ready in 30 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn client(&self) -> Client {
        Client::new(&self.url(), Some(TOKEN.to_owned())).unwrap()
    }

    pub fn log(&self) -> String {
        fs_err::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM, then waits for it to exit; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut child = self.child.take().unwrap();
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        child.wait().unwrap().code()
    }

    /// The `custody` CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(CUSTODY)
            .args(args)
            .env("CUSTODY_SERVER", self.url())
            .env("CUSTODY_TOKEN", TOKEN)
            .output()
            .unwrap()
    }
}

impl Daemon {
    /// Runs the CLI with stdout a pipe nobody reads any more (and stderr
    /// too, if `close_stderr`); its exit code and what it said on stderr.
    pub fn cli_to_closed_pipes(&self, args: &[&str], close_stderr: bool) -> (Option<i32>, String) {
        let mut child = Command::new(CUSTODY)
            .args(args)
            .env("CUSTODY_SERVER", self.url())
            .env("CUSTODY_TOKEN", TOKEN)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let mut stderr = String::new();
        match child.stderr.take() {
            Some(pipe) if close_stderr => drop(pipe),
            Some(mut pipe) => {
                std::io::Read::read_to_string(&mut pipe, &mut stderr).unwrap();
            }
            None => {}
        }
        (child.wait().unwrap().code(), stderr)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
