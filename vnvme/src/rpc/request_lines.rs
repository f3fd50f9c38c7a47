//! The request lines of a management connection, for the daemon's socket and the
//! supervisor's alike: one request per line, blank lines skipped, each request whole within
//! [`LINE_DEADLINE`] of the last answer (blank lines do not restart it, so they cannot hold
//! a slot), at most [`MAX_REQUEST`] bytes.

use std::io::{BufRead, Take};
use std::time::{Duration, Instant};

use super::MAX_REQUEST;

/// A request line must arrive whole within this of the last answer (or of the connection).
pub(crate) const LINE_DEADLINE: Duration = Duration::from_secs(5);

/// What [`RequestLines::next`] found.
pub(crate) enum Line {
    /// A request (not blank).
    Request(Vec<u8>),
    /// A line longer than [`MAX_REQUEST`]: answer it and close (where the next line starts
    /// is unknown).
    TooLong,
}

/// The request lines read from a connection.
pub(crate) struct RequestLines<R> {
    reader: Take<R>,
    deadline: Instant,
    /// A request was handed out: the next call comes after its answer.
    answering: bool,
}

impl<R: BufRead> RequestLines<R> {
    pub(crate) fn new(reader: R) -> Self {
        Self {
            reader: reader.take(MAX_REQUEST as u64 + 1),
            deadline: Instant::now() + LINE_DEADLINE,
            answering: false,
        }
    }

    /// The next request, once the last one (if any) was answered; `None` when the client
    /// closed. An error when the socket's read fails or times out, or the deadline passes.
    pub(crate) fn next_request(&mut self) -> std::io::Result<Option<Line>> {
        if std::mem::take(&mut self.answering) {
            // the last request is answered (which may have taken long): this one's time
            // starts now
            self.deadline = Instant::now() + LINE_DEADLINE;
        }
        loop {
            let mut line = Vec::new();
            if read_line(&mut self.reader, &mut line, self.deadline)? == 0 {
                return Ok(None);
            }
            if line.len() > MAX_REQUEST {
                return Ok(Some(Line::TooLong));
            }
            self.reader.set_limit(MAX_REQUEST as u64 + 1);
            if !line.iter().all(u8::is_ascii_whitespace) {
                self.answering = true;
                return Ok(Some(Line::Request(line)));
            }
        }
    }
}

/// `read_until(b'\n')` that gives up at `deadline` (checked between the socket's reads,
/// each of which waits at most the socket's read timeout).
fn read_line(
    reader: &mut impl BufRead,
    line: &mut Vec<u8>,
    deadline: Instant,
) -> std::io::Result<usize> {
    let mut n = 0;
    loop {
        if Instant::now() > deadline {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "request line not finished in time",
            ));
        }
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(n);
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        line.extend_from_slice(&buf[..take]);
        reader.consume(take);
        n += take;
        if done {
            return Ok(n);
        }
    }
}
