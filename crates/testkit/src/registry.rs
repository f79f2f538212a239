//! Debian's `docker-registry` (distribution 2.8), started for one test with
//! its own config, storage and port, in the modes the tests need.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::certs::Certs;
use crate::http::{Response, Server};
use crate::token::{TokenRequest, TokenServer};

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// How the registry is to be set up; `start` runs it.
#[derive(Default)]
pub struct RegistryBuilder {
    tls: bool,
    client_certs: bool,
    basic_auth: Option<(String, String)>,
    token_auth: Option<(String, String)>,
    redirect_blobs: bool,
}

impl RegistryBuilder {
    /// Serve HTTPS with a certificate from a fresh test CA, published in a
    /// certs.d directory (`certs_dir()`).
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// Require client certificates signed by the test CA; the client pair is
    /// written into the certs.d directory as `client.cert` + `client.key`.
    pub fn client_certs(mut self) -> Self {
        self.tls = true;
        self.client_certs = true;
        self
    }

    /// htpasswd (bcrypt) Basic auth with one user.
    pub fn basic_auth(mut self, user: &str, password: &str) -> Self {
        self.basic_auth = Some((user.to_owned(), password.to_owned()));
        self
    }

    /// Bearer-token auth through a token server run by the test support.
    pub fn token_auth(mut self, user: &str, password: &str) -> Self {
        self.token_auth = Some((user.to_owned(), password.to_owned()));
        self
    }

    /// Blob downloads answer with a redirect to a separate file server (on
    /// another port, so another origin) that records what it was sent.
    pub fn redirect_blobs(mut self) -> Self {
        self.redirect_blobs = true;
        self
    }

    pub fn start(self) -> Registry {
        let dir = tempfile::tempdir().expect("a temp dir");
        let storage = dir.path().join("storage");
        fs_err::create_dir_all(&storage).unwrap();
        let port = crate::free_port();
        let host = format!("127.0.0.1:{port}");
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n",
            storage.display()
        );

        let redirects: Arc<Mutex<Vec<RedirectRequest>>> = Arc::default();
        let blob_server = self.redirect_blobs.then(|| {
            let root = storage.clone();
            let redirects = redirects.clone();
            Server::start(move |request| {
                redirects.lock().unwrap().push(RedirectRequest {
                    path: request.path.clone(),
                    had_authorization: request.headers.contains_key("authorization"),
                });
                let relative = request.path.trim_start_matches('/');
                if relative.split('/').any(|c| c == "..") {
                    return Response::new(400, "text/plain", "bad path");
                }
                match fs_err::read(root.join(relative)) {
                    Ok(bytes) => Response::new(200, "application/octet-stream", bytes),
                    Err(_) => Response::new(404, "text/plain", "not found"),
                }
            })
        });
        if let Some(server) = &blob_server {
            config.push_str(&format!(
                "middleware:\n  storage:\n    - name: redirect\n      options:\n        baseurl: http://127.0.0.1:{}/\n",
                server.port
            ));
        }

        config.push_str(&format!(
            "http:\n  addr: {host}\n  secret: custody-testkit-secret\n"
        ));
        let certs_dir = self.tls_config(dir.path(), &host, &mut config);
        let token_server = self.auth_config(dir.path(), &mut config);

        let config_path = dir.path().join("config.yml");
        fs_err::write(&config_path, &config).unwrap();
        let credentials = self.basic_auth.clone().or(self.token_auth.clone());
        let mut registry = Registry {
            dir,
            config_path,
            host,
            port,
            certs_dir,
            credentials,
            child: None,
            token_server,
            _blob_server: blob_server,
            redirects,
        };
        registry.restart();
        registry
    }
}

impl RegistryBuilder {
    /// TLS for the registry (and a certs.d for its clients); returns the certs.d.
    fn tls_config(&self, dir: &Path, host: &str, config: &mut String) -> Option<PathBuf> {
        let certs = self.tls.then(Certs::generate)?;
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            fs_err::write(&path, text).unwrap();
            path
        };
        let cert = write("server.crt", &certs.server.cert_pem);
        let key = write("server.key", &certs.server.key_pem);
        config.push_str(&format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            cert.display(),
            key.display()
        ));
        if self.client_certs {
            let ca = write("clientca.crt", &certs.ca.cert_pem);
            config.push_str(&format!("    clientcas:\n      - {}\n", ca.display()));
        }
        let root = dir.join("certs.d");
        certs.write_certs_d(&root, host, self.client_certs);
        Some(root)
    }

    /// Basic or token auth; returns the token server, for token auth.
    fn auth_config(&self, dir: &Path, config: &mut String) -> Option<TokenServer> {
        if let Some((user, password)) = &self.basic_auth {
            let output = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .expect("htpasswd (apache2-utils) is installed; run scripts/setup");
            assert!(output.status.success(), "htpasswd failed");
            let path = dir.join("htpasswd");
            fs_err::write(&path, &output.stdout).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: custody-test\n    path: {}\n",
                path.display()
            ));
        }
        self.token_auth.as_ref().map(|(user, password)| {
            let server = TokenServer::start(user, password);
            let bundle = dir.join("token.crt");
            fs_err::write(&bundle, &server.cert_pem).unwrap();
            config.push_str(&format!(
                "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                server.realm(),
                crate::token::SERVICE,
                crate::token::ISSUER,
                bundle.display()
            ));
            server
        })
    }
}

/// A blob download that reached the redirect target.
#[derive(Clone, Debug)]
pub struct RedirectRequest {
    pub path: String,
    pub had_authorization: bool,
}

/// A running registry; killed and cleaned up when dropped.
pub struct Registry {
    dir: tempfile::TempDir,
    config_path: PathBuf,
    host: String,
    port: u16,
    certs_dir: Option<PathBuf>,
    credentials: Option<(String, String)>,
    child: Option<Child>,
    token_server: Option<TokenServer>,
    _blob_server: Option<Server>,
    redirects: Arc<Mutex<Vec<RedirectRequest>>>,
}

impl Registry {
    pub fn builder() -> RegistryBuilder {
        RegistryBuilder::default()
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn url(&self) -> String {
        let scheme = if self.certs_dir.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.host)
    }

    /// The certs.d root (holding `<host>/ca.crt`), for TLS registries.
    pub fn certs_dir(&self) -> Option<&Path> {
        self.certs_dir.as_deref()
    }

    /// The user and password the registry accepts, if it wants any.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.credentials
            .as_ref()
            .map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// A `skopeo` command with `args`, set up to trust and log in to this
    /// registry; the caller adds the `docker://…` reference.
    pub fn skopeo(&self, args: &[&str]) -> std::process::Command {
        let mut command = std::process::Command::new("skopeo");
        command.args(args);
        match &self.certs_dir {
            Some(dir) => command.arg(format!("--cert-dir={}", dir.join(&self.host).display())),
            None => command.arg("--tls-verify=false"),
        };
        if let Some((user, pass)) = self.credentials() {
            command.arg(format!("--creds={user}:{pass}"));
        }
        command
    }

    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    pub fn token_requests(&self) -> Vec<TokenRequest> {
        self.token_server
            .as_ref()
            .map(TokenServer::requests)
            .unwrap_or_default()
    }

    pub fn redirect_requests(&self) -> Vec<RedirectRequest> {
        self.redirects.lock().unwrap().clone()
    }

    /// Kills the registry process; its storage stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// (Re)starts the registry on the same port with the same storage, and
    /// waits until it answers.
    pub fn restart(&mut self) {
        self.stop();
        let log = fs_err::File::create(self.dir.path().join("registry.log")).unwrap();
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap().into_parts().0)
            .stderr(log.into_parts().0)
            .spawn()
            .expect("docker-registry is installed; run scripts/setup");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if TcpStream::connect(self.addr()).is_ok() {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("docker-registry exited with {status}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "docker-registry did not listen on {} within 10 s:\n{}",
            self.host,
            self.log()
        );
    }

    pub fn log(&self) -> String {
        fs_err::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Whether the registry answers 200 for `HEAD /v2/<repo>/blobs/<digest>`,
    /// asked with curl (not with the code under test).
    pub fn has_blob(&self, repository: &str, digest: &str) -> bool {
        self.head(&format!("/v2/{repository}/blobs/{digest}"))
    }

    pub fn has_manifest(&self, repository: &str, reference: &str) -> bool {
        self.head(&format!("/v2/{repository}/manifests/{reference}"))
    }

    fn head(&self, path: &str) -> bool {
        let mut command = Command::new("curl");
        command.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-I"]);
        command.args(["-H", "Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"]);
        if let Some(dir) = &self.certs_dir {
            let host_dir = dir.join(&self.host);
            command.arg("--cacert").arg(host_dir.join("ca.crt"));
            if host_dir.join("client.cert").exists() {
                command
                    .arg("--cert")
                    .arg(host_dir.join("client.cert"))
                    .arg("--key")
                    .arg(host_dir.join("client.key"));
            }
        }
        if let (Some((user, password)), None) = (&self.credentials, &self.token_server) {
            command.arg("-u").arg(format!("{user}:{password}"));
        }
        assert!(
            self.token_server.is_none(),
            "has_blob/has_manifest do not fetch tokens; use skopeo"
        );
        let output = command
            .arg(format!("{}{path}", self.url()))
            .output()
            .expect("curl is installed");
        String::from_utf8_lossy(&output.stdout) == "200"
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}
