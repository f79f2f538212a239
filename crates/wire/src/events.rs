//! What a runner tells the daemon while it runs a job, in both sides' own
//! terms. The generated protobuf types stay at the RPC edge: the runner
//! turns these into `proto::Event`s as it sends them, the daemon's dispatch
//! turns what arrives back into these, and nothing else sees prost.

use crate::rpc::proto::{self, event::Kind};

/// One thing that happened while a job ran.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunnerEvent {
    /// The first event: where the runner is.
    Hello {
        hostname: String,
        pid: u32,
        version: String,
    },
    /// The boundary the steps run within, as the runner set it up.
    Isolation(Isolation),
    StepStarted {
        index: u32,
        name: String,
        /// The digest the step's image resolved to; `None` on the host root.
        image_digest: Option<String>,
    },
    Log(LogLine),
    StepFinished {
        index: u32,
        end: StepEnd,
    },
    /// Output of step `step` that was dropped to keep the log in bounds.
    LogCut {
        step: u32,
        lines: u64,
        bytes: u64,
    },
    /// A destination a step reached through its egress proxy.
    Egress(Egress),
    /// An output the runner pushed (by digest).
    Pushed(Pushed),
    /// How far the push of one output has got (every few seconds).
    Pushing {
        destination: String,
        bytes: u64,
        total: u64,
    },
    /// A manifest a step read from a `pulls` repository through the gateway.
    Pulled(Pulled),
    /// The last event.
    Finished(JobEnd),
}

/// One line a step printed, without its newline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    pub step: u32,
    pub stream: Stream,
    pub line: Vec<u8>,
    /// When the runner read it, in milliseconds since the Unix epoch.
    pub unix_millis: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    /// The number the store and the API use (0 stdout, 1 stderr).
    pub fn number(self) -> i32 {
        match self {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        }
    }
}

/// How a step ended, when it ended by itself or by its timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepEnd {
    /// Its exit code; -1 when a signal killed it.
    Exited(i32),
    TimedOut,
}

/// A destination a step reached through its egress proxy: one CONNECT
/// tunnel or one plain HTTP request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Egress {
    pub step: u32,
    /// `tcp://HOST:PORT` for a tunnel; the `http://` URL for plain HTTP.
    pub uri: String,
    /// For plain HTTP, the sha256 (hex) of the response body received.
    pub sha256: Option<String>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// What was pushed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pushed {
    /// Pinned: `REGISTRY/REPO@sha256:…` or `oci:PATH@sha256:…`.
    pub reference: String,
    pub digest: String,
    /// The manifest's size.
    pub size: u64,
    /// Bytes of blobs sent (what the destination held already was not).
    pub bytes_sent: u64,
    /// `Some` when a step pushed it through the gateway; `None` for the
    /// spec's `images` and `artifacts`.
    pub gateway: Option<GatewayPushed>,
}

/// What a step pushed through the gateway, as the runner saw it arrive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayPushed {
    /// The spec's `pushes` name.
    pub push: String,
    /// The tag the step used; `None` for a manifest pushed only by digest.
    pub tag: Option<String>,
    /// The step that pushed it (the last one, when several did).
    pub step: String,
}

/// A manifest a step read through the gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pulled {
    /// The spec's `pulls` name.
    pub pull: String,
    pub digest: String,
}

/// The step boundary as the runner set it up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Isolation {
    pub uid_map: String,
    pub gid_map: String,
    /// `None` when the disk limit could not be enforced.
    pub disk_bytes: Option<u64>,
    pub cgroups: bool,
    pub log_bytes: u64,
    pub egress_allow: Vec<String>,
    /// What could not be enforced, said for people.
    pub notes: Vec<String>,
}

/// How a job ended, as the runner tells it: three states, not two flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobEnd {
    Succeeded,
    Failed(String),
    Cancelled(String),
}

impl From<RunnerEvent> for proto::Event {
    fn from(event: RunnerEvent) -> Self {
        let kind = match event {
            RunnerEvent::Hello {
                hostname,
                pid,
                version,
            } => Kind::Hello(proto::Hello {
                hostname,
                pid,
                runner_version: version,
            }),
            RunnerEvent::Isolation(i) => Kind::Isolation(proto::Isolation {
                uid_map: i.uid_map,
                gid_map: i.gid_map,
                disk_bytes: i.disk_bytes.unwrap_or(0),
                cgroups: i.cgroups,
                log_bytes: i.log_bytes,
                egress_allow: i.egress_allow,
                notes: i.notes,
            }),
            RunnerEvent::StepStarted {
                index,
                name,
                image_digest,
            } => Kind::StepStarted(proto::StepStarted {
                index,
                name,
                image_digest: image_digest.unwrap_or_default(),
            }),
            RunnerEvent::Log(line) => Kind::Log(proto::LogLine {
                step: line.step,
                stream: match line.stream {
                    Stream::Stdout => proto::log_line::Stream::Stdout,
                    Stream::Stderr => proto::log_line::Stream::Stderr,
                } as i32,
                line: line.line,
                unix_millis: line.unix_millis,
            }),
            RunnerEvent::StepFinished { index, end } => {
                let (exit_code, timed_out) = match end {
                    StepEnd::Exited(code) => (code, false),
                    StepEnd::TimedOut => (-1, true),
                };
                Kind::StepFinished(proto::StepFinished {
                    index,
                    exit_code,
                    timed_out,
                })
            }
            RunnerEvent::LogCut { step, lines, bytes } => {
                Kind::LogCut(proto::LogCut { step, lines, bytes })
            }
            RunnerEvent::Egress(e) => Kind::Egress(proto::Egress {
                step: e.step,
                uri: e.uri,
                sha256: e.sha256.unwrap_or_default(),
                bytes_sent: e.bytes_sent,
                bytes_received: e.bytes_received,
            }),
            RunnerEvent::Pushing {
                destination,
                bytes,
                total,
            } => Kind::Pushing(proto::Pushing {
                destination,
                bytes,
                total,
            }),
            RunnerEvent::Pushed(p) => Kind::Output(proto::Output {
                reference: p.reference,
                digest: p.digest,
                size: p.size,
                bytes_sent: p.bytes_sent,
                gateway: p.gateway.map(|g| proto::GatewayOutput {
                    push: g.push,
                    tag: g.tag.unwrap_or_default(),
                    step: g.step,
                }),
            }),
            RunnerEvent::Pulled(p) => Kind::Pulled(proto::Pulled {
                pull: p.pull,
                digest: p.digest,
            }),
            RunnerEvent::Finished(end) => Kind::Finished(match end {
                JobEnd::Succeeded => proto::Finished {
                    success: true,
                    cancelled: false,
                    error: String::new(),
                },
                JobEnd::Failed(error) => proto::Finished {
                    success: false,
                    cancelled: false,
                    error,
                },
                JobEnd::Cancelled(reason) => proto::Finished {
                    success: false,
                    cancelled: true,
                    error: reason,
                },
            }),
        };
        proto::Event { kind: Some(kind) }
    }
}

impl TryFrom<proto::Event> for RunnerEvent {
    type Error = &'static str;

    fn try_from(event: proto::Event) -> Result<Self, Self::Error> {
        Ok(match event.kind.ok_or("an event without a kind")? {
            Kind::Hello(h) => RunnerEvent::Hello {
                hostname: h.hostname,
                pid: h.pid,
                version: h.runner_version,
            },
            Kind::Isolation(i) => RunnerEvent::Isolation(Isolation {
                uid_map: i.uid_map,
                gid_map: i.gid_map,
                disk_bytes: (i.disk_bytes > 0).then_some(i.disk_bytes),
                cgroups: i.cgroups,
                log_bytes: i.log_bytes,
                egress_allow: i.egress_allow,
                notes: i.notes,
            }),
            Kind::StepStarted(s) => RunnerEvent::StepStarted {
                index: s.index,
                name: s.name,
                image_digest: (!s.image_digest.is_empty()).then_some(s.image_digest),
            },
            Kind::Log(l) => RunnerEvent::Log(LogLine {
                step: l.step,
                stream: if l.stream == proto::log_line::Stream::Stderr as i32 {
                    Stream::Stderr
                } else {
                    Stream::Stdout
                },
                line: l.line,
                unix_millis: l.unix_millis,
            }),
            Kind::StepFinished(f) => RunnerEvent::StepFinished {
                index: f.index,
                end: if f.timed_out {
                    StepEnd::TimedOut
                } else {
                    StepEnd::Exited(f.exit_code)
                },
            },
            Kind::LogCut(c) => RunnerEvent::LogCut {
                step: c.step,
                lines: c.lines,
                bytes: c.bytes,
            },
            Kind::Egress(e) => RunnerEvent::Egress(Egress {
                step: e.step,
                uri: e.uri,
                sha256: (!e.sha256.is_empty()).then_some(e.sha256),
                bytes_sent: e.bytes_sent,
                bytes_received: e.bytes_received,
            }),
            Kind::Pushing(p) => RunnerEvent::Pushing {
                destination: p.destination,
                bytes: p.bytes,
                total: p.total,
            },
            Kind::Output(o) => RunnerEvent::Pushed(Pushed {
                reference: o.reference,
                digest: o.digest,
                size: o.size,
                bytes_sent: o.bytes_sent,
                gateway: o.gateway.map(|g| GatewayPushed {
                    push: g.push,
                    tag: (!g.tag.is_empty()).then_some(g.tag),
                    step: g.step,
                }),
            }),
            Kind::Pulled(p) => RunnerEvent::Pulled(Pulled {
                pull: p.pull,
                digest: p.digest,
            }),
            Kind::Finished(f) => RunnerEvent::Finished(match (f.success, f.cancelled) {
                (true, _) => JobEnd::Succeeded,
                (false, true) => JobEnd::Cancelled(f.error),
                (false, false) => JobEnd::Failed(f.error),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_round_trips_through_the_wire() {
        let events = [
            RunnerEvent::Hello {
                hostname: "h".into(),
                pid: 7,
                version: "1".into(),
            },
            RunnerEvent::Isolation(Isolation {
                uid_map: "0 100000 65536".into(),
                disk_bytes: Some(1 << 30),
                cgroups: true,
                notes: vec!["n".into()],
                ..Isolation::default()
            }),
            RunnerEvent::StepStarted {
                index: 1,
                name: "s".into(),
                image_digest: None,
            },
            RunnerEvent::Log(LogLine {
                step: 1,
                stream: Stream::Stderr,
                line: b"x".to_vec(),
                unix_millis: 5,
            }),
            RunnerEvent::StepFinished {
                index: 1,
                end: StepEnd::TimedOut,
            },
            RunnerEvent::StepFinished {
                index: 1,
                end: StepEnd::Exited(3),
            },
            RunnerEvent::LogCut {
                step: 0,
                lines: 2,
                bytes: 9,
            },
            RunnerEvent::Egress(Egress {
                step: 0,
                uri: "tcp://pypi.org:443".into(),
                sha256: None,
                bytes_sent: 3,
                bytes_received: 4,
            }),
            RunnerEvent::Egress(Egress {
                step: 1,
                uri: "http://example.org/f".into(),
                sha256: Some("ab".into()),
                bytes_sent: 0,
                bytes_received: 2,
            }),
            RunnerEvent::Pushing {
                destination: "r:v1".into(),
                bytes: 5,
                total: 9,
            },
            RunnerEvent::Pushed(Pushed {
                reference: "r@sha256:0".into(),
                digest: "sha256:0".into(),
                size: 1,
                bytes_sent: 7,
                gateway: None,
            }),
            RunnerEvent::Pushed(Pushed {
                reference: "r@sha256:1".into(),
                digest: "sha256:1".into(),
                bytes_sent: 0,
                size: 2,
                gateway: Some(GatewayPushed {
                    push: "app".into(),
                    tag: Some("v1".into()),
                    step: "image".into(),
                }),
            }),
            RunnerEvent::Pulled(Pulled {
                pull: "base".into(),
                digest: "sha256:2".into(),
            }),
            RunnerEvent::Finished(JobEnd::Succeeded),
            RunnerEvent::Finished(JobEnd::Failed("f".into())),
            RunnerEvent::Finished(JobEnd::Cancelled("c".into())),
        ];
        for event in events {
            let wire = proto::Event::from(event.clone());
            assert_eq!(RunnerEvent::try_from(wire), Ok(event));
        }
    }
}
