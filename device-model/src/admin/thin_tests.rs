//! A thin-provisioned namespace as the host sees it: Identify Namespace NSFEAT bit 0 with
//! NCAP and NUSE from the backend, and its pool's warning as a SMART / Health event.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use nvme_spec::Status;

use crate::backend::{Backend, IoRequest, MallocBackend};
use crate::namespace::Namespace;
use crate::test_harness::{DATA, Harness, sqe};

/// A RAM backend that says it is thin: 1 MiB of 8 allocated, 6 may be.
struct Thin {
    inner: MallocBackend,
    warning: Arc<AtomicU8>,
}

impl Backend for Thin {
    fn describe(&self) -> String {
        "thin".into()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn submit(&mut self, req: &IoRequest<'_>) -> Result<(), Status> {
        self.inner.submit(req)
    }
    fn poll(&mut self, done: &mut dyn FnMut(u64, Status)) -> usize {
        self.inner.poll(done)
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }
    fn thin_usage(&self) -> Option<(u64, u64)> {
        Some((1 << 20, 6 << 20))
    }
    fn capacity_warning(&self) -> Option<u8> {
        let w = self.warning.load(Ordering::Relaxed);
        (w != u8::MAX).then_some(w)
    }
}

#[test]
fn a_thin_namespace_reports_its_use_and_its_pool_warning() {
    let warning = Arc::new(AtomicU8::new(u8::MAX));
    let b = Thin {
        inner: MallocBackend::new(8 << 20).unwrap(),
        warning: warning.clone(),
    };
    let mut h = Harness::new(vec![Namespace::new(1, Box::new(b), 9, "thin")]);
    let c = h.admin(sqe(0x06, 1, DATA, &[0]));
    assert_eq!(h.admin_wait(c), Status::SUCCESS);
    let id = h.read(DATA, 32);
    let u64_at = |o: usize| u64::from_le_bytes(id[o..o + 8].try_into().unwrap());
    assert_eq!((u64_at(0), u64_at(8), u64_at(16)), (16384, 12288, 2048));
    assert_eq!(id[24] & 1, 1, "NSFEAT thin provisioning");
    // the pool crosses its threshold: the next completions raise one SMART event
    warning.store(7, Ordering::Relaxed);
    assert_eq!(h.io_run(sqe(0x00, 1, 0, &[])), Status::SUCCESS, "flush");
    assert_eq!(h.ctrl.admin.pool_warning, Some(7));
    assert_eq!(h.ctrl.admin.events.queued.len(), 1);
    assert_eq!(
        h.ctrl.admin.events.queued[0].info, 2,
        "spare below threshold"
    );
    assert_eq!(h.io_run(sqe(0x00, 1, 0, &[])), Status::SUCCESS);
    assert_eq!(h.ctrl.admin.events.queued.len(), 1, "once");
    warning.store(u8::MAX, Ordering::Relaxed);
    assert_eq!(h.io_run(sqe(0x00, 1, 0, &[])), Status::SUCCESS);
    assert_eq!(h.ctrl.admin.pool_warning, None, "cleared");
}

/// A RAM backend whose reported size a test changes (a volume resized under it).
struct Resizable {
    inner: MallocBackend,
    size: Arc<std::sync::atomic::AtomicU64>,
}

impl Backend for Resizable {
    fn describe(&self) -> String {
        "resizable".into()
    }
    fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }
    fn live_size(&self) -> Option<Arc<std::sync::atomic::AtomicU64>> {
        Some(self.size.clone())
    }
    fn submit(&mut self, req: &IoRequest<'_>) -> Result<(), Status> {
        self.inner.submit(req)
    }
    fn poll(&mut self, done: &mut dyn FnMut(u64, Status)) -> usize {
        self.inner.poll(done)
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }
}

#[test]
fn a_namespace_whose_backend_grows_is_announced_as_changed() {
    let size = Arc::new(std::sync::atomic::AtomicU64::new(4 << 20));
    let b = Resizable {
        inner: MallocBackend::new(8 << 20).unwrap(),
        size: size.clone(),
    };
    let mut h = Harness::new(vec![Namespace::new(1, Box::new(b), 9, "grow")]);
    // Set Features 0Bh: Namespace Attribute Notices on
    let c = h.admin(sqe(0x09, 0, 0, &[0x0b, 1 << 8]));
    assert_eq!(h.admin_wait(c), Status::SUCCESS);
    assert_eq!(h.io_run(sqe(0x00, 1, 0, &[])), Status::SUCCESS);
    assert!(h.ctrl.admin.events.queued.is_empty(), "nothing changed yet");
    size.store(8 << 20, Ordering::Relaxed);
    assert_eq!(h.io_run(sqe(0x00, 1, 0, &[])), Status::SUCCESS);
    assert_eq!(h.ctrl.admin.changed_ns.nsids, [1]);
    assert_eq!(h.ctrl.admin.events.queued.len(), 1);
    assert_eq!(h.ctrl.admin.events.queued[0].event_type, 2, "a notice");
    let c = h.admin(sqe(0x06, 1, DATA, &[0]));
    assert_eq!(h.admin_wait(c), Status::SUCCESS);
    let id = h.read(DATA, 8);
    assert_eq!(
        u64::from_le_bytes(id.try_into().unwrap()),
        (8 << 20) / 512,
        "NSZE"
    );
}
