//! The reactor thread's loop: take messages, run pollers and controllers, nap when idle.

use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread;
use std::time::{Duration, Instant};

use crate::controller::Controller;

use super::{Message, PollMode, Poller, Request, Waiter, panic_message, poller};

/// Poll iterations between Keep Alive timer checks: a few ms at most when idle (every 64th
/// idle iteration naps up to 1 ms), far less when busy.
const KEEP_ALIVE_CHECK_EVERY: u32 = 256;

/// Spin iterations after the last work before napping.
const SPIN_AFTER_WORK: Duration = Duration::from_micros(200);

/// How a controller leaves its reactor.
enum Removal {
    /// Handed back to the caller of [`ControllerHandle::stop`].
    HandBack(SyncSender<Controller>),
    /// Dropped (its handle is gone).
    Drop,
}

/// A controller on a reactor, with what waits on it.
pub(super) struct Entry {
    pub(super) id: u64,
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

pub(super) fn run(rx: &Receiver<Message>, mode: PollMode, id: u64, waiter: &Waiter) {
    sys_util::process::set_timer_slack(1000);
    poller::set_home(id);
    let mut ctrls: Vec<Entry> = Vec::new();
    let mut pollers = Pollers::default();
    let mut shared_core = SharedCore(true);
    let mut last_work = Instant::now();
    // work done since `last_work` was last set: the clock is read at the next idle check,
    // not after every busy pass (at most 63 idle passes late: the spin after work may last
    // that much longer, never less)
    let mut worked = false;
    let mut iter: u32 = 0;
    loop {
        // the channel only when something was sent since the last look (see `Waiter::mail`;
        // a sender sets the flag after its message, so none is left behind)
        if waiter.mail.load(Ordering::Relaxed) && waiter.mail.swap(false, Ordering::Acquire) {
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
        // a backend waits for a kernel worker thread that may share this core (busy or not,
        // this pass): let it run
        let worker_waits = sys_util::yield_hint::take();
        if worker_waits {
            thread::yield_now();
        }
        if work > 0 {
            worked = true;
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
            if shared_core.0 && !worker_waits {
                thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
            continue;
        }
        shared_core.measure();
        let now = Instant::now();
        if std::mem::take(&mut worked) {
            last_work = now;
        }
        let idle = now.duration_since(last_work);
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

pub(super) fn handle(e: &mut Entry, req: Request) {
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
