//! Loopback TCP helpers for tests that start NVMe/TCP targets.

use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// A free TCP port on the loopback (bound and released: the daemon binds it next).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Wait until something listens on `127.0.0.1:port`, panicking after 10 s (`what` says who).
pub fn wait_listening(port: u16, what: &str) {
    let t = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{what} not listening"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
