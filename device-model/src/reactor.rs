//! The reactor: one thread owns a controller for its whole life and polls it. The control
//! plane (vfio-user socket thread) reaches it only by message ([`ControllerHandle`]), so the
//! data plane takes no lock (SPDK's model: reactor, poller, message).
//!
//! Idle policy: after work, spin briefly; then sleep in short, growing naps (timer slack
//! 1 us) so an idle controller costs little CPU on a shared machine. A message wakes it.

use std::os::fd::OwnedFd;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

use crate::controller::Controller;

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
    Stop,
}

/// The control plane's handle on a controller running in its reactor thread.
pub struct ControllerHandle {
    tx: Sender<Request>,
    waker: Thread,
    join: Option<JoinHandle<Controller>>,
}

impl std::fmt::Debug for ControllerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerHandle")
            .field("thread", &self.waker.name())
            .finish()
    }
}

impl ControllerHandle {
    /// Start a reactor thread named `name` that owns `ctrl`.
    pub fn spawn(name: &str, ctrl: Controller, mode: PollMode) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let join = thread::Builder::new()
            .name(name.into())
            .spawn(move || run(ctrl, &rx, mode))?;
        let waker = join.thread().clone();
        Ok(Self {
            tx,
            waker,
            join: Some(join),
        })
    }

    fn call<T>(&self, make: impl FnOnce(SyncSender<T>) -> Request) -> Option<T> {
        let (rtx, rrx) = mpsc::sync_channel(1);
        self.tx.send(make(rtx)).ok()?;
        self.waker.unpark();
        rrx.recv().ok()
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
        self.tx.send(Request::Run { f }).ok()?;
        self.waker.unpark();
        rrx.recv().ok()
    }

    /// Nudge the reactor (a trapped doorbell write arrived).
    pub fn wake(&self) {
        self.waker.unpark();
    }

    /// Stop the reactor and get the controller back.
    pub fn stop(mut self) -> Option<Controller> {
        let _ = self.tx.send(Request::Stop);
        self.waker.unpark();
        self.join.take()?.join().ok()
    }
}

impl Drop for ControllerHandle {
    fn drop(&mut self) {
        if let Some(j) = self.join.take() {
            let _ = self.tx.send(Request::Stop);
            self.waker.unpark();
            let _ = j.join();
        }
    }
}

/// Poll iterations between Keep Alive timer checks: a few ms at most when idle (every 64th
/// idle iteration naps up to 1 ms), far less when busy.
const KEEP_ALIVE_CHECK_EVERY: u32 = 256;

/// Spin iterations after the last work before napping.
const SPIN_AFTER_WORK: Duration = Duration::from_micros(200);

fn run(mut ctrl: Controller, rx: &Receiver<Request>, mode: PollMode) -> Controller {
    // SAFETY: prctl(PR_SET_TIMERSLACK) on the calling thread with a plain integer argument.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000u64, 0u64, 0u64, 0u64) };
    let mut last_work = Instant::now();
    let mut iter: u32 = 0;
    loop {
        loop {
            match rx.try_recv() {
                Ok(Request::Stop) | Err(mpsc::TryRecvError::Disconnected) => {
                    ctrl.device_reset();
                    return ctrl;
                }
                Ok(req) => {
                    handle(&mut ctrl, req);
                    last_work = Instant::now();
                }
                Err(mpsc::TryRecvError::Empty) => break,
            }
        }
        iter = iter.wrapping_add(1);
        if iter.is_multiple_of(KEEP_ALIVE_CHECK_EVERY) {
            ctrl.check_keep_alive(Instant::now());
        }
        if ctrl.poll() > 0 {
            last_work = Instant::now();
            continue;
        }
        if mode == PollMode::Busy && ctrl.is_ready() {
            std::hint::spin_loop();
            continue;
        }
        // check the clock only every few iterations: Instant::now is a vDSO call, not free.
        // Between checks, yield rather than spin: on a machine with fewer cores than busy
        // threads (guest vCPUs, a backend server, a client) a spinning reactor would hold its
        // core for a whole time slice while the thread it waits for cannot run.
        if !iter.is_multiple_of(64) {
            thread::yield_now();
            continue;
        }
        let idle = last_work.elapsed();
        if !ctrl.is_ready() {
            thread::park_timeout(Duration::from_millis(20));
        } else if idle < SPIN_AFTER_WORK {
            thread::yield_now();
        } else if idle < Duration::from_millis(10) {
            thread::park_timeout(Duration::from_micros(20));
        } else if idle < Duration::from_secs(1) {
            thread::park_timeout(Duration::from_micros(200));
        } else {
            thread::park_timeout(Duration::from_millis(1));
        }
    }
}

fn handle(ctrl: &mut Controller, req: Request) {
    match req {
        Request::ReadRegister { offset, len, reply } => {
            let _ = reply.send(ctrl.read_register(offset, len));
        }
        Request::WriteRegister {
            offset,
            value,
            len,
            reply,
        } => {
            ctrl.write_register(offset, value, len);
            let _ = reply.send(());
        }
        Request::SetMsix { start, fds, reply } => {
            ctrl.irqs.set_msix(start, fds);
            let _ = reply.send(());
        }
        Request::SetIntx { fd, reply } => {
            ctrl.irqs.set_intx(fd);
            let _ = reply.send(());
        }
        Request::DeviceReset { reply } => {
            ctrl.device_reset();
            let _ = reply.send(());
        }
        Request::Run { f } => f(ctrl),
        Request::Stop => {}
    }
}
