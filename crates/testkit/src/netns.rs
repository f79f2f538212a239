//! A stand-in for "the internet" and for things on the build host: HTTP
//! servers in a network namespace of the test's own (joined to the host by
//! a veth pair on a private /24), on the host's loopback, on a host
//! address and on the cloud metadata address. Needs root; everything goes
//! when the value is dropped.

use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A network namespace with an HTTP server serving `dir` on port 8000.
pub struct Internet {
    name: String,
    /// The host's end of the veth pair: an address of the build host.
    pub host_addr: Ipv4Addr,
    /// The server's address, inside the namespace.
    pub server_addr: Ipv4Addr,
    pub port: u16,
    servers: Vec<Child>,
    /// What the servers serve.
    pub dir: tempfile::TempDir,
    /// What they do not (TLS keys).
    private: tempfile::TempDir,
    /// The namespace and its addresses are per process: one at a time.
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Internet {
    /// Makes the namespace (a /24 picked from the process id) and starts
    /// its server; `files` are (name, contents) it serves.
    pub fn start(files: &[(&str, &str)]) -> Self {
        // A test that failed while holding it leaves nothing behind (Drop).
        let one_at_a_time = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let id = std::process::id();
        let name = format!("custody-inet-{id}");
        let (b, c) = (100 + (id >> 8) % 100, id % 250);
        let host_addr = Ipv4Addr::new(10, b as u8, c as u8, 1);
        let server_addr = Ipv4Addr::new(10, b as u8, c as u8, 2);
        let (outer, inner) = (format!("ci{}", id % 100_000), format!("cn{}", id % 100_000));
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &outer])
            .stderr(Stdio::null())
            .status();
        for args in [
            vec!["netns", "add", &name],
            vec![
                "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ],
            vec!["link", "set", &inner, "netns", &name],
            vec!["addr", "add", &format!("{host_addr}/24"), "dev", &outer],
            vec!["link", "set", &outer, "up"],
            vec![
                "-n",
                &name,
                "addr",
                "add",
                &format!("{server_addr}/24"),
                "dev",
                &inner,
            ],
            vec!["-n", &name, "link", "set", &inner, "up"],
            vec!["-n", &name, "link", "set", "lo", "up"],
        ] {
            ip(&args);
        }
        let dir = tempfile::tempdir().unwrap();
        for (file, contents) in files {
            fs_err::write(dir.path().join(file), contents).unwrap();
        }
        let mut internet = Self {
            name,
            host_addr,
            server_addr,
            port: 8000,
            servers: Vec::new(),
            dir,
            private: tempfile::tempdir().unwrap(),
            _one_at_a_time: one_at_a_time,
        };
        let server = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", internet.name))
            .args(["python3", "-m", "http.server", "8000", "--bind"])
            .arg(server_addr.to_string())
            .arg("--directory")
            .arg(internet.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        internet.servers.push(server);
        internet.wait_for(&format!("{server_addr}:8000"), true);
        internet
    }

    /// Serves the same files over HTTPS inside the namespace, at
    /// `server_addr:port`, with `server` (a certificate and its key).
    pub fn serve_tls(&mut self, port: u16, server: &crate::certs::Pair) {
        let (cert, key) = (
            self.private.path().join("cert.pem"),
            self.private.path().join("key.pem"),
        );
        fs_err::write(&cert, &server.cert_pem).unwrap();
        fs_err::write(&key, &server.key_pem).unwrap();
        let script = "import functools, http.server, ssl, sys\n\
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n\
            context.load_cert_chain(sys.argv[1], sys.argv[2])\n\
            handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[3])\n\
            server = http.server.ThreadingHTTPServer((sys.argv[4], int(sys.argv[5])), handler)\n\
            server.socket = context.wrap_socket(server.socket, server_side=True)\n\
            server.serve_forever()\n";
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.name))
            .args(["python3", "-c", script])
            .args([&cert, &key, &self.dir.path().to_owned()])
            .arg(self.server_addr.to_string())
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.servers.push(child);
        self.wait_for(&format!("{}:{port}", self.server_addr), true);
    }

    /// Serves `dir`'s files on the build host at `addr:port` too (loopback,
    /// a host address), until dropped.
    pub fn serve_on_host(&mut self, addr: &str, port: u16) {
        let server = Command::new("python3")
            .args([
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                addr,
                "--directory",
            ])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.servers.push(server);
        self.wait_for(&format!("{addr}:{port}"), false);
    }

    /// Puts the cloud metadata address (169.254.169.254) on the host's end
    /// of the pair and serves there on port 80, as a cloud's host would.
    pub fn serve_metadata(&mut self) {
        let outer = format!("ci{}", std::process::id() % 100_000);
        ip(&["addr", "add", "169.254.169.254/32", "dev", &outer]);
        self.serve_on_host("169.254.169.254", 80);
    }

    fn wait_for(&self, addr: &str, inside: bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let up = if inside {
                Command::new("nsenter")
                    .arg(format!("--net=/run/netns/{}", self.name))
                    .args(["python3", "-c"])
                    .arg(format!(
                        "import socket; socket.create_connection(('{}', {}), 1)",
                        self.server_addr,
                        addr.rsplit_once(':').map_or("0", |(_, port)| port)
                    ))
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            } else {
                TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(1)).is_ok()
            };
            if up {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the server on {addr} did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The directory the servers serve.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// A file path under the served directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        for server in &mut self.servers {
            let _ = server.kill();
            let _ = server.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let outer = format!("ci{}", std::process::id() % 100_000);
        let _ = Command::new("ip")
            .args(["link", "del", &outer])
            .stderr(Stdio::null())
            .status();
    }
}

fn ip(args: &[&str]) {
    let output = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        output.status.success(),
        "ip {args:?} failed (it needs root): {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
