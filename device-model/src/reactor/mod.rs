//! The reactor: one thread owns its controllers (one, or many on a shared [`Reactor`]) and
//! polls them. The control plane (vfio-user socket thread) reaches a controller only by
//! message ([`ControllerHandle`]), so the data plane takes no lock (SPDK's model: reactor,
//! poller, message).
//!
//! Idle policy: after work, spin briefly; then sleep in short, growing naps (timer slack
//! 1 us) so an idle controller costs little CPU on a shared machine. A message wakes it.
//!
//! Files: `mod.rs` the reactor and the handles on its controllers; `run.rs` the thread's
//! loop; `poller.rs` work run beside the controllers on the same thread ([`Poller`]).

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender, SyncSender};
use std::sync::{Arc, Weak};
use std::thread::{self, JoinHandle, Thread};

use crate::controller::Controller;

mod poller;
mod run;

use run::{Entry, handle, run};
#[cfg(test)]
mod tests;

pub use poller::Poller;

/// How the reactor waits when there is no work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollMode {
    /// Never sleep (lowest latency, one core per reactor).
    Busy,
    /// Spin for a while after work, then nap (default).
    Adaptive,
}

/// A request from the control plane.
enum Request {
    ReadRegister {
        offset: u64,
        len: usize,
        reply: SyncSender<u64>,
    },
    WriteRegister {
        offset: u64,
        value: u64,
        len: usize,
        reply: SyncSender<()>,
    },
    SetMsix {
        start: usize,
        fds: Vec<Option<OwnedFd>>,
        reply: SyncSender<()>,
    },
    SetIntx {
        fd: Option<OwnedFd>,
        reply: SyncSender<()>,
    },
    DeviceReset {
        reply: SyncSender<()>,
    },
    Run {
        f: Box<dyn FnOnce(&mut Controller) + Send>,
    },
    /// A change of the controller's namespaces from its subsystem; `ack` hears when it is
    /// applied.
    Namespace {
        change: crate::NamespaceChange,
        ack: Option<Sender<()>>,
    },
}

/// A message to a reactor thread.
enum Message {
    /// Take over a controller as `id`.
    Add(u64, Box<Controller>),
    /// A request for controller `id`.
    For(u64, Request),
    /// Hand controller `id` back (reset), or drop it when nobody waits.
    Remove(u64, Option<SyncSender<Controller>>),
    /// Run a poller beside the controllers from now on.
    AddPoller(Box<dyn Poller>),
}

/// How a reactor is woken: its thread is unparked, and once it has pollers (and so sleeps
/// in poll(2) on their descriptors) its eventfd is signalled too.
struct Waiter {
    fd: OwnedFd,
    /// Set once the reactor has a poller.
    on_fd: AtomicBool,
    /// Set after every message sent (and when the channel closes): the reactor looks at its
    /// channel only then, not with a `try_recv` on every pass.
    mail: AtomicBool,
}

/// Ids of reactors (0: none), for recognising a reactor's own thread.
static NEXT_REACTOR: AtomicU64 = AtomicU64::new(1);

/// One reactor thread; shared by the handles of the controllers it runs.
struct ReactorThread {
    id: u64,
    tx: Sender<Message>,
    waker: Thread,
    waiter: Arc<Waiter>,
    join: Option<JoinHandle<()>>,
    next_id: AtomicU64,
}

impl ReactorThread {
    /// Send `msg` to the thread and wake it; false when the thread is gone.
    fn post(&self, msg: Message) -> bool {
        let sent = self.tx.send(msg).is_ok();
        self.wake_for_mail();
        sent
    }

    /// Tell the thread to look at its channel (after a message, or once it closed), and wake
    /// it.
    fn wake_for_mail(&self) {
        self.waiter.mail.store(true, Ordering::Release);
        self.wake();
    }

    /// Wake the thread (nothing to do on the thread itself).
    fn wake(&self) {
        if poller::at_home(self.id) {
            return;
        }
        self.waker.unpark();
        if self.waiter.on_fd.load(Ordering::Acquire) {
            let _ = sys_util::fd::signal_eventfd(self.waiter.fd.as_fd());
        }
    }
}

impl Drop for ReactorThread {
    fn drop(&mut self) {
        // the last handle is gone: the thread ends when its channel closes
        let (tx, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.tx, tx));
        self.wake_for_mail();
        // (dropped on its own thread, by a poller: it ends by itself, nobody waits)
        if let Some(j) = self.join.take().filter(|_| !poller::at_home(self.id)) {
            let _ = j.join();
        }
    }
}

/// A reactor thread that runs any number of controllers (SPDK's model: one poller thread
/// per core, many controllers on it). Controllers are added with [`Reactor::add`]; the
/// thread lives as long as the reactor or any of its controllers' handles.
#[derive(Clone)]
pub struct Reactor(Arc<ReactorThread>);

impl std::fmt::Debug for Reactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reactor")
            .field("thread", &self.0.waker.name())
            .finish()
    }
}

impl Reactor {
    /// Start a reactor thread named `name`.
    pub fn spawn(name: &str, mode: PollMode) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let id = NEXT_REACTOR.fetch_add(1, Ordering::Relaxed);
        let waiter = Arc::new(Waiter {
            fd: sys_util::fd::eventfd()?,
            on_fd: AtomicBool::new(false),
            mail: AtomicBool::new(false),
        });
        let w = Arc::clone(&waiter);
        let join = thread::Builder::new()
            .name(name.into())
            .spawn(move || run(&rx, mode, id, &w))?;
        let waker = join.thread().clone();
        Ok(Self(Arc::new(ReactorThread {
            id,
            tx,
            waker,
            waiter,
            join: Some(join),
            next_id: AtomicU64::new(0),
        })))
    }

    /// Run `ctrl` on this reactor from now on.
    pub fn add(&self, ctrl: Controller) -> ControllerHandle {
        let id = self.0.next_id.fetch_add(1, Ordering::Relaxed);
        self.0.post(Message::Add(id, Box::new(ctrl)));
        ControllerHandle {
            id,
            reactor: Some(Arc::clone(&self.0)),
        }
    }

    /// Run `poller` on this reactor from now on, beside its controllers.
    pub fn add_poller(&self, poller: Box<dyn Poller>) {
        self.0.post(Message::AddPoller(poller));
    }

    /// Make the reactor run a pass of its loop now (a poller has something to do).
    pub fn wake(&self) {
        self.0.wake();
    }
}

/// The control plane's handle on a controller running on a reactor.
pub struct ControllerHandle {
    id: u64,
    reactor: Option<Arc<ReactorThread>>,
}

impl std::fmt::Debug for ControllerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerHandle")
            .field("id", &self.id)
            .field(
                "thread",
                &self.reactor.as_ref().and_then(|r| r.waker.name()),
            )
            .finish()
    }
}

impl ControllerHandle {
    /// Start a reactor thread named `name` of its own for `ctrl`.
    pub fn spawn(name: &str, ctrl: Controller, mode: PollMode) -> std::io::Result<Self> {
        Ok(Reactor::spawn(name, mode)?.add(ctrl))
    }

    /// Hand `req` to the controller: run at once when called by a poller on its own
    /// reactor ([`Poller`]), else by message.
    fn send(&self, req: Request) -> Option<Sent> {
        let r = self.reactor.as_ref()?;
        let mut req = Some(req);
        let inline = poller::on_lent(r.id, self.id, |e| {
            if let Some(req) = req.take() {
                handle(e, req);
            }
        });
        if inline.is_some() {
            return Some(Sent::Done);
        }
        r.post(Message::For(self.id, req?)).then_some(Sent::Queued)
    }

    fn call<T>(&self, make: impl FnOnce(SyncSender<T>) -> Request) -> Option<T> {
        let (rtx, rrx) = mpsc::sync_channel(1);
        match self.send(make(rtx))? {
            // answered already (a device reset still settling is not waited for here)
            Sent::Done => rrx.try_recv().ok(),
            Sent::Queued => rrx.recv().ok(),
        }
    }

    /// Read a BAR0 register.
    pub fn read_register(&self, offset: u64, len: usize) -> u64 {
        self.call(|reply| Request::ReadRegister { offset, len, reply })
            .unwrap_or(u64::MAX)
    }

    /// Write a BAR0 register; returns when the controller has acted on it.
    pub fn write_register(&self, offset: u64, value: u64, len: usize) {
        self.call(|reply| Request::WriteRegister {
            offset,
            value,
            len,
            reply,
        });
    }

    /// Install MSI-X eventfds for vectors `start..`.
    pub fn set_msix(&self, start: usize, fds: Vec<Option<OwnedFd>>) {
        self.call(|reply| Request::SetMsix { start, fds, reply });
    }

    /// Install or clear the INTx eventfd.
    pub fn set_intx(&self, fd: Option<OwnedFd>) {
        self.call(|reply| Request::SetIntx { fd, reply });
    }

    /// Device-level reset (FLR, vfio-user reset, client gone).
    pub fn device_reset(&self) {
        self.call(|reply| Request::DeviceReset { reply });
    }

    /// Run `f` on the controller in its thread and return its result (management, tests).
    pub fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Controller) -> T + Send + 'static,
    ) -> Option<T> {
        let (rtx, rrx) = mpsc::sync_channel(1);
        let f = Box::new(move |c: &mut Controller| {
            let _ = rtx.send(f(c));
        });
        match self.send(Request::Run { f })? {
            Sent::Done => rrx.try_recv().ok(),
            Sent::Queued => rrx.recv().ok(),
        }
    }

    /// The reactor this controller runs on.
    pub fn reactor(&self) -> Option<Reactor> {
        self.reactor.as_ref().map(|r| Reactor(Arc::clone(r)))
    }

    /// A handle that runs closures on this controller without waiting (usable from any
    /// thread, its own reactor included) and does not keep the reactor alive.
    pub fn poster(&self) -> Poster {
        Poster {
            id: self.id,
            reactor: self.reactor.as_ref().map_or_else(Weak::new, Arc::downgrade),
        }
    }

    /// Nudge the reactor (a trapped doorbell write arrived).
    pub fn wake(&self) {
        if let Some(r) = &self.reactor {
            r.wake();
        }
    }

    /// Take the controller off its reactor (reset) and get it back.
    pub fn stop(mut self) -> Option<Controller> {
        let r = self.reactor.take()?;
        let (rtx, rrx) = mpsc::sync_channel(1);
        if !r.post(Message::Remove(self.id, Some(rtx))) {
            return None;
        }
        rrx.recv().ok()
    }
}

impl Drop for ControllerHandle {
    fn drop(&mut self) {
        if let Some(r) = self.reactor.take() {
            r.post(Message::Remove(self.id, None));
        }
    }
}

/// How a request reached the controller.
enum Sent {
    /// Run inline (a poller on the controller's own reactor).
    Done,
    /// Sent as a message.
    Queued,
}

/// Sends a controller messages without waiting for them: how its subsystem tells it about a
/// change of its namespaces (made by the PF for a VF on the same reactor thread, where
/// [`ControllerHandle::with`] would wait for itself).
#[derive(Clone)]
pub struct Poster {
    id: u64,
    reactor: Weak<ReactorThread>,
}

impl std::fmt::Debug for Poster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Poster").field("id", &self.id).finish()
    }
}

impl Poster {
    /// Queue `change` for the controller to apply before its next poll (`ack` hears when it
    /// has); false when the controller is gone.
    pub fn post_change(&self, change: crate::NamespaceChange, ack: Option<Sender<()>>) -> bool {
        let Some(r) = self.reactor.upgrade() else {
            return false;
        };
        let msg = Message::For(self.id, Request::Namespace { change, ack });
        r.post(msg)
    }
}

impl Poster {
    /// Run `f` on the controller in its thread without waiting (a worker's planned upgrade
    /// holds, drains and saves its controllers this way); false when it is gone.
    pub fn run(&self, f: impl FnOnce(&mut Controller) + Send + 'static) -> bool {
        let Some(r) = self.reactor.upgrade() else {
            return false;
        };
        r.post(Message::For(self.id, Request::Run { f: Box::new(f) }))
    }
}

/// The text a caught panic carries (`panic!` with a literal or a formatted message).
pub fn panic_message(cause: &(dyn std::any::Any + Send)) -> String {
    cause
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| cause.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}
