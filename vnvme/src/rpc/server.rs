//! The RPC socket: accept, read request lines, answer each.
//!
//! Clients are read on threads of their own (a few at once); only whole request lines
//! reach the daemon's main thread, which runs them one at a time. A caller that connects
//! and sends nothing, or trickles a byte at a time, holds its own thread and nothing else:
//! the main thread (management, a supervised worker's upgrade, shutdown) never waits for it.

use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender};

use qemu_vfio_user::server::socket_path::{ClaimError, OwnedSocketPath};
use std::time::Duration;

use serde_json::{Value, json};

use super::acceptor::Acceptor;
use super::request_lines::{Line, RequestLines};
use super::{RpcError, code, methods, response};
use crate::daemon::Daemon;

/// A client that sends nothing for this long is dropped.
const IDLE: Duration = Duration::from_secs(2);
/// Clients served at once; more are answered "busy" and closed.
const MAX_CLIENTS: usize = 16;

/// One request line for the main thread, and where its response goes.
struct Job {
    line: Vec<u8>,
    reply: Sender<String>,
}

/// The listening management socket.
pub struct RpcServer {
    jobs: Receiver<Job>,
    _acceptor: Acceptor,
}

impl std::fmt::Debug for RpcServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcServer").finish_non_exhaustive()
    }
}

impl RpcServer {
    /// Listen on `path`: a stale socket file there is replaced, a live daemon's refused.
    pub fn bind(path: &Path) -> Result<Self, ClaimError> {
        let (listener, owned) = OwnedSocketPath::bind(path)?;
        let (tx, jobs) = mpsc::channel();
        let acceptor = Acceptor::start("rpc", listener, owned, MAX_CLIENTS, move |s| serve(s, &tx))
            .map_err(|source| ClaimError::Bind {
                path: path.into(),
                source,
            })?;
        Ok(Self {
            jobs,
            _acceptor: acceptor,
        })
    }

    /// Wait up to `timeout` for requests and answer them; true when one was answered (the
    /// daemon may have changed).
    pub fn poll(&self, daemon: &mut Daemon, timeout: Duration) -> bool {
        let Ok(first) = self.jobs.recv_timeout(timeout) else {
            return false;
        };
        let mut next = Some(first);
        while let Some(job) = next {
            let _ = job.reply.send(answer(&job.line, daemon));
            next = self.jobs.try_recv().ok();
        }
        true
    }
}

/// Read `stream`'s request lines and hand each to the main thread; write the responses.
fn serve(stream: UnixStream, jobs: &Sender<Job>) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IDLE))?;
    stream.set_write_timeout(Some(IDLE))?;
    let mut out = stream.try_clone()?;
    let mut lines = RequestLines::new(BufReader::new(stream));
    loop {
        let line = match lines.next_request()? {
            None => return Ok(()),
            Some(Line::TooLong) => {
                return respond(
                    &mut out,
                    &Value::Null,
                    Err(RpcError::new(
                        code::INVALID_REQUEST,
                        "request longer than 1 MiB",
                    )),
                );
            }
            Some(Line::Request(line)) => line,
        };
        let (tx, rx) = mpsc::channel();
        if jobs.send(Job { line, reply: tx }).is_err() {
            return Ok(()); // the daemon is stopping
        }
        // management calls may run long (an inflate copies a volume)
        let Ok(mut text) = rx.recv() else {
            return Ok(());
        };
        text.push('\n');
        out.write_all(text.as_bytes())?;
    }
}

/// Answer one request line: its id and the result.
pub(crate) fn handle(line: &[u8], daemon: &mut Daemon) -> (Value, Result<Value, RpcError>) {
    let req: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => {
            return (
                Value::Null,
                Err(RpcError::new(code::PARSE_ERROR, format!("not JSON: {e}"))),
            );
        }
    };
    let id = req.get("id").cloned().unwrap_or(Value::Null);
    let Some(method) = req.get("method").and_then(Value::as_str) else {
        return (
            id,
            Err(RpcError::new(code::INVALID_REQUEST, "no \"method\" string")),
        );
    };
    let params = req.get("params").cloned().unwrap_or(json!({}));
    if !params.is_object() {
        return (
            id,
            Err(RpcError::new(
                code::INVALID_PARAMS,
                "\"params\" must be an object",
            )),
        );
    }
    log::info!("rpc: {method} {params}");
    (id, methods::call(daemon, method, &params))
}

/// Answer one request line as the socket would: the response line (without newline).
pub fn answer(line: &[u8], daemon: &mut Daemon) -> String {
    let (id, r) = handle(line, daemon);
    response(&id, r).to_string()
}

fn respond(out: &mut impl Write, id: &Value, r: Result<Value, RpcError>) -> std::io::Result<()> {
    let mut text = response(id, r).to_string();
    text.push('\n');
    out.write_all(text.as_bytes())
}
