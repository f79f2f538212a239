//! The runner side: dial the daemon, prove which job we are, and get back a
//! stream ready to carry the RPC.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::handshake::{self, Verdict};
use crate::identity;
use crate::token::JobToken;

/// Why a runner could not get its job. Each says what to check.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DialError {
    #[error("cannot reach the daemon at `{addr}`: {detail}")]
    Unreachable { addr: String, detail: String },
    #[error(
        "the daemon at `{addr}` did not present the certificate this runner was given ({detail}); it is another daemon, or the certificate is stale"
    )]
    CertificateMismatch { addr: String, detail: String },
    #[error(
        "the daemon at `{addr}` does not know job `{job_id}` (it finished, was cancelled, or its token was already used)"
    )]
    UnknownJob { addr: String, job_id: String },
    #[error("the daemon at `{addr}` refused the token for job `{job_id}`")]
    WrongToken { addr: String, job_id: String },
    #[error("the handshake with `{addr}` failed: {detail}")]
    Protocol { addr: String, detail: String },
    #[error("invalid runner settings: {0}")]
    Settings(String),
}

/// Dials `addr`, checks the daemon's certificate against `certificate_pem`,
/// and authenticates as `job_id`.
pub async fn dial(
    addr: &str,
    certificate_pem: &str,
    job_id: &str,
    token: &JobToken,
    deadline: Duration,
) -> Result<TlsStream<TcpStream>, DialError> {
    if !handshake::is_valid_job_id(job_id) {
        return Err(DialError::Settings(format!(
            "`{job_id}` is not a valid job id"
        )));
    }
    let config = identity::runner_tls_config(certificate_pem)
        .map_err(|e| DialError::Settings(e.to_string()))?;
    let protocol = |detail: String| DialError::Protocol {
        addr: addr.to_owned(),
        detail,
    };
    tokio::time::timeout(deadline, async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| DialError::Unreachable {
                addr: addr.to_owned(),
                detail: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        let mut tls = TlsConnector::from(Arc::clone(&config))
            .connect(identity::server_name(), tcp)
            .await
            .map_err(|e| classify_tls_error(addr, e))?;
        tls.write_all(format!("{job_id}\n{}\n", token.expose()).as_bytes())
            .await
            .map_err(|e| protocol(e.to_string()))?;
        tls.flush().await.map_err(|e| protocol(e.to_string()))?;
        let mut answer = [0u8; 3];
        tls.read_exact(&mut answer)
            .await
            .map_err(|e| protocol(format!("no answer to the hello: {e}")))?;
        match Verdict::parse(&answer) {
            Some(Verdict::Ok) => Ok(tls),
            Some(Verdict::UnknownJob) => Err(DialError::UnknownJob {
                addr: addr.to_owned(),
                job_id: job_id.to_owned(),
            }),
            Some(Verdict::WrongToken) => Err(DialError::WrongToken {
                addr: addr.to_owned(),
                job_id: job_id.to_owned(),
            }),
            None => Err(protocol(format!("unexpected answer {answer:?}"))),
        }
    })
    .await
    .map_err(|_| protocol(format!("no answer within {deadline:?}")))?
}

fn classify_tls_error(addr: &str, err: std::io::Error) -> DialError {
    let certificate = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| matches!(e, rustls::Error::InvalidCertificate(_)));
    if certificate {
        DialError::CertificateMismatch {
            addr: addr.to_owned(),
            detail: err.to_string(),
        }
    } else {
        DialError::Protocol {
            addr: addr.to_owned(),
            detail: format!("TLS: {err}"),
        }
    }
}
