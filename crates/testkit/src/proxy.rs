//! A TCP proxy that can play a registry dying mid-transfer.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

struct Shared {
    target: SocketAddr,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    /// Die once this many client→server bytes have passed (0: never).
    die_after: AtomicU64,
    dead: AtomicBool,
    /// Send server bytes one at a time, this many milliseconds apart (0: at once).
    trickle_millis: AtomicU64,
    connections: Mutex<Vec<TcpStream>>,
}

/// Forwards 127.0.0.1:PORT to a target and counts what clients send.
pub struct FaultProxy {
    port: u16,
    shared: Arc<Shared>,
}

impl FaultProxy {
    pub fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            target,
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            die_after: AtomicU64::new(0),
            dead: AtomicBool::new(false),
            trickle_millis: AtomicU64::new(0),
            connections: Mutex::new(Vec::new()),
        });
        accept_loop(listener, shared.clone());
        Self { port, shared }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Bytes clients have sent through the proxy so far.
    pub fn bytes_up(&self) -> u64 {
        self.shared.bytes_up.load(Ordering::SeqCst)
    }

    /// Bytes servers have sent back through the proxy so far.
    pub fn bytes_down(&self) -> u64 {
        self.shared.bytes_down.load(Ordering::SeqCst)
    }

    /// After `bytes` more client bytes, cut every connection and refuse new
    /// ones, as a registry host that went away.
    pub fn die_after(&self, bytes: u64) {
        self.shared
            .die_after
            .store(self.bytes_up() + bytes.max(1), Ordering::SeqCst);
    }

    /// From now on, answer a byte at a time, `every` apart: a registry that
    /// never stalls long enough for a read timeout and never finishes.
    pub fn trickle(&self, every: Duration) {
        self.shared
            .trickle_millis
            .store(every.as_millis().max(1) as u64, Ordering::SeqCst);
    }

    /// Accept connections again on the same port.
    pub fn revive(&self) {
        self.shared.die_after.store(0, Ordering::SeqCst);
        if self.shared.dead.swap(false, Ordering::SeqCst) {
            let listener = loop {
                match TcpListener::bind(("127.0.0.1", self.port)) {
                    Ok(listener) => break listener,
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            };
            accept_loop(listener, self.shared.clone());
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        kill(&self.shared);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn kill(shared: &Shared) {
    shared.dead.store(true, Ordering::SeqCst);
    for connection in shared.connections.lock().unwrap().drain(..) {
        let _ = connection.shutdown(Shutdown::Both);
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    thread::spawn(move || {
        for client in listener.incoming() {
            if shared.dead.load(Ordering::SeqCst) {
                break; // dropping the listener refuses new connections
            }
            let Ok(client) = client else { continue };
            let Ok(server) = TcpStream::connect(shared.target) else {
                continue;
            };
            {
                let mut connections = shared.connections.lock().unwrap();
                connections.push(client.try_clone().unwrap());
                connections.push(server.try_clone().unwrap());
            }
            pump(
                client.try_clone().unwrap(),
                server.try_clone().unwrap(),
                shared.clone(),
                true,
            );
            pump(server, client, shared.clone(), false);
        }
    });
}

fn pump(mut from: TcpStream, mut to: TcpStream, shared: Arc<Shared>, upstream: bool) {
    thread::spawn(move || {
        let mut buf = vec![0; 64 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if shared.dead.load(Ordering::SeqCst) {
                break;
            }
            if !upstream {
                shared.bytes_down.fetch_add(n as u64, Ordering::SeqCst);
            } else {
                let total = shared.bytes_up.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                let limit = shared.die_after.load(Ordering::SeqCst);
                if limit != 0 && total >= limit {
                    kill(&shared);
                    // Wake the accept loop so it drops the listener now.
                    let port = from.local_addr().map(|a| a.port()).unwrap_or(0);
                    let _ = TcpStream::connect(("127.0.0.1", port));
                    break;
                }
            }
            let trickle = shared.trickle_millis.load(Ordering::SeqCst);
            let written = if !upstream && trickle > 0 {
                buf[..n].chunks(1).try_for_each(|byte| {
                    thread::sleep(Duration::from_millis(trickle));
                    if shared.dead.load(Ordering::SeqCst) {
                        return Err(std::io::ErrorKind::BrokenPipe.into());
                    }
                    to.write_all(byte)
                })
            } else {
                to.write_all(&buf[..n])
            };
            if written.is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
