//! The supervisor's management socket: `daemon_upgrade` and `daemon_status` are answered
//! by the supervisor; every other method is forwarded to the worker's socket
//! (`RPC.worker`), line for line.
//!
//! Clients are served on threads of their own, never on the supervisor's loop: that loop
//! reaps and replaces a dead worker, and a caller that connects and sends nothing (or one
//! byte a second), or a forwarded method the worker takes long to answer, must not hold up
//! the recovery every tenant's guest waits for. The loop only sees the two `daemon_*`
//! methods, as [`Ask`]s on a channel.

use std::collections::BTreeSet;
use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use qemu_vfio_user::server::socket_path::OwnedSocketPath;
use serde_json::{Value, json};

use super::kept_ram::{MAX_PER_CALL, keys_in, visit_strings};
use super::{Supervisor, SupervisorError};
use crate::backend_spec::{BackendSpec, keep_ram as keep_ram_spec};
use crate::rpc::acceptor::Acceptor;
use crate::rpc::code;
use crate::rpc::request_lines::{Line, RequestLines};

mod subsystems;

/// Clients served at once (as many as the daemon's own socket); more are answered "busy"
/// and closed.
const MAX_CLIENTS: usize = 16;
/// Each read from a client waits at most this (the deadline is checked between reads).
const READ_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a client waits for the supervisor's loop (an upgrade takes a few seconds).
const ASK_TIMEOUT: Duration = Duration::from_mins(1);

/// A `daemon_*` request for the supervisor's loop, or a socket, listener or RAM to own or let
/// go of for a run-time call, with where its answer goes.
pub(super) enum Ask {
    Status(Sender<Value>),
    Upgrade(Option<PathBuf>, Sender<Result<Value, String>>),
    Attach(PathBuf, Sender<Result<(), String>>),
    Detach(PathBuf, Sender<()>),
    /// Hold an NVMe/TCP listener on this address for a `subsystem_create`.
    Listen(String, Sender<Result<(), String>>),
    /// Close the NVMe/TCP listener held for a deleted (or refused) subsystem.
    Unlisten(String),
    /// The worker deleted this configured subsystem: let go of what was held for it.
    DeleteConfigured(String, Sender<Result<(), String>>),
    /// Keep RAM of this many bytes for a `malloc:` spec of a run-time call: its key.
    Ram(u64, Sender<Result<String, String>>),
    /// Let go of kept RAM (its creation is no longer replayed).
    ForgetRam(Vec<String>),
}

/// The listening socket and the thread that accepts on it.
pub(super) struct SupervisorRpc {
    asks: Receiver<Ask>,
    _acceptor: Acceptor,
}

/// What every client thread needs.
struct Shared {
    asks: Sender<Ask>,
    worker_rpc: Option<PathBuf>,
    changes: Changes,
    /// Subsystems made at run time.
    made: Mutex<Vec<subsystems::Made>>,
    /// The configured subsystems' NQNs, by entry number.
    configured: Vec<String>,
    /// Kept RAM of array members added at run time (`raid_add_member`), by array name: let
    /// go of when the member is removed or the array deleted.
    member_ram: Mutex<Vec<(String, String)>>,
}

/// The run-time changes the workers so far accepted, which every new worker gets before it
/// restores its controllers.
#[derive(Debug, Default)]
pub(super) struct ChangeLog {
    /// [`REPLAYED`] calls and `subsystem_create`s, request lines in order.
    pub(super) lines: Vec<String>,
    /// The entries of configured subsystems deleted (`--deleted-entry`).
    pub(super) deleted: BTreeSet<usize>,
}

/// The change log behind its lock. The lock also orders the calls to the worker: one that
/// changes it at a time (written), others beside each other (read); the supervisor's loop
/// holds it written from starting a worker until the replay is done, so no call reaches a
/// worker that does not have every change yet. Never wait for the loop holding it.
pub(super) type Changes = Arc<RwLock<ChangeLog>>;

/// The change log, to change it (a poisoned lock: a thread panicked between whole changes).
pub(super) fn write(c: &Changes) -> RwLockWriteGuard<'_, ChangeLog> {
    c.write().unwrap_or_else(PoisonError::into_inner)
}

/// The change log, to call the worker beside other such calls.
fn read(c: &Changes) -> RwLockReadGuard<'_, ChangeLog> {
    c.read().unwrap_or_else(PoisonError::into_inner)
}

impl SupervisorRpc {
    /// Listen on `path`; methods other than `daemon_*` go to `worker_rpc`.
    pub(super) fn bind(
        path: &Path,
        worker_rpc: Option<PathBuf>,
        changes: Changes,
        configured: Vec<String>,
    ) -> Result<Self, SupervisorError> {
        let (listener, owned) = OwnedSocketPath::bind(path)
            .map_err(|e| SupervisorError::Io(std::io::Error::other(e)))?;
        let (tx, asks) = mpsc::channel();
        let shared = Shared {
            asks: tx,
            worker_rpc,
            changes,
            made: Mutex::new(Vec::new()),
            configured,
            member_ram: Mutex::new(Vec::new()),
        };
        let acceptor = Acceptor::start("supervisor-rpc", listener, owned, MAX_CLIENTS, move |s| {
            serve(&s, &shared)
        })
        .map_err(SupervisorError::Io)?;
        Ok(Self {
            asks,
            _acceptor: acceptor,
        })
    }

    /// Answer the `daemon_*` requests that arrive within `wait`.
    pub(super) fn poll(&self, sup: &mut Supervisor, wait: Duration) {
        let Ok(first) = self.asks.recv_timeout(wait) else {
            return;
        };
        let mut next = Some(first);
        while let Some(ask) = next {
            match ask {
                Ask::Status(reply) => {
                    let _ = reply.send(sup.status().json());
                }
                Ask::Upgrade(binary, reply) => {
                    let _ = reply.send(sup.upgrade(binary).map_err(|e| e.to_string()));
                }
                Ask::Attach(socket, reply) => {
                    let _ = reply.send(sup.attach_at_run_time(socket));
                }
                Ask::Detach(socket, reply) => {
                    sup.detach(&socket);
                    let _ = reply.send(());
                }
                Ask::Listen(addr, reply) => {
                    let _ = reply.send(sup.listen_at_run_time(&addr));
                }
                Ask::Unlisten(addr) => sup.unlisten(&addr),
                Ask::DeleteConfigured(nqn, reply) => {
                    let _ = reply.send(sup.delete_configured(&nqn));
                }
                Ask::Ram(size, reply) => {
                    let _ = reply.send(sup.ram_at_run_time(size));
                }
                Ask::ForgetRam(keys) => keys.iter().for_each(|k| sup.forget_ram(k)),
            }
            next = self.asks.try_recv().ok();
        }
    }
}

/// Read `s`'s request lines ([`RequestLines`], as the worker's socket) and answer each, in
/// order, until the client closes, stays silent for [`READ_TIMEOUT`] or sends a line too
/// long (answered, then closed).
fn serve(s: &UnixStream, sh: &Shared) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(READ_TIMEOUT))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut lines = RequestLines::new(BufReader::new(s));
    loop {
        match lines.next_request()? {
            None => return Ok(()),
            Some(Line::TooLong) => {
                return answer(
                    s,
                    &error(
                        &Value::Null,
                        code::INVALID_REQUEST,
                        "request longer than 1 MiB",
                    ),
                );
            }
            Some(Line::Request(line)) => serve_line(s, sh, &line)?,
        }
    }
}

/// Answer one request line.
fn serve_line(s: &UnixStream, sh: &Shared, line: &[u8]) -> std::io::Result<()> {
    let req: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => {
            return answer(
                s,
                &error(&Value::Null, code::PARSE_ERROR, &format!("not JSON: {e}")),
            );
        }
    };
    let id = req.get("id").cloned().unwrap_or(Value::Null);
    let method = req
        .get("method")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let reply = match method {
        "daemon_status" => {
            let (tx, rx) = mpsc::channel();
            match ask(sh, Ask::Status(tx)).and_then(|()| wait(&rx)) {
                Ok(status) => json!({"jsonrpc": "2.0", "id": id, "result": status}),
                Err(e) => refused(&id, &e),
            }
        }
        "daemon_upgrade" => {
            let binary = req
                .get("params")
                .and_then(|p| p.get("binary"))
                .and_then(Value::as_str)
                .map(PathBuf::from);
            if let Some(b) = binary.as_ref().filter(|b| !b.is_file()) {
                refused(&id, &format!("{} is not a file", b.display()))
            } else {
                let (tx, rx) = mpsc::channel();
                match ask(sh, Ask::Upgrade(binary, tx)).and_then(|()| wait(&rx)) {
                    Ok(Ok(r)) => json!({"jsonrpc": "2.0", "id": id, "result": r}),
                    Ok(Err(e)) | Err(e) => refused(&id, &e),
                }
            }
        }
        crate::rpc::methods::SKIP_ENTRY => refused(&id, "the supervisor's own call"),
        "subsystem_create" => subsystems::create(sh, &req, &id),
        "raid_add_member" | "bdev_raid_add_base_bdev" => match add_member(sh, req.clone()) {
            Ok(reply) => {
                let mut w = s;
                w.write_all(reply.as_bytes())?;
                return Ok(());
            }
            Err(e) => refused(&id, &e),
        },
        "raid_remove_member" | "bdev_raid_remove_base_bdev" => match remove_member(sh, line) {
            Ok(reply) => {
                let mut w = s;
                w.write_all(reply.as_bytes())?;
                return Ok(());
            }
            Err(e) => refused(&id, &e),
        },
        "subsystem_delete" => subsystems::delete(sh, &req, line, &id),
        m if REPLAYED.contains(&m) => match (sh.worker_rpc.as_ref(), keep_ram(sh, req.clone())) {
            (None, _) => refused(&id, "no management socket in the worker"),
            (_, Err(e)) => refused(&id, &format!("{m}: {e}")),
            (Some(p), Ok((req, line, kept))) => {
                let deleted_array = (m == "raid_delete").then(|| {
                    req["params"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned()
                });
                let mut changes = write(&sh.changes);
                match forward(p, line.as_bytes()) {
                    Ok(reply) => {
                        let accepted = serde_json::from_str::<Value>(&reply)
                            .is_ok_and(|v| v.get("error").is_none());
                        let dropped = if accepted {
                            let (req, line) = with_nsid(req, line, &reply);
                            record(&mut changes.lines, &req, &line)
                        } else {
                            None
                        };
                        drop(changes);
                        if !accepted {
                            let _ = ask(sh, Ask::ForgetRam(kept));
                        }
                        if let Some(l) = dropped {
                            let keys = serde_json::from_str(&l).map_or(Vec::new(), |r| keys_in(&r));
                            let _ = ask(sh, Ask::ForgetRam(keys));
                        }
                        if let Some(name) = deleted_array.filter(|_| accepted) {
                            forget_member_ram(sh, |array, _| array == name);
                        }
                        let mut w = s;
                        w.write_all(reply.as_bytes())?;
                        return Ok(());
                    }
                    Err(e) => {
                        drop(changes);
                        let _ = ask(sh, Ask::ForgetRam(kept));
                        refused(&id, &format!("the worker did not answer: {e}"))
                    }
                }
            }
        },
        _ => match sh.worker_rpc.as_ref().map(|p| {
            let _replayed = read(&sh.changes);
            forward(p, line)
        }) {
            Some(Ok(reply)) => {
                let mut w = s;
                w.write_all(reply.as_bytes())?;
                return Ok(());
            }
            Some(Err(e)) => refused(&id, &format!("the worker did not answer: {e}")),
            None => refused(&id, "no management socket in the worker"),
        },
    };
    answer(s, &reply)
}

fn answer(mut s: &UnixStream, v: &Value) -> std::io::Result<()> {
    s.write_all(format!("{v}\n").as_bytes())
}

/// Hand `a` to the supervisor's loop.
fn ask(sh: &Shared, a: Ask) -> Result<(), String> {
    sh.asks
        .send(a)
        .map_err(|_| "the supervisor is stopping".into())
}

/// The supervisor loop's answer.
fn wait<T>(rx: &Receiver<T>) -> Result<T, String> {
    rx.recv_timeout(ASK_TIMEOUT)
        .map_err(|e| format!("the supervisor did not answer: {e}"))
}

/// Management calls whose effect lives in the worker's memory and that the supervisor
/// replays, in order, to each next worker (before its controllers are restored, so a guest
/// finds the same namespaces attached): each gives the same result again from the same
/// state (`ns_add` takes the first free NSID and names a volume on disk; `lvs_create` loads
/// the store it made, `raid_create` assembles the array from its members' superblocks). A
/// store or array deleted at run time takes its creation out of the list (replayed, that
/// would format whatever the backend holds by then). `vf_enable` is not among them: which VFs
/// are online is in the PF's journal, with what its host changed since.
const REPLAYED: &[&str] = &[
    "ns_add",
    "ns_delete",
    "ns_attach",
    "ns_detach",
    "lvs_create",
    "lvs_delete",
    "raid_create",
    "raid_delete",
];

/// An accepted `ns_add` is replayed with the NSID it got (`reply`): the next worker must give
/// the same one whatever namespaces guests created or deleted since (those come back after
/// the replay, with their NSIDs). Other calls as they are.
fn with_nsid(mut req: Value, line: String, reply: &str) -> (Value, String) {
    let nsid = serde_json::from_str::<Value>(reply)
        .ok()
        .and_then(|r| r.get("result")?.get("nsid")?.as_u64());
    let is_add = req.get("method").and_then(Value::as_str) == Some("ns_add");
    match (
        is_add,
        nsid,
        req.get_mut("params").and_then(Value::as_object_mut),
    ) {
        (true, Some(n), Some(p)) if !p.contains_key("nsid") => {
            p.insert("nsid".into(), n.into());
            let line = req.to_string();
            (req, line)
        }
        _ => (req, line),
    }
}

/// Keep `line` (request `req`, which the worker accepted) for the next workers: a store's or
/// array's deletion cancels its creation at run time, if that is in the list (the creation's
/// line is returned: its RAM goes with it).
fn record(changes: &mut Vec<String>, req: &Value, line: &str) -> Option<String> {
    let method = req
        .get("method")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let created_by = match method {
        "lvs_delete" => "lvs_create",
        "raid_delete" => "raid_create",
        _ => {
            changes.push(line.to_owned());
            return None;
        }
    };
    let name = |r: &Value| {
        let p = r.get("params")?;
        p.get("name")
            .or_else(|| p.get("lvs_name"))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let deleted = name(req);
    let created = changes.iter().rposition(|l| {
        serde_json::from_str::<Value>(l).is_ok_and(|r| {
            r.get("method").and_then(Value::as_str) == Some(created_by) && name(&r) == deleted
        })
    });
    if let Some(i) = created {
        return Some(changes.remove(i));
    }
    // a configured one: the next worker opens it from the configuration and deletes it
    changes.push(line.to_owned());
    None
}

/// Name kept RAM (`malloc:SIZE@rN`, made by the supervisor's loop) for every `malloc:` spec
/// in the parameters of `req`, so the worker and every next one open the same RAM: the
/// request, its line to forward and record, and the keys made.
fn keep_ram(sh: &Shared, mut req: Value) -> Result<(Value, String, Vec<String>), String> {
    let mut sizes = Vec::new();
    let mut named = None;
    // a `malloc:` namespace pool is kept as a sparse range per NSID, not as its capacity
    let pool = req
        .get_mut("params")
        .and_then(Value::as_object_mut)
        .and_then(|p| p.remove("namespace_pool"));
    if let Some(p) = req.get_mut("params") {
        visit_strings(p, &mut |s| match s.parse() {
            Ok(BackendSpec::Malloc { size, kept: None }) => sizes.push(size),
            Ok(BackendSpec::Malloc { kept: Some(_), .. }) => named = Some(s.clone()),
            _ => {}
        });
    }
    let mut pool_key = None;
    if let Some(Value::String(s)) = &pool {
        match s.parse::<crate::pool_spec::PoolSpec>() {
            Ok(crate::pool_spec::PoolSpec::Malloc {
                capacity,
                kept: None,
            }) => pool_key = Some(crate::pool_spec::kept_pool_bytes(capacity)),
            Ok(crate::pool_spec::PoolSpec::Malloc { kept: Some(_), .. }) => {
                named = Some(s.clone());
            }
            _ => {}
        }
    }
    if let Some(s) = named {
        // the keys are the supervisor's to give: a caller naming one would reach RAM kept for
        // another namespace (and take it away with its own deletion)
        return Err(format!(
            "{s}: kept RAM is named by the supervisor; write malloc:SIZE"
        ));
    }
    if sizes.len() > MAX_PER_CALL {
        return Err(format!(
            "{} malloc: specs in one call (at most {MAX_PER_CALL})",
            sizes.len()
        ));
    }
    let mut keys = Vec::new();
    for size in pool_key.iter().chain(&sizes).copied() {
        let (tx, rx) = mpsc::channel();
        match ask(sh, Ask::Ram(size, tx)).and_then(|()| wait(&rx)?) {
            Ok(k) => keys.push(k),
            Err(e) => {
                let _ = ask(sh, Ask::ForgetRam(keys));
                return Err(format!("keeping RAM for a malloc: namespace: {e}"));
            }
        }
    }
    let mut next = keys.iter().peekable();
    if let (Some(Value::String(s)), Some(p)) = (&pool, req.get_mut("params")) {
        let named = match next.next_if(|_| pool_key.is_some()) {
            Some(key) => format!("{}@{key}", s.trim()),
            None => s.clone(),
        };
        p["namespace_pool"] = Value::String(named);
    } else if let (Some(v), Some(p)) = (pool, req.get_mut("params")) {
        p["namespace_pool"] = v;
    }
    if let Some(p) = req.get_mut("params") {
        visit_strings(p, &mut |s| {
            if let Some(named) = next.peek().and_then(|k| keep_ram_spec(s, k)) {
                *s = named;
                next.next();
            }
        });
    }
    let line = req.to_string();
    Ok((req, line, keys))
}

/// `raid_add_member`: a `malloc:` member gets kept RAM (`malloc:SIZE@rN`, in the call before
/// it is forwarded), which the array's superblocks then name, so the next worker assembles
/// the array with it. Not replayed: membership is on the members. The worker's answer.
fn add_member(sh: &Shared, req: Value) -> Result<String, String> {
    let worker = sh
        .worker_rpc
        .as_ref()
        .ok_or("no management socket in the worker")?;
    let array = req["params"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let (_, line, kept) = keep_ram(sh, req)?;
    let changes = write(&sh.changes);
    let forwarded = forward(worker, line.as_bytes());
    drop(changes);
    let accepted = forwarded
        .as_ref()
        .is_ok_and(|r| serde_json::from_str::<Value>(r).is_ok_and(|v| v.get("result").is_some()));
    if accepted {
        let mut list = sh.member_ram.lock().unwrap_or_else(PoisonError::into_inner);
        list.extend(kept.into_iter().map(|k| (array.clone(), k)));
    } else {
        let _ = ask(sh, Ask::ForgetRam(kept));
    }
    forwarded.map_err(|e| format!("the worker did not answer: {e}"))
}

/// `raid_remove_member`: a member on RAM kept for an earlier `raid_add_member` lets it go.
fn remove_member(sh: &Shared, line: &[u8]) -> Result<String, String> {
    let worker = sh
        .worker_rpc
        .as_ref()
        .ok_or("no management socket in the worker")?;
    let changes = write(&sh.changes);
    let reply = forward(worker, line).map_err(|e| format!("the worker did not answer: {e}"))?;
    drop(changes);
    let removed = serde_json::from_str::<Value>(&reply)
        .ok()
        .and_then(|v| v.get("result")?.get("member")?.as_str().map(str::to_owned));
    if let Some(spec) = removed {
        let key = keys_in(&Value::String(spec));
        forget_member_ram(sh, |_, k| key.iter().any(|x| x == k));
    }
    Ok(reply)
}

/// Let go of the kept RAM of run-time array members that `gone` (array, key) picks.
fn forget_member_ram(sh: &Shared, gone: impl Fn(&str, &str) -> bool) {
    let keys: Vec<String> = {
        let mut list = sh.member_ram.lock().unwrap_or_else(PoisonError::into_inner);
        let (drop, keep): (Vec<_>, Vec<_>) = list.drain(..).partition(|(a, k)| gone(a, k));
        *list = keep;
        drop.into_iter().map(|(_, k)| k).collect()
    };
    if !keys.is_empty() {
        let _ = ask(sh, Ask::ForgetRam(keys));
    }
}

/// Replay the accepted run-time changes to a new worker's management socket `path`.
pub(super) fn replay(changes: &ChangeLog, path: &Path) {
    let changes = &changes.lines;
    for line in changes {
        match forward(path, line.as_bytes()) {
            Ok(reply)
                if serde_json::from_str::<Value>(&reply)
                    .is_ok_and(|v| v.get("error").is_none()) => {}
            Ok(reply) => log::error!("supervisor: replaying {line}: {}", reply.trim_end()),
            Err(e) => log::error!("supervisor: replaying {line}: {e}"),
        }
    }
    if !changes.is_empty() {
        log::info!("supervisor: {} run-time changes replayed", changes.len());
    }
}

fn refused(id: &Value, msg: &str) -> Value {
    error(id, code::REFUSED, msg)
}

fn error(id: &Value, code: i64, msg: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": msg}})
}

fn forward(path: &Path, line: &[u8]) -> std::io::Result<String> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_mins(1)))?;
    s.write_all(line)?;
    if !line.ends_with(b"\n") {
        s.write_all(b"\n")?;
    }
    let mut reply = String::new();
    std::io::BufRead::read_line(&mut BufReader::new(&s), &mut reply)?;
    if !reply.ends_with('\n') {
        // closed without a whole answer (stopping, or died mid-write): passed on, a part
        // would run into the next answer on the caller's connection
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the worker closed without an answer",
        ));
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker that closes with no answer, or part of one, is an error, never a reply: on
    /// a connection carrying several requests, a part would run into the next answer.
    #[test]
    fn a_worker_closing_without_a_whole_answer_is_an_error() {
        let dir = std::env::temp_dir().join(format!("vnvme-forward-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("worker.rpc");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let worker = std::thread::spawn(move || {
            for answer in [
                &b""[..],
                b"{\"jsonrpc\": \"2.0\", \"id\"",
                b"{\"result\": 1}\n",
            ] {
                let (mut c, _) = listener.accept().unwrap();
                let mut line = String::new();
                std::io::BufRead::read_line(&mut BufReader::new(&c), &mut line).unwrap();
                c.write_all(answer).unwrap();
            }
        });
        let ask = || forward(&path, b"{\"method\": \"controller_list\"}");
        assert_eq!(
            ask().map_err(|e| e.kind()),
            Err(std::io::ErrorKind::UnexpectedEof),
            "no answer"
        );
        assert_eq!(
            ask().map_err(|e| e.kind()),
            Err(std::io::ErrorKind::UnexpectedEof),
            "part of one"
        );
        assert_eq!(ask().unwrap(), "{\"result\": 1}\n");
        worker.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn line(method: &str, params: &Value) -> (Value, String) {
        let v = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        (v.clone(), v.to_string())
    }

    #[test]
    fn a_deletion_cancels_the_creation_made_at_run_time_only() {
        let mut changes = Vec::new();
        for (m, p) in [
            (
                "raid_create",
                json!({"name": "r", "level": "raid1", "members": ["file:/a:1M"]}),
            ),
            ("lvs_create", json!({"name": "s", "backend": "raid:r"})),
            ("ns_add", json!({"nqn": "n", "backend": "lvol:s/v"})),
            (
                "lvs_create",
                json!({"lvs_name": "t", "bdev_name": "file:/b:1M"}),
            ),
            ("ns_delete", json!({"nqn": "n", "nsid": 2})),
            ("lvs_delete", json!({"lvs_name": "s"})),
            ("lvs_delete", json!({"name": "configured"})),
        ] {
            let (req, l) = line(m, &p);
            record(&mut changes, &req, &l);
        }
        let methods: Vec<String> = changes
            .iter()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                format!("{} {}", v["method"].as_str().unwrap(), v["params"])
            })
            .collect();
        assert_eq!(methods.len(), 5, "{methods:#?}");
        assert!(methods[0].starts_with("raid_create"));
        assert!(
            methods[1].starts_with("ns_add"),
            "store s made and deleted: gone"
        );
        assert!(methods[2].contains("\"t\""));
        assert!(methods[3].starts_with("ns_delete"));
        assert!(methods[4].contains("configured"), "kept: configured");
        let (req, l) = line("raid_delete", &json!({"name": "r"}));
        record(&mut changes, &req, &l);
        assert!(!changes.iter().any(|l| l.contains("raid_")), "{changes:#?}");
    }
}
