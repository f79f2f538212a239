//! Every step gets a network namespace of its own, made by the runner: only
//! `lo`, never the host's. The runner can open listeners inside it (the
//! egress proxy a `network: true` step reaches the outside through) while
//! its own connections stay in the host's namespace, and the step's
//! sandbox is started inside it.
//!
//! Namespaces belong to threads: each operation runs on a short-lived
//! thread that enters the step's namespace and ends with it, so no thread
//! of the runner's pool ever changes namespace.

use std::fs::File;
use std::net::TcpListener;
use std::sync::Arc;

use nix::sched::{CloneFlags, setns, unshare};

/// A step's network namespace; gone once this and every process in it are.
#[derive(Clone, Debug)]
pub struct StepNetwork {
    /// `/proc/thread-self/ns/net` of the namespace, held open; `None` when
    /// the runner is not root and bubblewrap makes the namespace itself
    /// (`--unshare-net`), which the runner cannot then enter.
    namespace: Option<Arc<File>>,
}

impl StepNetwork {
    /// The namespace bubblewrap makes itself, for a runner that is not
    /// root: only `lo` too, but no egress proxy can be served in it.
    pub fn made_by_sandbox() -> Self {
        Self { namespace: None }
    }

    /// Whether bubblewrap must make the namespace (`--unshare-net`).
    pub fn made_by_sandbox_itself(&self) -> bool {
        self.namespace.is_none()
    }

    /// A new namespace with `lo` up (and ports below 1024 usable by the
    /// step's own root).
    pub fn create() -> std::io::Result<Self> {
        let namespace = std::thread::spawn(|| -> std::io::Result<File> {
            unshare(CloneFlags::CLONE_NEWNET).map_err(|e| {
                std::io::Error::other(format!("cannot make a network namespace: {e}"))
            })?;
            // Children of this thread start in the new namespace.
            let up = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .env_clear()
                .env("PATH", crate::sandbox::STEP_PATH)
                .output()
                .map_err(|e| std::io::Error::other(format!("cannot run `ip`: {e}")))?;
            if !up.status.success() {
                return Err(std::io::Error::other(format!(
                    "`ip link set lo up` failed: {}",
                    String::from_utf8_lossy(&up.stderr).trim()
                )));
            }
            // sysctls under /proc/sys/net are those of the opener's namespace.
            let _ = fs_err::write("/proc/sys/net/ipv4/ip_unprivileged_port_start", "0");
            fs_err::File::open("/proc/thread-self/ns/net").map(|f| f.into_parts().0)
        })
        .join()
        .expect("making a namespace does not panic")?;
        Ok(Self {
            namespace: Some(Arc::new(namespace)),
        })
    }

    /// Runs `work` on a thread inside the namespace.
    pub fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        let namespace = self.namespace.clone();
        std::thread::spawn(move || {
            enter(namespace.as_deref())?;
            work()
        })
        .join()
        .expect("work in a namespace does not panic")
    }

    /// Starts `command` inside the namespace. The thread that started it
    /// lives as long as the returned guard: a parent-death signal
    /// (bubblewrap's `--die-with-parent`) fires when the parent *thread*
    /// exits, so it must outlive the child.
    pub fn spawn(
        &self,
        command: tokio::process::Command,
    ) -> std::io::Result<(tokio::process::Child, SpawnGuard)> {
        let namespace = self.namespace.clone();
        let runtime = tokio::runtime::Handle::current();
        let (started, child) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            let spawned = enter(namespace.as_deref()).and_then(|()| {
                let _entered = runtime.enter();
                let mut command = command;
                command.spawn()
            });
            let ok = spawned.is_ok();
            let _ = started.send(spawned);
            if ok {
                // Until the guard goes.
                let _ = released.recv();
            }
        });
        let child = child
            .recv()
            .map_err(|_| std::io::Error::other("the spawning thread died"))??;
        Ok((child, SpawnGuard { _release: release }))
    }

    /// A listener on the namespace's `127.0.0.1`, for the runner to serve.
    pub fn listen(&self) -> std::io::Result<TcpListener> {
        self.listen_at(0)
    }

    /// A listener on the namespace's `127.0.0.1:port` (0: any free port):
    /// every step's namespace is its own, so a fixed port is always free
    /// when the step starts.
    pub fn listen_at(&self, port: u16) -> std::io::Result<TcpListener> {
        if self.made_by_sandbox_itself() {
            return Err(std::io::Error::other(
                "the runner is not root, so it cannot serve anything inside the step's network namespace",
            ));
        }
        self.run(move || {
            let listener = TcpListener::bind(("127.0.0.1", port))?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        })
    }
}

/// Keeps the thread that started a step alive; drop it once the step is over.
#[derive(Debug)]
pub struct SpawnGuard {
    _release: std::sync::mpsc::Sender<()>,
}

/// Moves this thread into `namespace` (nothing for one the sandbox makes).
fn enter(namespace: Option<&File>) -> std::io::Result<()> {
    let Some(namespace) = namespace else {
        return Ok(());
    };
    setns(namespace, CloneFlags::CLONE_NEWNET).map_err(|e| {
        std::io::Error::other(format!("cannot enter the step's network namespace: {e}"))
    })
}
