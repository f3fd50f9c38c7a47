//! A management socket spoken to directly, one request line at a time.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

/// Send `line` (as it is: garbage, over-long, newline or not) to the management socket
/// `sock` and parse the answer line, waiting at most `wait` for it.
pub fn raw(sock: &Path, line: &[u8], wait: Duration) -> Value {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    // the daemon may answer and hang up before a too-long line is all written
    let _ = s.write_all(line);
    let mut answer = String::new();
    BufReader::new(&s).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
}
