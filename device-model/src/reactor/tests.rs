//! The reactor with a poller beside its controllers.
use super::*;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

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
