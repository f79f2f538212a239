//! Blob byte streams that check themselves.
//!
//! Every stream a source hands out is *verified*: it hashes the bytes as they
//! pass and holds back its final chunk until the digest and size match, so a
//! consumer (an upload, a file being written) never sees the end of a blob
//! whose bytes are wrong, and the registry never commits it.

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use oci_spec::image::Descriptor;

use crate::Error;
use crate::digest::Hasher;

pub type BlobStream = Pin<Box<dyn Stream<Item = Result<Bytes, Error>> + Send>>;

const CHUNK: usize = 256 * 1024;

/// Streams `len` bytes at `offset` of the file `open` returns (the whole
/// file when `range` is `None`), read and hashed on a blocking thread so
/// hashing never stalls the runtime, with a few chunks in flight for
/// read-ahead. Reads are positional, so streams may share one file.
pub fn from_file(
    open: impl FnOnce() -> Result<Arc<std::fs::File>, Error> + Send + 'static,
    range: Option<(u64, u64)>,
    descriptor: Descriptor,
) -> BlobStream {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Error>>(4);
    tokio::task::spawn_blocking(move || {
        let result = (|| -> Result<(), Error> {
            let file = open()?;
            let (offset, len) = range.unwrap_or((0, descriptor.size()));
            // A whole file is read one byte past the expected end, so a longer
            // file is noticed; a range is exactly its bytes.
            let limit = if range.is_some() {
                len
            } else {
                len.saturating_add(1)
            };
            let mut reader = Positional {
                file: &file,
                at: offset,
            }
            .take(limit);
            let mut hasher = Hasher::for_digest(descriptor.digest())?;
            let mut held: Option<Bytes> = None;
            let mut total = 0u64;
            loop {
                let mut buf = vec![0; CHUNK];
                let mut filled = 0;
                while filled < CHUNK {
                    let n = reader.read(&mut buf[filled..]).map_err(Error::Read)?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                if filled == 0 {
                    break;
                }
                buf.truncate(filled);
                hasher.update(&buf);
                total += filled as u64;
                if let Some(previous) = held.replace(Bytes::from(buf))
                    && tx.blocking_send(Ok(previous)).is_err()
                {
                    return Ok(()); // the consumer gave up
                }
            }
            crate::layout::check_written(&descriptor, total, hasher.finish())?;
            if let Some(last) = held {
                let _ = tx.blocking_send(Ok(last));
            }
            Ok(())
        })();
        if let Err(err) = result {
            let _ = tx.blocking_send(Err(err));
        }
    });
    Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

/// A reader at a position of a shared file.
struct Positional<'a> {
    file: &'a std::fs::File,
    at: u64,
}

impl Read for Positional<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

/// Wraps a stream from elsewhere (a registry) so that it verifies itself.
pub fn verified<S>(inner: S, descriptor: Descriptor) -> BlobStream
where
    S: Stream<Item = Result<Bytes, Error>> + Send + 'static,
{
    struct State<S> {
        inner: Pin<Box<S>>,
        hasher: Option<Hasher>,
        held: Option<Bytes>,
        total: u64,
        descriptor: Descriptor,
    }
    let hasher = match Hasher::for_digest(descriptor.digest()) {
        Ok(h) => h,
        Err(err) => return Box::pin(futures_util::stream::once(async { Err(err) })),
    };
    let state = State {
        inner: Box::pin(inner),
        hasher: Some(hasher),
        held: None,
        total: 0,
        descriptor,
    };
    Box::pin(futures_util::stream::unfold(
        state,
        |mut state| async move {
            let hasher = state.hasher.as_mut()?;
            loop {
                match state.inner.next().await {
                    Some(Ok(chunk)) => {
                        if chunk.is_empty() {
                            continue;
                        }
                        hasher.update(&chunk);
                        state.total += chunk.len() as u64;
                        if state.total > state.descriptor.size() {
                            state.hasher = None;
                            let err = Error::SizeMismatch {
                                digest: state.descriptor.digest().clone(),
                                expected: state.descriptor.size(),
                                actual: state.total,
                            };
                            return Some((Err(err), state));
                        }
                        if let Some(previous) = state.held.replace(chunk) {
                            return Some((Ok(previous), state));
                        }
                    }
                    Some(Err(err)) => {
                        state.hasher = None;
                        return Some((Err(err), state));
                    }
                    None => {
                        let hasher = state.hasher.take()?;
                        return match crate::layout::check_written(
                            &state.descriptor,
                            state.total,
                            hasher.finish(),
                        ) {
                            Ok(()) => state.held.take().map(|last| (Ok(last), state)),
                            Err(err) => Some((Err(err), state)),
                        };
                    }
                }
            }
        },
    ))
}

/// Counts bytes as they pass, for progress displays.
pub fn counted(inner: BlobStream, on_bytes: impl Fn(u64) + Send + Sync + 'static) -> BlobStream {
    Box::pin(inner.inspect(move |item| {
        if let Ok(chunk) = item {
            on_bytes(chunk.len() as u64);
        }
    }))
}

/// Where an upload body's own error is kept: the HTTP client only reports
/// that the body failed, and the user needs to know why (a digest mismatch).
#[derive(Clone, Default)]
pub struct ErrorSlot(Arc<Mutex<Option<Error>>>);

impl ErrorSlot {
    pub fn body(&self, stream: BlobStream) -> reqwest::Body {
        let slot = self.clone();
        reqwest::Body::wrap_stream(stream.map(move |item| {
            item.map_err(|err| {
                let message = err.to_string();
                *slot.0.lock().expect("error slot lock") = Some(err);
                std::io::Error::other(message)
            })
        }))
    }

    pub fn take(&self) -> Option<Error> {
        self.0.lock().expect("error slot lock").take()
    }
}
