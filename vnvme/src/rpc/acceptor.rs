//! Accepting management clients: each on a thread of its own, a bounded number at once, so
//! that a caller which connects and sends nothing (or trickles a byte at a time) holds its
//! own thread and nothing else. Used by the daemon's socket and the supervisor's.

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use qemu_vfio_user::server::socket_path::OwnedSocketPath;
use serde_json::Value;

use super::response;
use super::{RpcError, code};

/// How long the "busy" answer may take to write.
const BUSY_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// The thread accepting on a management socket; stopped, and the socket removed, on drop.
pub(crate) struct Acceptor {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    owned: OwnedSocketPath,
}

impl Acceptor {
    /// Accept on `listener` (bound at `owned`) until dropped. `serve` runs each client on a
    /// thread of its own, at most `max` at once; the next one is answered "busy" and closed.
    /// `name` names the threads and the log lines.
    pub(crate) fn start(
        name: &'static str,
        listener: UnixListener,
        owned: OwnedSocketPath,
        max: usize,
        serve: impl Fn(UnixStream) -> std::io::Result<()> + Send + Sync + 'static,
    ) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || accept_loop(name, &listener, max, &Arc::new(serve), &stop2))?;
        Ok(Self {
            stop,
            thread: Some(thread),
            owned,
        })
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.owned.remove();
    }
}

fn accept_loop<F>(
    name: &'static str,
    listener: &UnixListener,
    max: usize,
    serve: &Arc<F>,
    stop: &AtomicBool,
) where
    F: Fn(UnixStream) -> std::io::Result<()> + Send + Sync + 'static,
{
    let clients = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Relaxed) {
        if !sys_util::poll::wait_readable(listener, Duration::from_millis(100)).unwrap_or(false) {
            continue;
        }
        while let Ok((stream, _)) = listener.accept() {
            if clients.fetch_add(1, Ordering::AcqRel) >= max {
                clients.fetch_sub(1, Ordering::AcqRel);
                device_model::warn_limited!("{name}: {max} clients already; refusing another");
                busy(&stream);
                continue;
            }
            let (serve, n) = (Arc::clone(serve), Arc::clone(&clients));
            let spawned = std::thread::Builder::new()
                .name(format!("{name}-client"))
                .spawn(move || {
                    if let Err(e) = serve(stream) {
                        log::debug!("{name} client: {e}");
                    }
                    n.fetch_sub(1, Ordering::AcqRel);
                });
            if let Err(e) = spawned {
                clients.fetch_sub(1, Ordering::AcqRel);
                log::warn!("{name}: no thread for a client: {e}");
            }
        }
    }
}

/// Tell a client over the limit why it is closed.
fn busy(mut stream: &UnixStream) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(BUSY_WRITE_TIMEOUT));
    let v = response(
        &Value::Null,
        Err(RpcError::new(
            code::REFUSED,
            "busy: too many management clients at once",
        )),
    );
    let _ = stream.write_all(format!("{v}\n").as_bytes());
}
