//! Step output on its way to the daemon, within bounds whatever a step prints.
//!
//! A build's log has a budget (64 MiB by default; each line costs its length
//! plus [`LINE_OVERHEAD`], so a flood of empty lines is bounded too). The
//! first half goes out line by line as it is printed; once it is spent,
//! output is kept back in a window holding the last half, whole chunks at a
//! time (a step printing gigabytes costs a pass of `memchr` per chunk, not
//! work per line). When the job ends, the daemon is told how much was cut
//! from each step ([`RunnerEvent::LogCut`]) and the kept tail follows: the stored
//! log is its head and tail with the cut marked between them. A line longer
//! than [`MAX_LINE`] keeps its first bytes and says how many were dropped.
//! Memory stays within the tail window plus a line per stream.

use std::collections::{BTreeMap, VecDeque};
use std::time::{SystemTime, UNIX_EPOCH};

use custody_wire::events::{LogLine, RunnerEvent, Stream};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;

use crate::EventSink;

/// A build's log budget when the daemon sets none.
pub const DEFAULT_LOG_LIMIT: u64 = 64 << 20;
/// What a line costs beyond its bytes: storing it is not free either.
pub const LINE_OVERHEAD: u64 = 64;
/// The longest line kept whole.
pub const MAX_LINE: usize = 64 * 1024;
/// How much is read from a step's pipe at once; never more than
/// [`MAX_LINE`], so a chunk's complete lines never need cutting.
const CHUNK: usize = 64 * 1024;

/// Output read from one of a step's pipes.
struct Chunk {
    stream: Stream,
    bytes: Vec<u8>,
    unix_millis: i64,
}

/// Complete lines held back in the tail window.
struct Segment {
    step: u32,
    stream: Stream,
    unix_millis: i64,
    /// Whole lines, each ending in `\n`.
    bytes: Vec<u8>,
    lines: u64,
}

impl Segment {
    fn cost(&self) -> u64 {
        self.bytes.len() as u64 + self.lines * LINE_OVERHEAD
    }
}

/// What was cut from one step's output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cut {
    pub lines: u64,
    pub bytes: u64,
}

/// The log of a whole job: steps' output goes through it in order.
pub struct Log {
    events: EventSink,
    /// Budget left for lines sent as they come.
    head_left: u64,
    tail_limit: u64,
    tail: VecDeque<Segment>,
    tail_cost: u64,
    /// Once the head is spent, everything goes to the tail window.
    holding: bool,
    cut: BTreeMap<u32, Cut>,
}

impl Log {
    /// A log of at most `limit` bytes (0: [`DEFAULT_LOG_LIMIT`]) going to `events`.
    pub(crate) fn new(limit: u64, events: EventSink) -> Self {
        let limit = if limit == 0 { DEFAULT_LOG_LIMIT } else { limit };
        Self {
            events,
            head_left: limit / 2,
            tail_limit: limit - limit / 2,
            tail: VecDeque::new(),
            tail_cost: 0,
            holding: false,
            cut: BTreeMap::new(),
        }
    }

    /// Forwards step `step`'s stdout and stderr until both end.
    pub async fn follow(
        &mut self,
        step: u32,
        stdout: impl AsyncRead + Unpin + Send + 'static,
        stderr: impl AsyncRead + Unpin + Send + 'static,
    ) {
        let (chunks, mut incoming) = mpsc::channel(16);
        let readers = [
            tokio::spawn(read(stdout, Stream::Stdout, chunks.clone())),
            tokio::spawn(read(stderr, Stream::Stderr, chunks)),
        ];
        let mut lines = [LineCutter::default(), LineCutter::default()];
        while let Some(chunk) = incoming.recv().await {
            let cutter = &mut lines[chunk.stream.number() as usize];
            self.take(step, cutter, chunk).await;
        }
        for (stream, cutter) in [Stream::Stdout, Stream::Stderr].into_iter().zip(&mut lines) {
            if let Some((line, dropped)) = cutter.finish() {
                self.line(step, stream, line, dropped, now_millis()).await;
            }
        }
        for reader in readers {
            let _ = reader.await;
        }
    }

    /// Sends what was held back: how much was cut from each step, then the
    /// kept tail. Returns the cuts, by step.
    pub async fn finish(mut self) -> BTreeMap<u32, Cut> {
        for (&step, cut) in &self.cut {
            self.events
                .send(RunnerEvent::LogCut {
                    step,
                    lines: cut.lines,
                    bytes: cut.bytes,
                })
                .await;
        }
        while let Some(segment) = self.tail.pop_front() {
            for line in segment.bytes.split_inclusive(|b| *b == b'\n') {
                let line = line.strip_suffix(b"\n").unwrap_or(line);
                self.send(
                    segment.step,
                    segment.stream,
                    line.to_vec(),
                    segment.unix_millis,
                )
                .await;
            }
        }
        self.cut
    }

    /// One chunk of a stream: completes the pending line, passes the
    /// chunk's complete lines on, keeps its unfinished end.
    async fn take(&mut self, step: u32, cutter: &mut LineCutter, chunk: Chunk) {
        let mut rest = chunk.bytes.as_slice();
        if let Some(newline) = memchr::memchr(b'\n', rest) {
            cutter.push(&rest[..newline]);
            let (line, dropped) = cutter.take();
            self.line(step, chunk.stream, line, dropped, chunk.unix_millis)
                .await;
            rest = &rest[newline + 1..];
            if let Some(last) = memchr::memrchr(b'\n', rest) {
                self.block(step, chunk.stream, &rest[..=last], chunk.unix_millis)
                    .await;
                rest = &rest[last + 1..];
            }
        }
        cutter.push(rest);
    }

    /// One line (without its newline); `dropped` bytes were cut off its end.
    async fn line(
        &mut self,
        step: u32,
        stream: Stream,
        mut line: Vec<u8>,
        dropped: u64,
        unix_millis: i64,
    ) {
        if dropped > 0 {
            // The cut may have split a secret: what began of it goes too.
            line = self.events.redact_cut(&line);
            line.extend_from_slice(
                format!(" [custody: {dropped} more bytes of this line were cut]").as_bytes(),
            );
            self.cut.entry(step).or_default().bytes += dropped;
        }
        let cost = line.len() as u64 + LINE_OVERHEAD;
        if !self.holding && cost <= self.head_left {
            self.head_left -= cost;
            self.send(step, stream, line, unix_millis).await;
            return;
        }
        line.push(b'\n');
        self.hold(Segment {
            step,
            stream,
            unix_millis,
            bytes: line,
            lines: 1,
        });
    }

    /// Complete lines, each ending in `\n`.
    async fn block(&mut self, step: u32, stream: Stream, mut block: &[u8], unix_millis: i64) {
        while !self.holding && !block.is_empty() {
            let end = memchr::memchr(b'\n', block).map_or(block.len(), |i| i + 1);
            let line = &block[..end];
            let cost = (line.len() - 1) as u64 + LINE_OVERHEAD;
            if cost > self.head_left {
                self.holding = true;
                break;
            }
            self.head_left -= cost;
            self.send(step, stream, line[..line.len() - 1].to_vec(), unix_millis)
                .await;
            block = &block[end..];
        }
        if !block.is_empty() {
            self.hold(Segment {
                step,
                stream,
                unix_millis,
                lines: memchr::memchr_iter(b'\n', block).count() as u64,
                bytes: block.to_vec(),
            });
        }
    }

    /// Keeps `segment` in the tail window, cutting the oldest lines past
    /// its size: whole segments, then lines off the front of the oldest.
    fn hold(&mut self, segment: Segment) {
        self.holding = true;
        self.tail_cost += segment.cost();
        self.tail.push_back(segment);
        while self.tail_cost > self.tail_limit {
            let excess = self.tail_cost - self.tail_limit;
            let front = self.tail.front_mut().expect("the window is not empty");
            let step = front.step;
            let (lines, bytes) = if front.cost() <= excess {
                let dropped = self.tail.pop_front().expect("the window is not empty");
                (dropped.lines, dropped.bytes.len())
            } else {
                // Just enough whole lines off the front of the oldest.
                let mut removed = 0u64;
                let mut lines = 0u64;
                let mut end = 0usize;
                for newline in memchr::memchr_iter(b'\n', &front.bytes) {
                    removed += (newline + 1 - end) as u64 + LINE_OVERHEAD;
                    lines += 1;
                    end = newline + 1;
                    if removed >= excess {
                        break;
                    }
                }
                front.bytes.drain(..end);
                front.lines -= lines;
                (lines, end)
            };
            self.tail_cost -= bytes as u64 + lines * LINE_OVERHEAD;
            let cut = self.cut.entry(step).or_default();
            cut.lines += lines;
            cut.bytes += bytes as u64;
        }
    }

    async fn send(&self, step: u32, stream: Stream, line: Vec<u8>, unix_millis: i64) {
        self.events
            .send(RunnerEvent::Log(LogLine {
                step,
                stream,
                line,
                unix_millis,
            }))
            .await;
    }
}

/// The unfinished line of one stream, kept to [`MAX_LINE`] bytes.
#[derive(Default)]
struct LineCutter {
    line: Vec<u8>,
    /// Bytes of this line past the limit, dropped.
    dropped: u64,
}

impl LineCutter {
    fn push(&mut self, bytes: &[u8]) {
        let room = MAX_LINE.saturating_sub(self.line.len());
        let kept = bytes.len().min(room);
        self.line.extend_from_slice(&bytes[..kept]);
        self.dropped += (bytes.len() - kept) as u64;
    }

    fn take(&mut self) -> (Vec<u8>, u64) {
        (
            std::mem::take(&mut self.line),
            std::mem::take(&mut self.dropped),
        )
    }

    /// What is left at the end of the stream, if anything.
    fn finish(&mut self) -> Option<(Vec<u8>, u64)> {
        (!self.line.is_empty() || self.dropped > 0).then(|| self.take())
    }
}

async fn read(mut output: impl AsyncRead + Unpin, stream: Stream, chunks: mpsc::Sender<Chunk>) {
    loop {
        let mut bytes = vec![0; CHUNK];
        match output.read(&mut bytes).await {
            Ok(0) | Err(_) => return,
            Ok(n) => bytes.truncate(n),
        }
        let chunk = Chunk {
            stream,
            bytes,
            unix_millis: now_millis(),
        };
        if chunks.send(chunk).await.is_err() {
            return;
        }
    }
}

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` of stdout through a log of `limit` and collects what
    /// the daemon would get.
    async fn through(limit: u64, chunks: Vec<Vec<u8>>) -> (Vec<Vec<u8>>, BTreeMap<u32, Cut>) {
        through_redacted(limit, chunks, None).await
    }

    async fn through_redacted(
        limit: u64,
        chunks: Vec<Vec<u8>>,
        redactor: Option<crate::redact::Redactor>,
    ) -> (Vec<Vec<u8>>, BTreeMap<u32, Cut>) {
        let (events, mut received) = mpsc::channel(1 << 16);
        let mut log = Log::new(limit, EventSink::new(events, redactor));
        let (mut writer, reader) = tokio::io::duplex(1 << 20);
        let feeder = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for chunk in chunks {
                writer.write_all(&chunk).await.unwrap();
            }
        });
        log.follow(0, reader, tokio::io::empty()).await;
        feeder.await.unwrap();
        let cut = log.finish().await;
        let mut lines = Vec::new();
        while let Ok(Ok(event)) = received.try_recv() {
            match RunnerEvent::try_from(event) {
                Ok(RunnerEvent::Log(line)) => lines.push(line.line),
                Ok(RunnerEvent::LogCut { .. }) => lines.push(b"<cut>".to_vec()),
                _ => {}
            }
        }
        (lines, cut)
    }

    #[tokio::test]
    async fn a_flood_keeps_its_head_and_tail_and_says_what_was_cut() {
        let mut text = Vec::new();
        for i in 0..100_000 {
            text.extend_from_slice(format!("line {i:06}\n").as_bytes());
        }
        let limit = 256 << 10;
        let (lines, cut) = through(limit, text.chunks(7000).map(<[u8]>::to_vec).collect()).await;
        assert_eq!(lines[0], b"line 000000");
        assert_eq!(lines.last().unwrap(), b"line 099999");
        let marker = lines
            .iter()
            .position(|l| l == b"<cut>")
            .expect("the cut is marked");
        let kept: u64 = lines
            .iter()
            .filter(|l| *l != b"<cut>")
            .map(|l| l.len() as u64 + LINE_OVERHEAD)
            .sum();
        assert!(kept <= limit, "{kept} > {limit}");
        assert!(kept > limit / 2, "the tail window is used: {kept}");
        // What was cut and what was kept add up, with nothing reordered.
        let cut = cut[&0];
        assert_eq!(cut.lines + lines.len() as u64 - 1, 100_000);
        let kept_bytes: u64 = lines
            .iter()
            .filter(|l| *l != b"<cut>")
            .map(|l| l.len() as u64 + 1)
            .sum();
        assert_eq!(cut.bytes + kept_bytes, text.len() as u64);
        let numbers: Vec<u32> = lines
            .iter()
            .filter(|l| *l != b"<cut>")
            .map(|l| std::str::from_utf8(&l[5..]).unwrap().parse().unwrap())
            .collect();
        assert!(numbers.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(numbers[marker - 1] + 1 + cut.lines as u32, numbers[marker]);
    }

    #[tokio::test]
    async fn a_line_without_end_is_cut_at_the_limit_and_says_so() {
        let long = vec![b'x'; 3 * MAX_LINE + 5];
        let (lines, cut) = through(
            DEFAULT_LOG_LIMIT,
            vec![b"before\n".to_vec(), long, b"\nafter".to_vec()],
        )
        .await;
        assert_eq!(
            lines.len(),
            4,
            "before, the cut line, after, the cut report"
        );
        assert_eq!(lines[0], b"before");
        assert!(lines[1].starts_with(&[b'x'; MAX_LINE]));
        let dropped = (2 * MAX_LINE + 5) as u64;
        assert!(lines[1].ends_with(
            format!("[custody: {dropped} more bytes of this line were cut]").as_bytes()
        ),);
        assert_eq!(lines[2], b"after");
        assert_eq!(lines[3], b"<cut>");
        assert_eq!(
            cut[&0],
            Cut {
                lines: 0,
                bytes: dropped
            }
        );
    }

    /// A line cut at the limit in the middle of a secret keeps none of it.
    #[tokio::test]
    async fn a_secret_cut_with_its_line_leaves_no_beginning() {
        let secret = b"s3cr3t-T0KEN-value";
        let mut line = vec![b'x'; MAX_LINE - 8];
        line.extend_from_slice(secret);
        line.extend_from_slice(b" tail\n");
        let redactor = crate::redact::Redactor::new(&[secret]);
        let (lines, _) = through_redacted(DEFAULT_LOG_LIMIT, vec![line], redactor).await;
        let kept = String::from_utf8_lossy(&lines[0]).into_owned();
        assert!(!kept.contains("s3cr3t"), "{}", &kept[MAX_LINE - 20..]);
        assert!(
            kept.contains("xxxx*** [custody: 15 more bytes of this line were cut]"),
            "{}",
            &kept[MAX_LINE - 20..]
        );
    }

    /// A secret a step prints a byte at a time, each byte its own read of
    /// the pipe, is still masked: lines are joined before they are sent.
    #[tokio::test]
    async fn a_secret_split_across_reads_is_masked() {
        let secret = b"s3cr3t-T0KEN-value";
        let mut chunks: Vec<Vec<u8>> = vec![b"before ".to_vec()];
        chunks.extend(secret.iter().map(|b| vec![*b]));
        chunks.push(b" after\nnext line\n".to_vec());
        let redactor = crate::redact::Redactor::new(&[secret]);
        let (lines, _) = through_redacted(DEFAULT_LOG_LIMIT, chunks, redactor).await;
        assert_eq!(lines[0], b"before *** after");
        assert_eq!(lines[1], b"next line");
    }
}
