//! The runner RPC over an authenticated stream, with roles inverted: the
//! runner (which dialled) serves, the daemon (which accepted) calls.

use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint};

use crate::Error;

/// Generated from `proto/runner.proto`.
pub mod proto {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("custody.runner.v1");
}

// Credentials and client keys print redacted (their derived `Debug` is
// skipped in build.rs).
impl std::fmt::Debug for proto::RegistryCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryCredential")
            .field("host", &self.host)
            .field("username", &self.username)
            .field("password", &"***")
            .field("identity_token", &"***")
            .finish()
    }
}

impl std::fmt::Debug for proto::HostTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostTls")
            .field("host", &self.host)
            .field("roots", &self.roots.len())
            .field(
                "identity",
                &if self.identity.is_empty() {
                    "none"
                } else {
                    "***"
                },
            )
            .finish()
    }
}

impl std::fmt::Debug for proto::StepSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepSecret")
            .field("name", &self.name)
            .field("value", &"***")
            .field("file", &self.file)
            .field("env", &self.env)
            .finish()
    }
}

pub use proto::runner_client::RunnerClient as GeneratedClient;
pub use proto::runner_server::{Runner, RunnerServer};

/// The daemon's handle on one runner.
pub type RunnerClient = GeneratedClient<Channel>;

/// Makes the daemon's RPC client over an accepted, authenticated stream.
pub(crate) async fn client_over<S>(stream: S) -> Result<RunnerClient, Error>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let slot = std::sync::Mutex::new(Some(stream));
    // The URI is never resolved: the connector hands over the one stream
    // this session has, once; a reconnect attempt finds it gone and fails.
    let channel = Endpoint::from_static("http://runner.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let stream = slot
                .lock()
                .expect("the stream slot is never poisoned")
                .take();
            async move {
                stream.map(TokioIo::new).ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::NotConnected,
                        "the runner connection is gone",
                    )
                })
            }
        }))
        .await
        .map_err(|e| Error::Handshake(format!("starting the RPC session: {e}")))?;
    Ok(GeneratedClient::new(channel))
}

/// Serves `service` on the runner's side of an authenticated stream until
/// the daemon closes the session.
pub async fn serve<S, R>(stream: S, service: R) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    R: Runner,
{
    // The server would start a graceful shutdown (GOAWAY) as soon as its
    // incoming stream ends, so the stream stays open, and the server stops
    // once the one connection it has is dropped.
    let (closed, on_closed) = tokio::sync::oneshot::channel::<()>();
    let session = Session {
        io: stream,
        _closed: closed,
    };
    let incoming = tokio_stream::StreamExt::chain(
        tokio_stream::once(Ok::<_, std::io::Error>(session)),
        tokio_stream::pending(),
    );
    tonic::transport::Server::builder()
        .add_service(RunnerServer::new(service))
        .serve_with_incoming_shutdown(incoming, async {
            let _ = on_closed.await;
        })
        .await
        .map_err(|e| Error::Handshake(format!("serving the RPC session: {e}")))
}

/// The runner's stream as tonic's server wants it; dropping it (the
/// connection is over) tells the server to stop.
struct Session<S> {
    io: S,
    _closed: tokio::sync::oneshot::Sender<()>,
}

impl<S> Connected for Session<S> {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl<S: AsyncRead + Unpin> AsyncRead for Session<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Session<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::proto;

    #[test]
    fn credentials_in_a_job_never_print() {
        let job = proto::Job {
            registries: Some(proto::RegistryAccess {
                credentials: vec![proto::RegistryCredential {
                    host: "r.example".into(),
                    username: "u".into(),
                    password: "pa55word".into(),
                    identity_token: "t0ken".into(),
                }],
                tls: vec![proto::HostTls {
                    host: "r.example".into(),
                    roots: Vec::new(),
                    identity: b"-----BEGIN PRIVATE KEY-----".to_vec(),
                }],
                ..Default::default()
            }),
            steps: vec![proto::Step {
                secrets: vec![proto::StepSecret {
                    name: "npm".into(),
                    value: b"s3cr3t-value".to_vec(),
                    file: true,
                    env: vec!["NPM_TOKEN".into()],
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let shown = format!("{job:?}");
        for secret in ["pa55word", "t0ken", "PRIVATE KEY", "s3cr3t-value"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("r.example"), "{shown}");
    }
}
