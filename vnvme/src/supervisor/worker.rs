//! The worker's end of the control link: take over what the supervisor hands over before
//! the daemon starts, then answer its requests (a planned upgrade) while it runs.

use std::cell::Cell;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;

use super::SupervisorError;
use super::control::{self, ATTACH, CONFIG, FORGET, KEEP, LISTEN, RAM, SETTLE, START, UPGRADE};
use super::handover::{self, HandedMemory};
use super::kept_connections;

/// The worker's control link.
#[derive(Debug)]
pub struct WorkerLink {
    ctl: UnixStream,
    /// START's number, which the answer once ready carries.
    start: u16,
    /// UPGRADE's number, once asked.
    upgrade: Cell<u16>,
    /// SETTLE's number, once asked.
    settle: Cell<u16>,
    /// The supervisor's configuration (`CONFIG`; none from a supervisor of an earlier build).
    config: Option<String>,
}

/// Most bytes of a configuration handed over.
const MAX_CONFIG: u64 = 16 << 20;

/// The configuration text of a `CONFIG` message.
fn read_config(m: control::Control) -> Result<String, SupervisorError> {
    let bad = |why: &str| SupervisorError::Protocol(format!("CONFIG: {why}"));
    let len = m.body.get("len").and_then(serde_json::Value::as_u64);
    let len = len
        .filter(|&n| n <= MAX_CONFIG)
        .ok_or_else(|| bad("no usable len"))?;
    let fd = m.fds.into_iter().next().ok_or_else(|| bad("no memfd"))?;
    let mut text = vec![0; len as usize];
    std::fs::File::from(fd)
        .read_exact_at(&mut text, 0)
        .map_err(SupervisorError::Io)?;
    String::from_utf8(text).map_err(|_| bad("not UTF-8"))
}

/// Let go of kept RAM a `FORGET` names, unless a namespace took it already.
fn forget(m: &control::Control) {
    if let Some(key) = m.body.get("key").and_then(serde_json::Value::as_str) {
        handover::kept_ram(key);
    }
}

/// Keep the fds of an ATTACH (a vfio-user socket's link, BAR0 memfd and state memfd), a
/// LISTEN (an NVMe/TCP listener) or a RAM (a kept RAM memfd) for the builder of that
/// controller or namespace.
fn take_fds(m: control::Control) -> Result<(), SupervisorError> {
    let text = |k: &str| m.body.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    if m.command == RAM {
        let key = text("key").ok_or_else(|| SupervisorError::Protocol("RAM without key".into()))?;
        let Some(fd) = m.fds.into_iter().next() else {
            return Err(SupervisorError::Protocol("RAM without its fd".into()));
        };
        handover::offer_ram(key, fd);
        return Ok(());
    }
    if m.command == LISTEN {
        let addr =
            text("addr").ok_or_else(|| SupervisorError::Protocol("LISTEN without addr".into()))?;
        let Some(fd) = m.fds.into_iter().next() else {
            return Err(SupervisorError::Protocol("LISTEN without its fd".into()));
        };
        handover::offer_listener(addr, fd);
        return Ok(());
    }
    let socket = text("socket")
        .map(PathBuf::from)
        .ok_or_else(|| SupervisorError::Protocol("ATTACH without socket".into()))?;
    let mut fds = m.fds.into_iter();
    let (Some(link), Some(doorbells), Some(state)) = (fds.next(), fds.next(), fds.next()) else {
        return Err(SupervisorError::Protocol("ATTACH with missing fds".into()));
    };
    handover::offer(
        socket,
        UnixStream::from(link),
        HandedMemory { doorbells, state },
        m.body.get("run_time").and_then(serde_json::Value::as_bool) == Some(true),
    );
    Ok(())
}

/// What the supervisor asked.
#[derive(Debug, PartialEq, Eq)]
pub enum Asked {
    Nothing,
    /// Hold, drain, save, answer and exit.
    Upgrade,
    /// Put the subsystems' namespaces back as saved ([`WorkerLink::settled`] answers).
    Settle,
    /// The supervisor is gone: the client connections went with it.
    SupervisorGone,
}

impl WorkerLink {
    /// Take the inherited descriptor `fd` and receive every socket's fds until START.
    pub fn take(fd: i32) -> Result<Self, SupervisorError> {
        let ctl = UnixStream::from(sys_util::fd::take_inherited(fd).map_err(SupervisorError::Io)?);
        let mut config = None;
        loop {
            let Some(m) =
                control::recv(&ctl, Duration::from_secs(10)).map_err(SupervisorError::Io)?
            else {
                return Err(SupervisorError::Protocol(
                    "no START from the supervisor".into(),
                ));
            };
            match m.command {
                ATTACH | LISTEN | RAM => take_fds(m)?,
                CONFIG => config = Some(read_config(m)?),
                FORGET => forget(&m),
                START => {
                    // the supervisor will ask to settle after its replay: keep namespaces
                    handover::set_settles(m.body.get("settle") == Some(&json!(true)));
                    // and will send KEEP: accepted connections wait for it
                    kept_connections::expect_keeper(m.body.get("keep") == Some(&json!(true)));
                    return Ok(Self {
                        ctl,
                        start: m.id,
                        upgrade: Cell::new(0),
                        settle: Cell::new(0),
                        config,
                    });
                }
                c => {
                    return Err(SupervisorError::Protocol(format!(
                        "unexpected command {c:#x}"
                    )));
                }
            }
        }
    }

    /// The daemon is up: tell the supervisor.
    pub fn ready(&self) -> Result<(), SupervisorError> {
        for s in handover::unclaimed() {
            log::warn!(
                "worker: {} was handed over but is not configured",
                s.display()
            );
        }
        let body = json!({"pid": std::process::id(), "settle": true});
        control::answer(&self.ctl, self.start, &body).map_err(SupervisorError::Io)
    }

    /// The daemon did not start: tell the supervisor why (it reports it as its own error),
    /// instead of being ready.
    pub fn failed(&self, why: &str) {
        // a supervisor of an earlier build (it numbers no request) would take any answer for
        // ready: it gets none, and sees the link close, as before
        if self.start != 0 {
            let _ = control::answer(&self.ctl, self.start, &json!({"error": why}));
        } else {
            eprintln!("vnvme: error: {why}");
        }
    }

    /// The configuration the supervisor handed over, if it did (TOML).
    pub fn config(&self) -> Option<&str> {
        self.config.as_deref()
    }

    /// Look for a request, waiting up to `wait`. A socket, listener or RAM handed over at run
    /// time (for a call to come) is taken and acknowledged here.
    pub fn poll(&self, wait: Duration) -> Asked {
        match control::recv(&self.ctl, wait) {
            Ok(None) => Asked::Nothing,
            Ok(Some(m)) if m.command == UPGRADE => {
                self.upgrade.set(m.id);
                Asked::Upgrade
            }
            Ok(Some(m)) if m.command == SETTLE => {
                self.settle.set(m.id);
                Asked::Settle
            }
            Ok(Some(m)) if m.command == FORGET => {
                forget(&m);
                Asked::Nothing
            }
            Ok(Some(m)) if m.command == KEEP => {
                match m.fds.into_iter().next() {
                    Some(fd) => kept_connections::set_keeper(fd),
                    None => log::warn!("worker: KEEP without its fd"),
                }
                Asked::Nothing
            }
            Ok(Some(m)) if [ATTACH, LISTEN, RAM].contains(&m.command) => {
                let id = m.id;
                let ok = take_fds(m).map_err(|e| e.to_string());
                if let Err(e) = &ok {
                    log::warn!("worker: {e}");
                }
                let _ = control::answer(&self.ctl, id, &json!({"ok": ok.is_ok()}));
                Asked::Nothing
            }
            Ok(Some(m)) => {
                log::warn!("worker: ignoring control command {:#x}", m.command);
                Asked::Nothing
            }
            Err(_) => Asked::SupervisorGone,
        }
    }

    /// The subsystems are settled (`what`, for the supervisor's log): answer SETTLE.
    pub fn settled(&self, what: &serde_json::Value) {
        let _ = control::answer(&self.ctl, self.settle.get(), what);
    }

    /// A planned upgrade: hold and drain every controller, save their state, answer. The
    /// caller exits right after.
    pub fn upgrade(&self) {
        let t = std::time::Instant::now();
        let (drained, total) = handover::drain_all(Duration::from_secs(3));
        log::info!(
            "worker: {drained}/{total} controllers drained and saved in {} ms; exiting for the upgrade",
            t.elapsed().as_millis()
        );
        let _ = control::answer(
            &self.ctl,
            self.upgrade.get(),
            &json!({"drained": drained, "total": total}),
        );
    }
}
