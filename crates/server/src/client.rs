//! A client for the HTTP API, as `custody submit` and `custody builds` use
//! it.

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;

use crate::api::{
    Build, BuildList, BuildState, ErrorBody, ErrorCode, KeyList, LogEvent, SubmitRequest,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("`{0}` is not a server URL: use `http://HOST:PORT`")]
    Url(String),
    #[error("cannot reach the custody server at {server}: {detail}")]
    Connect { server: String, detail: String },
    /// The server answered with an error.
    #[error("{message} ({status}, {code})")]
    Api {
        status: u16,
        code: ErrorCode,
        message: String,
        line: Option<u64>,
        column: Option<u64>,
    },
    #[error("the server at {server} answered with something that is not the custody API: {detail}")]
    Protocol { server: String, detail: String },
}

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    /// A client for the server at `server` (`http://host:port`).
    pub fn new(server: &str, token: Option<String>) -> Result<Self, ClientError> {
        let parsed =
            reqwest::Url::parse(server).map_err(|_| ClientError::Url(server.to_owned()))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
            return Err(ClientError::Url(server.to_owned()));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| ClientError::Connect {
                server: server.to_owned(),
                detail: e.to_string(),
            })?;
        Ok(Self {
            http,
            base: server.trim_end_matches('/').to_owned(),
            token,
        })
    }

    pub async fn submit(&self, request: &SubmitRequest) -> Result<Build, ClientError> {
        self.call(Method::POST, "/api/v1/builds", Some(request))
            .await
    }

    pub async fn list(
        &self,
        state: Option<BuildState>,
        limit: u32,
        before: Option<&str>,
    ) -> Result<BuildList, ClientError> {
        let mut path = format!("/api/v1/builds?limit={limit}");
        if let Some(state) = state {
            path.push_str(&format!("&state={}", state.as_str()));
        }
        if let Some(before) = before {
            path.push_str(&format!("&before={before}"));
        }
        self.call::<(), _>(Method::GET, &path, None).await
    }

    pub async fn show(&self, id: &str) -> Result<Build, ClientError> {
        self.call::<(), _>(Method::GET, &format!("/api/v1/builds/{id}"), None)
            .await
    }

    pub async fn cancel(&self, id: &str) -> Result<Build, ClientError> {
        self.call::<(), _>(Method::POST, &format!("/api/v1/builds/{id}/cancel"), None)
            .await
    }

    /// Queues a new build of `id`'s spec at the commit it resolved.
    pub async fn retry(&self, id: &str) -> Result<Build, ClientError> {
        self.call::<(), _>(Method::POST, &format!("/api/v1/builds/{id}/retry"), None)
            .await
    }

    pub async fn keys(&self) -> Result<KeyList, ClientError> {
        self.call::<(), _>(Method::GET, "/api/v1/keys", None).await
    }

    /// The build's DSSE envelope, as the server stored it.
    pub async fn provenance(&self, id: &str) -> Result<Vec<u8>, ClientError> {
        let response = self
            .send::<()>(
                Method::GET,
                &format!("/api/v1/builds/{id}/provenance"),
                None,
            )
            .await?;
        Ok(response
            .bytes()
            .await
            .map_err(|e| self.connect_error(e))?
            .to_vec())
    }

    /// Streams the build's log to `on_line`, from the first line (or after
    /// `after`); with `follow`, until the build ends. Reconnects where it
    /// left off if the stream breaks. Returns the build as it ended (or,
    /// without `follow`, as it is).
    pub async fn logs(
        &self,
        id: &str,
        follow: bool,
        mut on_line: impl FnMut(LogEvent),
    ) -> Result<Build, ClientError> {
        let mut after = -1i64;
        let mut retries = 0;
        loop {
            let path = format!("/api/v1/builds/{id}/logs?follow={follow}&after={after}");
            let result = async {
                let response = self.send::<()>(Method::GET, &path, None).await?;
                let mut body = response.bytes_stream();
                let mut buffer = Vec::new();
                let mut event = SseEvent::default();
                while let Some(chunk) = body.next().await {
                    let chunk = chunk.map_err(|e| self.connect_error(e))?;
                    buffer.extend_from_slice(&chunk);
                    while let Some(end) = buffer.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = buffer.drain(..=end).collect();
                        let line = String::from_utf8_lossy(&line);
                        let line = line.trim_end_matches(['\n', '\r']);
                        if !line.is_empty() {
                            event.field(line);
                            continue;
                        }
                        match event.name.as_deref() {
                            Some("log") => {
                                let log: LogEvent = self.decode(&event.data)?;
                                after = log.seq;
                                on_line(log);
                            }
                            Some("end") => return Ok(Some(self.decode::<Build>(&event.data)?)),
                            Some("error") => {
                                return Err(ClientError::Protocol {
                                    server: self.base.clone(),
                                    detail: event.data.clone(),
                                });
                            }
                            _ => {}
                        }
                        event = SseEvent::default();
                    }
                }
                Ok(None)
            }
            .await;
            match result {
                Ok(Some(build)) => return Ok(build),
                Ok(None) | Err(ClientError::Connect { .. }) if retries < 30 => {
                    retries += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Ok(None) => {
                    return Err(ClientError::Protocol {
                        server: self.base.clone(),
                        detail: "the log stream ended before the build did".into(),
                    });
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn call<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let response = self.send(method, path, body).await?;
        let bytes = response.bytes().await.map_err(|e| self.connect_error(e))?;
        self.decode(&bytes)
    }

    async fn send<B: serde::Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<reqwest::Response, ClientError> {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| self.connect_error(e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let bytes = response.bytes().await.map_err(|e| self.connect_error(e))?;
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => Err(ClientError::Api {
                status: status.as_u16(),
                code: body.error.code,
                message: body.error.message,
                line: body.error.line,
                column: body.error.column,
            }),
            Err(_) => Err(ClientError::Protocol {
                server: self.base.clone(),
                detail: format!(
                    "{status}{}",
                    if status == StatusCode::NOT_FOUND {
                        " (is this a custody server?)"
                    } else {
                        ""
                    }
                ),
            }),
        }
    }

    fn decode<T: DeserializeOwned>(&self, bytes: impl AsRef<[u8]>) -> Result<T, ClientError> {
        serde_json::from_slice(bytes.as_ref()).map_err(|e| ClientError::Protocol {
            server: self.base.clone(),
            detail: e.to_string(),
        })
    }

    fn connect_error(&self, e: reqwest::Error) -> ClientError {
        // reqwest's chain repeats the URL at every level; the innermost
        // cause says what went wrong.
        let mut cause: &dyn std::error::Error = &e;
        while let Some(next) = cause.source() {
            cause = next;
        }
        ClientError::Connect {
            server: self.base.clone(),
            detail: cause.to_string(),
        }
    }
}

/// One server-sent event being read.
#[derive(Default)]
struct SseEvent {
    name: Option<String>,
    data: String,
}

impl SseEvent {
    fn field(&mut self, line: &str) {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => self.name = Some(value.to_owned()),
            "data" => {
                if !self.data.is_empty() {
                    self.data.push('\n');
                }
                self.data.push_str(value);
            }
            _ => {}
        }
    }
}
