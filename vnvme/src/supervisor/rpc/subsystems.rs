//! `subsystem_create` and `subsystem_delete` under a supervisor. What QEMU or a host holds
//! the other end of, the supervisor owns from before the worker makes the subsystem, as for
//! a configured one: a vfio-user controller's socket (and its memfds), an NVMe/TCP export's
//! listener, the RAM of `malloc:` namespaces. It hands them to the worker, and to every
//! next worker before the call is replayed to it.

use std::path::PathBuf;
use std::sync::PoisonError;
use std::sync::mpsc;

use serde_json::{Value, json};

use super::{Ask, Shared, ask, forward, keep_ram, keys_in, refused, wait, write};

/// A subsystem made at run time.
pub(in crate::supervisor) struct Made {
    nqn: String,
    /// Its vfio-user sockets: the controller's (the PF's), then each VF's.
    sockets: Vec<PathBuf>,
    /// Its NVMe/TCP address (`tcp_listen`), if it has one.
    listen: Option<String>,
    /// The request line kept in the change list.
    line: String,
}

/// `subsystem_create`: a vfio-user controller (with its VFs) and/or an NVMe/TCP export, and
/// an NVMe/RDMA export (which each worker listens for itself); a pool as `check` allows.
pub(super) fn create(sh: &Shared, req: &Value, id: &Value) -> Value {
    let p = req.get("params").cloned().unwrap_or(Value::Null);
    let pool = p.get("namespace_pool").filter(|v| !v.is_null());
    if let Some(pool) = pool {
        let has_socket = p.get("socket").is_some_and(|v| !v.is_null());
        let why = match pool.as_str() {
            Some(s) => crate::supervisor::pool_refusal(Some(s), has_socket),
            None => Some("namespace_pool: a string".into()),
        };
        if let Some(why) = why {
            return refused(id, &format!("subsystem_create: {why}"));
        }
    }
    let vfs = match p.get("vfs") {
        None | Some(Value::Null) => 0,
        Some(v) => match v.as_u64().filter(|&n| n <= crate::config::MAX_VFS) {
            Some(n) => n as usize,
            None => {
                return refused(
                    id,
                    &format!("subsystem_create: vfs: 0..={}", crate::config::MAX_VFS),
                );
            }
        },
    };
    let socket = p.get("socket").and_then(Value::as_str).map(PathBuf::from);
    let listen = p
        .get("tcp_listen")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let rdma = p.get("rdma_listen").is_some_and(|v| !v.is_null());
    if socket.is_none() && listen.is_none() && !rdma {
        return refused(
            id,
            "subsystem_create without a vfio-user \"socket\", a \"tcp_listen\" or an \
             \"rdma_listen\" address is refused under --supervised",
        );
    }
    let Some(worker) = sh.worker_rpc.as_ref() else {
        return refused(id, "no management socket in the worker");
    };
    // RAM, socket and listener first (the supervisor's loop may be replaying the changes to
    // a new worker: never wait for it holding their lock); a worker started meanwhile gets
    // them too
    let (_, line, kept) = match keep_ram(sh, req.clone()) {
        Ok(k) => k,
        Err(e) => return refused(id, &format!("subsystem_create: {e}")),
    };
    let mut made = Made {
        nqn: String::new(),
        sockets: Vec::new(),
        listen: None,
        line,
    };
    // the PF's socket, then each VF's (`sriov::topology::vf_socket`)
    let sockets = socket.iter().flat_map(|s| {
        std::iter::once(s.clone()).chain((1..=vfs).map(|n| sriov::topology::vf_socket(s, n)))
    });
    for s in sockets.collect::<Vec<_>>() {
        let (tx, rx) = mpsc::channel();
        if let Err(e) = ask(sh, Ask::Attach(s.clone(), tx)).and_then(|()| wait(&rx)?) {
            let_go(sh, &made, kept);
            return refused(id, &format!("subsystem_create: {e}"));
        }
        made.sockets.push(s);
    }
    if let Some(a) = listen {
        let (tx, rx) = mpsc::channel();
        if let Err(e) = ask(sh, Ask::Listen(a.clone(), tx)).and_then(|()| wait(&rx)?) {
            let_go(sh, &made, kept);
            return refused(id, &format!("subsystem_create: tcp_listen {a}: {e}"));
        }
        made.listen = Some(a);
    }
    let mut changes = write(&sh.changes);
    let reply = forward(worker, made.line.as_bytes())
        .ok()
        .and_then(|r| serde_json::from_str::<Value>(&r).ok());
    let nqn = reply
        .as_ref()
        .and_then(|r| r.get("result")?.get("nqn")?.as_str())
        .map(str::to_owned);
    match (reply, nqn) {
        (Some(r), Some(nqn)) => {
            changes.lines.push(made.line.clone());
            made.nqn = nqn;
            sh.made
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(made);
            r
        }
        (r, _) => {
            drop(changes);
            let_go(sh, &made, kept);
            r.unwrap_or_else(|| refused(id, "the worker did not answer"))
        }
    }
}

/// Have the supervisor's loop let go of what it held for subsystem `made` (refused, or
/// deleted): its relay closes the client's connection and removes the socket, the listener
/// closes, the RAM `kept` for it goes.
fn let_go(sh: &Shared, made: &Made, kept: Vec<String>) {
    for s in &made.sockets {
        let (tx, rx) = mpsc::channel();
        let _ = ask(sh, Ask::Detach(s.clone(), tx)).and_then(|()| wait(&rx));
    }
    if let Some(a) = &made.listen {
        let _ = ask(sh, Ask::Unlisten(a.clone()));
    }
    let _ = ask(sh, Ask::ForgetRam(kept));
}

/// `subsystem_delete`. Of a subsystem made at run time: its creation is replayed from then
/// on as the entry number it took, nothing else. Of a configured one: the supervisor lets go
/// of its sockets and listener, and every next worker leaves its entry empty
/// (`configured.rs`; it comes back when the supervisor starts again from the configuration).
pub(super) fn delete(sh: &Shared, req: &Value, line: &[u8], id: &Value) -> Value {
    let nqn = req
        .get("params")
        .and_then(|p| p.get("nqn"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    let made_here = sh
        .made
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .any(|m| m.nqn == nqn);
    let Some(worker) = sh.worker_rpc.as_ref() else {
        return refused(id, "no management socket in the worker");
    };
    if !made_here {
        let Some(entry) = sh.configured.iter().position(|c| c == nqn) else {
            return refused(id, &format!("subsystem_delete: no subsystem {nqn}"));
        };
        let mut changes = write(&sh.changes);
        if changes.deleted.contains(&entry) {
            return refused(id, &format!("subsystem_delete: no subsystem {nqn}"));
        }
        // marked before the log is let go: a worker started after this never has it, even if
        // this one deleted it and died before answering
        let (reply, gone) = deletion(forward(worker, line), id, nqn);
        if gone {
            changes.deleted.insert(entry);
        }
        // never wait for the supervisor's loop holding the change list (it may be replaying)
        drop(changes);
        if gone {
            let (tx, rx) = mpsc::channel();
            let done = ask(sh, Ask::DeleteConfigured(nqn.to_owned(), tx)).and_then(|()| wait(&rx)?);
            if let Err(e) = done {
                log::warn!("supervisor: deleting {nqn}: {e}");
            }
        }
        return reply;
    }
    let mut changes = write(&sh.changes);
    let (reply, gone) = deletion(forward(worker, line), id, nqn);
    if gone {
        let gone = {
            let mut list = sh.made.lock().unwrap_or_else(PoisonError::into_inner);
            let i = list.iter().position(|m| m.nqn == nqn);
            i.map(|i| list.remove(i))
        };
        if let Some(made) = gone {
            // the first such line still kept: an earlier subsystem made by the same request
            // and deleted already has its line replaced
            if let Some(i) = changes.lines.iter().position(|l| *l == made.line) {
                changes.lines[i] =
                    json!({"jsonrpc": "2.0", "id": 0, "method": crate::rpc::methods::SKIP_ENTRY})
                        .to_string();
            }
            drop(changes);
            let keys = serde_json::from_str(&made.line).map_or(Vec::new(), |r| keys_in(&r));
            let_go(sh, &made, keys);
        }
    }
    reply
}

/// The answer to a forwarded `subsystem_delete` of `nqn`, and whether the subsystem is gone:
/// deleted by the worker, or the worker did not answer (it may have deleted it and died: the
/// next worker does not make it again, and what was held for it is let go).
fn deletion(forwarded: std::io::Result<String>, id: &Value, nqn: &str) -> (Value, bool) {
    match forwarded {
        Ok(r) => {
            let reply = serde_json::from_str::<Value>(&r).unwrap_or(Value::Null);
            let gone = reply.get("result").is_some();
            (reply, gone)
        }
        Err(e) => {
            log::warn!(
                "supervisor: subsystem_delete {nqn}: the worker did not answer ({e}): deleted"
            );
            let why = format!(
                "the worker did not answer ({e}); {nqn} is deleted: the next worker does not have it"
            );
            (refused(id, &why), true)
        }
    }
}
