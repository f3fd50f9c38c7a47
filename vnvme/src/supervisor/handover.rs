//! The worker's side of the fds its supervisor handed over: per vfio-user socket the link
//! the supervisor relays the client over, the BAR0 doorbell memfd the client mapped, and the
//! controller's state memfd; per NVMe/TCP address the listening socket. The daemon's
//! builders take them by socket path or address when they build that controller
//! ([`take_memory`], [`take_link`], [`take_listener`]); controllers built this way are
//! tracked so a planned upgrade can hold, drain and save them ([`drain_all`]).

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use device_model::reactor::Poster;
use qemu_vfio_user::server::RestoreHook;

/// The memfds of one controller.
#[derive(Debug)]
pub struct HandedMemory {
    pub doorbells: OwnedFd,
    pub state: OwnedFd,
}

#[derive(Debug)]
struct Handed {
    socket: PathBuf,
    link: Option<UnixStream>,
    memory: Option<HandedMemory>,
    /// Made by `subsystem_create` at run time: claimed when that call is replayed, after
    /// the configuration is built.
    run_time: bool,
}

static HANDED: Mutex<Vec<Handed>> = Mutex::new(Vec::new());
/// NVMe/TCP listeners by configured address.
static LISTENERS: Mutex<Vec<(String, OwnedFd)>> = Mutex::new(Vec::new());
static TRACKED: Mutex<Vec<Poster>> = Mutex::new(Vec::new());
/// RAM the supervisor keeps for `malloc:SIZE@KEY` namespaces, by key.
static KEPT_RAM: Mutex<Vec<(String, OwnedFd)>> = Mutex::new(Vec::new());

/// The supervisor settles the subsystems after its replay (`SETTLE`): namespaces are kept.
static SETTLES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the supervisor will ask to settle.
pub fn set_settles(yes: bool) {
    SETTLES.store(yes, std::sync::atomic::Ordering::Relaxed);
}

/// Whether subsystems keep their namespaces in their keeper's journal (the supervisor
/// settles them after its replay).
pub fn settles() -> bool {
    SETTLES.load(std::sync::atomic::Ordering::Relaxed)
}

/// Record the memfd the supervisor keeps as RAM `key`.
pub fn offer_ram(key: String, fd: OwnedFd) {
    if let Ok(mut r) = KEPT_RAM.lock() {
        r.retain(|(k, _)| *k != key);
        r.push((key, fd));
    }
}

/// Kept RAM `key`, once (the namespace, array member or store that names it maps it; the
/// supervisor keeps the memfd, and its pages go when both let go).
pub fn kept_ram(key: &str) -> Option<OwnedFd> {
    let mut r = KEPT_RAM.lock().ok()?;
    let i = r.iter().position(|(k, _)| k == key)?;
    Some(r.swap_remove(i).1)
}

/// Record what the supervisor handed over for `socket` (`run_time`: for a subsystem made at
/// run time).
pub fn offer(socket: PathBuf, link: UnixStream, memory: HandedMemory, run_time: bool) {
    if let Ok(mut h) = HANDED.lock() {
        h.retain(|x| x.socket != socket);
        h.push(Handed {
            socket,
            link: Some(link),
            memory: Some(memory),
            run_time,
        });
    }
}

/// Record the NVMe/TCP listener the supervisor holds for address `addr`.
pub fn offer_listener(addr: String, fd: OwnedFd) {
    if let Ok(mut l) = LISTENERS.lock() {
        l.retain(|(a, _)| *a != addr);
        l.push((addr, fd));
    }
}

/// The listener handed over for configured address `addr`, once.
pub fn take_listener(addr: &str) -> Option<std::net::TcpListener> {
    let mut l = LISTENERS.lock().ok()?;
    let i = l.iter().position(|(a, _)| a == addr)?;
    Some(std::net::TcpListener::from(l.swap_remove(i).1))
}

/// The memfds handed over for `socket`, once.
pub fn take_memory(socket: &Path) -> Option<HandedMemory> {
    let mut h = HANDED.lock().ok()?;
    h.iter_mut().find(|x| x.socket == socket)?.memory.take()
}

/// The link handed over for `socket`, once.
pub fn take_link(socket: &Path) -> Option<UnixStream> {
    let mut h = HANDED.lock().ok()?;
    h.iter_mut().find(|x| x.socket == socket)?.link.take()
}

/// Sockets handed over that no configured controller took (a config that changed).
pub fn unclaimed() -> Vec<PathBuf> {
    HANDED.lock().map_or_else(
        |_| Vec::new(),
        |h| {
            h.iter()
                .filter(|x| x.link.is_some() && !x.run_time)
                .map(|x| x.socket.clone())
                .collect()
        },
    )
}

/// Keep `poster` for [`drain_all`].
pub fn track(poster: Poster) {
    if let Ok(mut t) = TRACKED.lock() {
        t.push(poster);
    }
}

/// Run `f` on the controller behind `poster` and wait for its answer.
fn ask<T: Send + 'static>(
    poster: &Poster,
    wait: Duration,
    f: impl FnOnce(&mut device_model::Controller) -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = mpsc::sync_channel(1);
    if !poster.run(move |c| {
        let _ = tx.send(f(c));
    }) {
        return None;
    }
    rx.recv_timeout(wait).ok()
}

/// The hook a worker's server runs when its supervisor finished the replay: the controller
/// restores its saved state (on its reactor thread).
pub fn restore_hook(poster: Poster) -> RestoreHook {
    Box::new(move |_device| {
        match ask(
            &poster,
            Duration::from_secs(4),
            device_model::Controller::restore,
        ) {
            Some(Ok(r)) if r.enabled => Ok(format!(
                "state restored: {} commands run again, {} completions posted again, {} found posted",
                r.reissued, r.reposted, r.found_posted
            )),
            Some(Ok(_)) => Ok("no enabled controller to restore".into()),
            Some(Err(e)) => Err(e.to_string()),
            None => Err("the controller did not answer".into()),
        }
    })
}

/// A planned upgrade: every tracked controller stops fetching, its commands in flight
/// finish (within `wait`), and its state is saved. Returns how many were drained in time.
pub fn drain_all(wait: Duration) -> (usize, usize) {
    let posters: Vec<Poster> = TRACKED.lock().map(|t| t.clone()).unwrap_or_default();
    for p in &posters {
        p.run(|c| c.hold_fetch(true));
    }
    let until = Instant::now() + wait;
    let mut drained = 0;
    for p in &posters {
        loop {
            if ask(p, Duration::from_secs(1), |c| c.drained()).unwrap_or(true) {
                drained += 1;
                break;
            }
            if Instant::now() > until {
                // what is still in flight is in the journal: the next worker runs it again
                log::warn!(
                    "upgrade: a controller did not drain in time; its commands are reissued"
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        ask(
            p,
            Duration::from_secs(1),
            device_model::Controller::save_state,
        );
    }
    (drained, posters.len())
}
