//! The reactor: one thread owns its controllers (one, or many on a shared [`Reactor`]) and
//! polls them. The control plane (vfio-user socket thread) reaches a controller only by
//! message ([`ControllerHandle`]), so the data plane takes no lock (SPDK's model: reactor,
//! poller, message).
//!
//! Idle policy: after work, spin briefly; then sleep in short, growing naps (timer slack
//! 1 us) so an idle controller costs little CPU on a shared machine. A message wakes it.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Weak};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

use crate::controller::Controller;

mod poller;

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
        self.wake();
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
        let _ = self.0.tx.send(Message::Add(id, Box::new(ctrl)));
        self.0.wake();
        ControllerHandle {
            id,
            reactor: Some(Arc::clone(&self.0)),
        }
    }

    /// Run `poller` on this reactor from now on, beside its controllers.
    pub fn add_poller(&self, poller: Box<dyn Poller>) {
        let _ = self.0.tx.send(Message::AddPoller(poller));
        self.0.wake();
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
        r.tx.send(Message::For(self.id, req?)).ok()?;
        r.wake();
        Some(Sent::Queued)
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
        r.tx.send(Message::Remove(self.id, Some(rtx))).ok()?;
        r.wake();
        rrx.recv().ok()
    }
}

impl Drop for ControllerHandle {
    fn drop(&mut self) {
        if let Some(r) = self.reactor.take() {
            let _ = r.tx.send(Message::Remove(self.id, None));
            r.wake();
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
        let ok = r.tx.send(msg).is_ok();
        r.wake();
        ok
    }
}

/// Poll iterations between Keep Alive timer checks: a few ms at most when idle (every 64th
/// idle iteration naps up to 1 ms), far less when busy.
const KEEP_ALIVE_CHECK_EVERY: u32 = 256;

/// Spin iterations after the last work before napping.
const SPIN_AFTER_WORK: Duration = Duration::from_micros(200);

/// The text a caught panic carries (`panic!` with a literal or a formatted message).
pub fn panic_message(cause: &(dyn std::any::Any + Send)) -> String {
    cause
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| cause.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

/// How a controller leaves its reactor.
enum Removal {
    /// Handed back to the caller of [`ControllerHandle::stop`].
    HandBack(SyncSender<Controller>),
    /// Dropped (its handle is gone).
    Drop,
}

/// A controller on a reactor, with what waits on it.
struct Entry {
    id: u64,
    ctrl: Box<Controller>,
    /// Device resets answered once the controller has finished resetting.
    reset_replies: Vec<SyncSender<()>>,
    /// Removal requested: the controller leaves once nothing it started is in flight.
    removing: Option<Removal>,
    /// A panic happened while serving it: it is fatal until a reset.
    panicked: bool,
}

impl Entry {
    /// Run `f` on the controller; a panic makes this controller fatal (CSTS.CFS), logged
    /// once, and leaves every other controller on the reactor running.
    fn guarded<T>(&mut self, what: &str, f: impl FnOnce(&mut Controller) -> T) -> Option<T> {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut self.ctrl))) {
            Ok(v) => Some(v),
            Err(cause) => {
                let msg = panic_message(cause.as_ref());
                if !self.panicked {
                    log::error!(
                        "{}: panic during {what} ({msg}); this controller is fatal until reset, \
                         the others go on",
                        self.ctrl.config().serial
                    );
                }
                self.panicked = true;
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    self.ctrl.set_fatal();
                }));
                None
            }
        }
    }

    /// Answer waiters once the controller is done resetting; true when it may leave.
    fn settle(&mut self) -> bool {
        if !self.ctrl.is_resetting() {
            for r in self.reset_replies.drain(..) {
                let _ = r.send(());
            }
            if !self.ctrl.is_ready() {
                self.panicked = false;
            }
        }
        match &self.removing {
            None => false,
            // handed back: the new owner keeps what is retired alive
            Some(Removal::HandBack(_)) => !self.ctrl.is_resetting(),
            // dropped: only once no backend request can still reach its memory
            Some(Removal::Drop) => !self.ctrl.is_quiescing(),
        }
    }
}

/// How long a stopping reactor waits for its controllers' backend requests.
const STOP_WAIT: Duration = Duration::from_secs(15);

fn run(rx: &Receiver<Message>, mode: PollMode, id: u64, waiter: &Waiter) {
    sys_util::process::set_timer_slack(1000);
    poller::set_home(id);
    let mut ctrls: Vec<Entry> = Vec::new();
    let mut pollers = Pollers::default();
    let mut shared_core = SharedCore(true);
    let mut last_work = Instant::now();
    let mut iter: u32 = 0;
    loop {
        loop {
            match rx.try_recv() {
                Ok(Message::Add(id, ctrl)) => ctrls.push(Entry {
                    id,
                    ctrl,
                    reset_replies: Vec::new(),
                    removing: None,
                    panicked: false,
                }),
                Ok(Message::For(id, req)) => {
                    if let Some(e) = ctrls.iter_mut().find(|e| e.id == id) {
                        handle(e, req);
                    }
                    last_work = Instant::now();
                }
                Ok(Message::Remove(id, reply)) => {
                    if let Some(e) = ctrls.iter_mut().find(|e| e.id == id) {
                        e.guarded("reset", Controller::device_reset);
                        e.removing = Some(reply.map_or(Removal::Drop, Removal::HandBack));
                    }
                }
                Ok(Message::AddPoller(p)) => {
                    waiter.on_fd.store(true, Ordering::Release);
                    pollers.list.push(p);
                }
                Err(mpsc::TryRecvError::Disconnected) => {
                    drop(pollers);
                    stop_all(ctrls);
                    return;
                }
                Err(mpsc::TryRecvError::Empty) => break,
            }
        }
        iter = iter.wrapping_add(1);
        let check_ka = iter.is_multiple_of(KEEP_ALIVE_CHECK_EVERY);
        let mut work = pollers.run(&mut ctrls, |p| p.poll_input());
        let mut ready = false;
        let mut leaving = false;
        for e in &mut ctrls {
            if check_ka {
                e.guarded("keep alive check", |c| c.check_keep_alive(Instant::now()));
            }
            if !e.panicked || e.ctrl.is_quiescing() {
                work += e
                    .guarded("command processing", Controller::poll)
                    .unwrap_or(0);
            }
            ready |= e.ctrl.is_ready() || e.ctrl.is_quiescing();
            leaving |= e.settle();
        }
        work += pollers.run(&mut ctrls, |p| p.poll_output());
        if leaving {
            let mut i = 0;
            while i < ctrls.len() {
                if ctrls[i].settle() {
                    let e = ctrls.swap_remove(i);
                    if let Some(Removal::HandBack(reply)) = e.removing {
                        let _ = reply.send(*e.ctrl);
                    }
                } else {
                    i += 1;
                }
            }
        }
        if work > 0 {
            last_work = Instant::now();
            continue;
        }
        if mode == PollMode::Busy && ready {
            std::hint::spin_loop();
            continue;
        }
        // check the clock only every few iterations: Instant::now is a vDSO call, not free.
        // Between checks, spin while the core is ours and yield while other threads want it:
        // on a machine with fewer cores than busy threads (guest vCPUs, a backend server, a
        // client) a spinning reactor would hold its core for a whole time slice while the
        // thread it waits for cannot run; with the core to itself, a yield is only a system
        // call per pass that busy polling does not pay.
        if !iter.is_multiple_of(64) {
            if shared_core.0 {
                thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
            continue;
        }
        shared_core.measure();
        let idle = last_work.elapsed();
        let nap = if pollers.expecting() {
            Duration::from_micros(20)
        } else if !ready {
            Duration::from_millis(20)
        } else if idle < SPIN_AFTER_WORK {
            thread::yield_now();
            continue;
        } else if idle < Duration::from_millis(10) {
            Duration::from_micros(20)
        } else if idle < Duration::from_secs(1) {
            Duration::from_micros(200)
        } else {
            Duration::from_millis(1)
        };
        if pollers.list.is_empty() {
            thread::park_timeout(nap);
        } else {
            pollers.wait(waiter, nap);
        }
    }
}

/// Whether other threads want this reactor's core: a yield that gave the core away takes
/// far longer than the bare system call.
struct SharedCore(bool);

impl SharedCore {
    /// A yield longer than this ran another thread.
    const YIELD_RAN_ANOTHER: Duration = Duration::from_micros(5);

    /// Yield once and see.
    fn measure(&mut self) {
        let t = Instant::now();
        thread::yield_now();
        self.0 = t.elapsed() > Self::YIELD_RAN_ANOTHER;
    }
}

/// The pollers of one reactor ([`Poller`]), and the descriptor list their idle wait reuses.
#[derive(Default)]
struct Pollers {
    list: Vec<Box<dyn Poller>>,
    fds: Vec<sys_util::poll::PollFd>,
}

impl Pollers {
    /// Run `phase` of every poller with the controllers lent to it; drop pollers that
    /// finished or panicked (logged: a poller guards its own connections, so a panic here
    /// is a bug in the poller itself).
    fn run(&mut self, ctrls: &mut Vec<Entry>, phase: fn(&mut dyn Poller) -> usize) -> usize {
        if self.list.is_empty() {
            return 0;
        }
        let mut work = 0;
        poller::with_lent(ctrls, || {
            self.list.retain_mut(|p| {
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| phase(&mut **p))) {
                    Ok(n) => work += n,
                    Err(cause) => {
                        log::error!(
                            "reactor poller panicked ({}); it is stopped",
                            panic_message(cause.as_ref())
                        );
                        return false;
                    }
                }
                !p.finished()
            });
        });
        work
    }

    fn expecting(&self) -> bool {
        self.list.iter().any(|p| p.expecting())
    }

    /// Sleep up to `nap` or until a poller's descriptor or the reactor's eventfd is ready.
    fn wait(&mut self, waiter: &Waiter, nap: Duration) {
        self.fds.clear();
        self.fds
            .push(sys_util::poll::entry(&waiter.fd, sys_util::poll::POLLIN));
        for p in &self.list {
            p.wait_fds(&mut self.fds);
        }
        if let Err(e) = sys_util::poll::poll_precise(&mut self.fds, nap) {
            crate::warn_limited!("reactor: poll: {e}");
            thread::park_timeout(nap);
        }
        if self.fds[0].revents != 0 {
            sys_util::fd::drain_eventfd(waiter.fd.as_fd());
        }
    }
}

/// The reactor is going away: reset every controller and give their backends up to
/// [`STOP_WAIT`] to answer. A controller whose requests are still out then is leaked rather
/// than dropped: its buffers stay mapped for the backend that may still write them.
fn stop_all(mut ctrls: Vec<Entry>) {
    for e in &mut ctrls {
        e.guarded("reset", Controller::device_reset);
    }
    let until = Instant::now() + STOP_WAIT;
    while Instant::now() < until && ctrls.iter().any(|e| e.ctrl.is_quiescing()) {
        for e in &mut ctrls {
            if e.ctrl.is_quiescing() {
                e.guarded("reset", Controller::poll);
            }
        }
        thread::sleep(Duration::from_micros(200));
    }
    for e in ctrls {
        if e.ctrl.is_quiescing() {
            log::error!(
                "{}: backend requests still in flight at shutdown; their memory is kept",
                e.ctrl.config().serial
            );
            std::mem::forget(e.ctrl);
        }
    }
}

fn handle(e: &mut Entry, req: Request) {
    match req {
        Request::ReadRegister { offset, len, reply } => {
            let v = e.guarded("register read", |c| c.read_register(offset, len));
            let _ = reply.send(v.unwrap_or(u64::MAX));
        }
        Request::WriteRegister {
            offset,
            value,
            len,
            reply,
        } => {
            e.guarded("register write", |c| c.write_register(offset, value, len));
            let _ = reply.send(());
        }
        Request::SetMsix { start, fds, reply } => {
            e.ctrl.irqs.set_msix(start, fds);
            let _ = reply.send(());
        }
        Request::SetIntx { fd, reply } => {
            e.ctrl.irqs.set_intx(fd);
            let _ = reply.send(());
        }
        Request::DeviceReset { reply } => {
            e.guarded("reset", Controller::device_reset);
            e.reset_replies.push(reply);
            e.settle();
        }
        Request::Run { f } => {
            e.guarded("management request", f);
        }
        Request::Namespace { change, ack } => {
            e.guarded("namespace change", |c| c.apply(change));
            if let Some(ack) = ack {
                let _ = ack.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::sync::Mutex;
    use std::sync::mpsc::Sender;

    use crate::{ControllerConfig, Doorbells, GuestMemory};

    /// A poller that reads CSTS through the handle of a controller on its own reactor each
    /// time its socket has a byte, and reports what it read.
    struct Probe {
        handle: ControllerHandle,
        sock: UnixStream,
        seen: Sender<(u64, std::thread::ThreadId)>,
        done: Arc<Mutex<bool>>,
    }

    impl Poller for Probe {
        fn poll_input(&mut self) -> usize {
            let mut b = [0u8; 1];
            match std::io::Read::read(&mut self.sock, &mut b) {
                Ok(1) => {
                    // inline: by message this would wait for its own thread forever
                    let csts = self.handle.read_register(0x1c, 4);
                    let cc = self.handle.with(|c| c.read_register(0x14, 4));
                    let _ = self
                        .seen
                        .send((csts | cc.unwrap_or(1) << 32, thread::current().id()));
                    1
                }
                _ => 0,
            }
        }
        fn poll_output(&mut self) -> usize {
            0
        }
        fn wait_fds(&self, fds: &mut Vec<sys_util::poll::PollFd>) {
            fds.push(sys_util::poll::entry(&self.sock, sys_util::poll::POLLIN));
        }
        fn finished(&self) -> bool {
            *self.done.lock().unwrap()
        }
    }

    #[test]
    fn a_poller_reaches_its_reactors_controllers_inline_and_an_fd_wakes_it() {
        let ctrl = Controller::new(
            ControllerConfig::default(),
            Arc::new(GuestMemory::new()),
            Arc::new(Doorbells::new().unwrap()),
            Vec::new(),
        );
        let reactor = Reactor::spawn("poller-test", PollMode::Adaptive).unwrap();
        let handle = reactor.add(ctrl);
        let probe_handle = reactor.add(Controller::new(
            ControllerConfig::default(),
            Arc::new(GuestMemory::new()),
            Arc::new(Doorbells::new().unwrap()),
            Vec::new(),
        ));
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        theirs.set_nonblocking(true).unwrap();
        let (seen_tx, seen) = mpsc::channel();
        let done = Arc::new(Mutex::new(false));
        reactor.add_poller(Box::new(Probe {
            handle: probe_handle,
            sock: theirs,
            seen: seen_tx,
            done: Arc::clone(&done),
        }));
        // let the reactor go idle (it then sleeps on the socket), then poke it
        thread::sleep(Duration::from_millis(100));
        for _ in 0..3 {
            let t = Instant::now();
            std::io::Write::write_all(&mut ours, b"x").unwrap();
            let (v, tid) = seen
                .recv_timeout(Duration::from_secs(5))
                .expect("poller ran");
            assert_eq!(v, 0, "CSTS and CC of a disabled controller, read inline");
            assert_ne!(tid, thread::current().id());
            // woken by the socket, not by the end of a 20 ms nap (generous for a loaded CI)
            assert!(t.elapsed() < Duration::from_secs(1));
        }
        // the other controller on the reactor is served by message meanwhile
        assert_eq!(handle.read_register(0x1c, 4), 0);
        *done.lock().unwrap() = true;
        reactor.wake();
        std::io::Write::write_all(&mut ours, b"x").unwrap();
        // finished: dropped (with its sender) at the next pass
        let t = Instant::now();
        loop {
            match seen.recv_timeout(Duration::from_millis(50)) {
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                _ => assert!(t.elapsed() < Duration::from_secs(5), "the poller was kept"),
            }
        }
    }
}
