//! The worker's end of the control link: take over what the supervisor hands over before
//! the daemon starts, then answer its requests (a planned upgrade) while it runs.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;

use super::SupervisorError;
use super::control::{self, ATTACH, DONE, LISTEN, RAM, START, UPGRADE};
use super::handover::{self, HandedMemory};

/// The worker's control link.
#[derive(Debug)]
pub struct WorkerLink {
    ctl: UnixStream,
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
    /// The supervisor is gone: the client connections went with it.
    SupervisorGone,
}

impl WorkerLink {
    /// Take the inherited descriptor `fd` and receive every socket's fds until START.
    pub fn take(fd: i32) -> Result<Self, SupervisorError> {
        let ctl = UnixStream::from(sys_util::fd::take_inherited(fd).map_err(SupervisorError::Io)?);
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
                START => return Ok(Self { ctl }),
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
        control::send(&self.ctl, DONE, &json!({"pid": std::process::id()}), &[])
            .map_err(SupervisorError::Io)
    }

    /// Look for a request, waiting up to `wait`. A socket, listener or RAM handed over at run
    /// time (for a call to come) is taken and acknowledged here.
    pub fn poll(&self, wait: Duration) -> Asked {
        match control::recv(&self.ctl, wait) {
            Ok(None) => Asked::Nothing,
            Ok(Some(m)) if m.command == UPGRADE => Asked::Upgrade,
            Ok(Some(m)) if [ATTACH, LISTEN, RAM].contains(&m.command) => {
                let ok = take_fds(m).map_err(|e| e.to_string());
                if let Err(e) = &ok {
                    log::warn!("worker: {e}");
                }
                let _ = control::send(&self.ctl, DONE, &json!({"ok": ok.is_ok()}), &[]);
                Asked::Nothing
            }
            Ok(Some(m)) => {
                log::warn!("worker: ignoring control command {:#x}", m.command);
                Asked::Nothing
            }
            Err(_) => Asked::SupervisorGone,
        }
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
        let _ = control::send(
            &self.ctl,
            DONE,
            &json!({"drained": drained, "total": total}),
            &[],
        );
    }
}
