//! The supervisor's management socket: `daemon_upgrade` and `daemon_status` are answered
//! here; every other method is forwarded to the worker's socket (`RPC.worker`), line for line.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use qemu_vfio_user::server::socket_path::OwnedSocketPath;
use serde_json::{Value, json};

use super::{Supervisor, SupervisorError};
use crate::rpc::{MAX_REQUEST, code};

pub(super) struct SupervisorRpc {
    listener: UnixListener,
    owned: OwnedSocketPath,
}

impl SupervisorRpc {
    pub(super) fn bind(path: &Path) -> Result<Self, SupervisorError> {
        let (listener, owned) = OwnedSocketPath::bind(path)
            .map_err(|e| SupervisorError::Io(std::io::Error::other(e)))?;
        listener
            .set_nonblocking(true)
            .map_err(SupervisorError::Io)?;
        Ok(Self { listener, owned })
    }

    pub(super) fn poll(&self, sup: &mut Supervisor, wait: Duration) {
        if !sys_util::poll::wait_readable(&self.listener, wait).unwrap_or(false) {
            return;
        }
        while let Ok((s, _)) = self.listener.accept() {
            if let Err(e) = serve(&s, sup) {
                log::debug!("supervisor rpc client: {e}");
            }
        }
    }
}

impl Drop for SupervisorRpc {
    fn drop(&mut self) {
        self.owned.remove();
    }
}

fn serve(s: &UnixStream, sup: &mut Supervisor) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut reader = BufReader::new(s).take(MAX_REQUEST as u64 + 1);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(());
    }
    let req: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
    let id = req.get("id").cloned().unwrap_or(Value::Null);
    let method = req
        .get("method")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let answer = match method {
        "daemon_status" => json!({"jsonrpc": "2.0", "id": id, "result": sup.status().json()}),
        "daemon_upgrade" => {
            let binary = req
                .get("params")
                .and_then(|p| p.get("binary"))
                .and_then(Value::as_str)
                .map(PathBuf::from);
            match binary.as_ref().filter(|b| !b.is_file()) {
                Some(b) => refused(&id, &format!("{} is not a file", b.display())),
                None => match sup.upgrade(binary) {
                    Ok(r) => json!({"jsonrpc": "2.0", "id": id, "result": r}),
                    Err(e) => refused(&id, &e.to_string()),
                },
            }
        }
        m if NOT_CARRIED.contains(&m) => refused(
            &id,
            &format!(
                "{m}: refused under --supervised: the next worker (after an upgrade or a crash) \
                 starts from the configuration and would lose it; put it in the configuration"
            ),
        ),
        _ => match sup.worker_rpc().map(|p| forward(p, &line)) {
            Some(Ok(reply)) => {
                let mut w = s;
                w.write_all(reply.as_bytes())?;
                return Ok(());
            }
            Some(Err(e)) => refused(&id, &format!("the worker did not answer: {e}")),
            None => refused(&id, "no management socket in the worker"),
        },
    };
    let mut w = s;
    w.write_all(format!("{answer}\n").as_bytes())
}

/// Management calls whose effect lives only in the worker's memory (namespaces, subsystems,
/// VFs, stores and arrays made or removed at run time): a replaced worker would lose it and
/// the guest would see a namespace vanish, so the supervisor refuses them. Calls whose effect
/// is on disk (volumes of a configured store) or carried in the state memfd (`qos_set`) go
/// through.
const NOT_CARRIED: &[&str] = &[
    "subsystem_create",
    "subsystem_delete",
    "ns_create",
    "ns_delete",
    "ns_add",
    "ns_attach",
    "ns_detach",
    "vf_enable",
    "lvs_create",
    "lvs_delete",
    "raid_create",
    "raid_delete",
];

fn refused(id: &Value, msg: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code::REFUSED, "message": msg}})
}

fn forward(path: &Path, line: &str) -> std::io::Result<String> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_mins(1)))?;
    s.write_all(line.as_bytes())?;
    if !line.ends_with('\n') {
        s.write_all(b"\n")?;
    }
    let mut reply = String::new();
    BufReader::new(&s).read_line(&mut reply)?;
    Ok(reply)
}
