//! Thin bindings of rdma-core (`libibverbs.so.1`, `librdmacm.so.1`), opened at run time
//! with `dlopen`: vnvme builds and runs where rdma-core is not installed, and says so (or
//! that there is no RDMA device) only when an RDMA transport is asked for.
//!
//! The structures below follow rdma-core's `<infiniband/verbs.h>` and `<rdma/rdma_cma.h>`
//! (ABI of libibverbs 1.x / librdmacm 1.x, stable since rdma-core 13). Only the fields we
//! read or write are named; the rest is opaque padding, checked by size assertions.
//! `ibv_post_send`, `ibv_post_recv`, `ibv_poll_cq` and `ibv_req_notify_cq` are inline
//! functions in C that call through the context's operation table: so do we.
//!
//! Everything above this module is safe code: queue pairs, completion queues and registered
//! memory are owned handles, and a work request names registered memory by handle and
//! offset, checked here against the region's bounds (the remote side's addresses and keys
//! are checked by the remote adapter, which fails the request: a completion with an error).

#![allow(unsafe_code)] // FFI to rdma-core: every block says why it holds

use std::ffi::{CStr, c_int, c_void};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::ptr::{self, NonNull};
use std::sync::{Arc, OnceLock};

/// What went wrong below the transport.
#[derive(Debug, thiserror::Error)]
pub enum VerbsError {
    #[error(
        "rdma-core is not installed ({0}); install libibverbs1, librdmacm1 and ibverbs-providers"
    )]
    NoLibrary(String),
    #[error(
        "no RDMA device; load rdma_rxe (Soft-RoCE: `modprobe rdma_rxe; rdma link add rxe0 type rxe netdev eth0`) or a hardware RDMA driver"
    )]
    NoDevice,
    #[error("{what}: {source}")]
    Call {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{0} is outside the registered memory")]
    OutOfRange(&'static str),
}

fn last_error(what: &'static str) -> VerbsError {
    VerbsError::Call {
        what,
        source: std::io::Error::last_os_error(),
    }
}

fn check(what: &'static str, rc: c_int) -> Result<(), VerbsError> {
    match rc.cmp(&0) {
        std::cmp::Ordering::Equal => Ok(()),
        // verbs calls return a positive errno; RDMA CM calls -1 and set errno
        std::cmp::Ordering::Greater => Err(VerbsError::Call {
            what,
            source: std::io::Error::from_raw_os_error(rc),
        }),
        std::cmp::Ordering::Less => Err(last_error(what)),
    }
}

// ---- C structures (rdma-core ABI) ----

/// `struct ibv_context_ops` (legacy operation table; providers fill the data-path entries).
#[repr(C)]
struct ContextOps {
    _compat: [*mut c_void; 7],
    alloc_mw: Option<unsafe extern "C" fn(*mut IbvPd, c_int) -> *mut IbvMw>,
    _bind_mw: *mut c_void,
    dealloc_mw: Option<unsafe extern "C" fn(*mut IbvMw) -> c_int>,
    _compat_create_cq: *mut c_void,
    poll_cq: Option<unsafe extern "C" fn(*mut IbvCq, c_int, *mut WorkCompletion) -> c_int>,
    req_notify_cq: Option<unsafe extern "C" fn(*mut IbvCq, c_int) -> c_int>,
    _compat2: [*mut c_void; 12],
    post_send: Option<unsafe extern "C" fn(*mut IbvQp, *mut SendWr, *mut *mut SendWr) -> c_int>,
    post_recv: Option<unsafe extern "C" fn(*mut IbvQp, *mut RecvWr, *mut *mut RecvWr) -> c_int>,
    _compat3: [*mut c_void; 5],
}

/// `struct ibv_context` (head).
#[repr(C)]
struct IbvContext {
    device: *mut c_void,
    ops: ContextOps,
}

/// `struct ibv_pd`.
#[repr(C)]
struct IbvPd {
    context: *mut IbvContext,
    handle: u32,
}

/// `struct ibv_mr`.
#[repr(C)]
struct IbvMr {
    context: *mut IbvContext,
    pd: *mut IbvPd,
    addr: *mut c_void,
    length: usize,
    handle: u32,
    lkey: u32,
    rkey: u32,
}

/// `struct ibv_cq` (head).
#[repr(C)]
struct IbvCq {
    context: *mut IbvContext,
}

/// `struct ibv_qp` (head).
#[repr(C)]
struct IbvQp {
    context: *mut IbvContext,
    qp_context: *mut c_void,
    pd: *mut IbvPd,
    send_cq: *mut IbvCq,
    recv_cq: *mut IbvCq,
    srq: *mut c_void,
    handle: u32,
    qp_num: u32,
}

/// `struct ibv_comp_channel`.
#[repr(C)]
struct IbvCompChannel {
    context: *mut IbvContext,
    fd: c_int,
    refcnt: c_int,
}

/// `struct ibv_sge`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Sge {
    addr: u64,
    length: u32,
    lkey: u32,
}

/// `struct ibv_send_wr` (128 bytes): the RDMA member of the `wr` union, and the memory
/// window bind member of the last union.
#[repr(C)]
struct SendWr {
    wr_id: u64,
    next: *mut SendWr,
    sg_list: *mut Sge,
    num_sge: c_int,
    opcode: u32,
    send_flags: u32,
    invalidate_rkey: u32,
    remote_addr: u64,
    rkey: u32,
    _wr_rest: [u8; 20],
    _qp_type: [u8; 8],
    bind_mw: *mut IbvMw,
    bind_rkey: u32,
    _pad: u32,
    bind_mr: *mut IbvMr,
    bind_addr: u64,
    bind_length: u64,
    bind_access: u32,
    _pad2: u32,
}
const _: () = assert!(size_of::<SendWr>() == 128);
const _: () = assert!(std::mem::offset_of!(SendWr, remote_addr) == 40);
const _: () = assert!(std::mem::offset_of!(SendWr, bind_mw) == 80);
const _: () = assert!(std::mem::offset_of!(SendWr, bind_access) == 120);

/// `struct ibv_mw`.
#[repr(C)]
struct IbvMw {
    context: *mut IbvContext,
    pd: *mut IbvPd,
    rkey: u32,
    handle: u32,
    kind: c_int,
}

/// `struct ibv_recv_wr`.
#[repr(C)]
struct RecvWr {
    wr_id: u64,
    next: *mut RecvWr,
    sg_list: *mut Sge,
    num_sge: c_int,
}

/// `struct ibv_wc`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct WorkCompletion {
    pub wr_id: u64,
    pub status: u32,
    pub opcode: u32,
    pub vendor_err: u32,
    pub byte_len: u32,
    pub imm_or_rkey: u32,
    pub qp_num: u32,
    pub src_qp: u32,
    pub wc_flags: u32,
    pub pkey_index: u16,
    pub slid: u16,
    pub sl: u8,
    pub dlid_path_bits: u8,
}
const _: () = assert!(size_of::<WorkCompletion>() == 48);

/// `struct ibv_qp_init_attr`.
#[repr(C)]
struct QpInitAttr {
    qp_context: *mut c_void,
    send_cq: *mut IbvCq,
    recv_cq: *mut IbvCq,
    srq: *mut c_void,
    max_send_wr: u32,
    max_recv_wr: u32,
    max_send_sge: u32,
    max_recv_sge: u32,
    max_inline_data: u32,
    qp_type: c_int,
    sq_sig_all: c_int,
}
const _: () = assert!(size_of::<QpInitAttr>() == 64);

/// `struct rdma_event_channel`.
#[repr(C)]
struct RdmaEventChannel {
    fd: c_int,
}

/// `struct rdma_cm_id` (head).
#[repr(C)]
struct RdmaCmId {
    verbs: *mut IbvContext,
    channel: *mut RdmaEventChannel,
    context: *mut c_void,
    qp: *mut IbvQp,
}

/// `struct rdma_conn_param`.
#[repr(C)]
struct ConnParam {
    private_data: *const c_void,
    private_data_len: u8,
    responder_resources: u8,
    initiator_depth: u8,
    flow_control: u8,
    retry_count: u8,
    rnr_retry_count: u8,
    srq: u8,
    qp_num: u32,
}

/// `struct rdma_cm_event` (head: the connection parameters member of its union).
#[repr(C)]
struct RdmaCmEvent {
    id: *mut RdmaCmId,
    listen_id: *mut RdmaCmId,
    event: u32,
    status: c_int,
    conn: ConnParam,
}

/// Verbs constants used here.
pub mod consts {
    pub const WR_RDMA_WRITE: u32 = 0;
    pub const WR_SEND: u32 = 2;
    pub const WR_RDMA_READ: u32 = 4;
    pub const WR_LOCAL_INV: u32 = 7;
    pub const WR_SEND_WITH_INV: u32 = 9;
    pub const WR_BIND_MW: u32 = 8;
    pub const WC_WITH_INV: u32 = 1 << 3;
    /// The kernel's `IB_WC_WITH_INVALIDATE`, which Soft-RoCE's user completions carry.
    pub const WC_WITH_INV_KERNEL: u32 = 1 << 2;
    pub const ACCESS_MW_BIND: i32 = 1 << 4;
    pub const MW_TYPE_2: i32 = 2;
    pub const SEND_SIGNALED: u32 = 1 << 1;
    pub const SEND_INLINE: u32 = 1 << 3;
    pub const WC_SUCCESS: u32 = 0;
    pub const WC_SEND: u32 = 0;
    pub const WC_RDMA_WRITE: u32 = 1;
    pub const WC_RDMA_READ: u32 = 2;
    pub const WC_RECV: u32 = 1 << 7;
    pub const ACCESS_LOCAL_WRITE: i32 = 1;
    pub const ACCESS_REMOTE_WRITE: i32 = 1 << 1;
    pub const ACCESS_REMOTE_READ: i32 = 1 << 2;
    pub const QPT_RC: i32 = 2;
    pub const PS_TCP: i32 = 0x0106;
}
use consts::{
    ACCESS_LOCAL_WRITE, ACCESS_MW_BIND, ACCESS_REMOTE_READ, ACCESS_REMOTE_WRITE, MW_TYPE_2, PS_TCP,
    QPT_RC, SEND_INLINE, SEND_SIGNALED, WR_BIND_MW, WR_LOCAL_INV, WR_RDMA_READ, WR_RDMA_WRITE,
    WR_SEND, WR_SEND_WITH_INV,
};

/// RDMA CM events (`enum rdma_cm_event_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmEventKind {
    AddrResolved,
    AddrError,
    RouteResolved,
    RouteError,
    ConnectRequest,
    ConnectResponse,
    ConnectError,
    Unreachable,
    Rejected,
    Established,
    Disconnected,
    DeviceRemoval,
    TimewaitExit,
    Other(u32),
}

impl CmEventKind {
    fn from_raw(v: u32) -> Self {
        match v {
            0 => Self::AddrResolved,
            1 => Self::AddrError,
            2 => Self::RouteResolved,
            3 => Self::RouteError,
            4 => Self::ConnectRequest,
            5 => Self::ConnectResponse,
            6 => Self::ConnectError,
            7 => Self::Unreachable,
            8 => Self::Rejected,
            9 => Self::Established,
            10 => Self::Disconnected,
            11 => Self::DeviceRemoval,
            15 => Self::TimewaitExit,
            v => Self::Other(v),
        }
    }
}

// ---- the libraries ----

type PtrFn<A> = unsafe extern "C" fn(A) -> *mut c_void;

/// The entry points we use, resolved once.
struct Lib {
    get_device_list: unsafe extern "C" fn(*mut c_int) -> *mut *mut c_void,
    free_device_list: unsafe extern "C" fn(*mut *mut c_void),
    alloc_pd: PtrFn<*mut IbvContext>,
    dealloc_pd: unsafe extern "C" fn(*mut c_void) -> c_int,
    reg_mr: unsafe extern "C" fn(*mut c_void, *mut c_void, usize, c_int) -> *mut IbvMr,
    dereg_mr: unsafe extern "C" fn(*mut IbvMr) -> c_int,
    create_comp_channel: PtrFn<*mut IbvContext>,
    destroy_comp_channel: unsafe extern "C" fn(*mut c_void) -> c_int,
    create_cq:
        unsafe extern "C" fn(*mut IbvContext, c_int, *mut c_void, *mut c_void, c_int) -> *mut IbvCq,
    destroy_cq: unsafe extern "C" fn(*mut IbvCq) -> c_int,
    get_cq_event: unsafe extern "C" fn(*mut c_void, *mut *mut IbvCq, *mut *mut c_void) -> c_int,
    ack_cq_events: unsafe extern "C" fn(*mut IbvCq, u32),
    create_event_channel: unsafe extern "C" fn() -> *mut RdmaEventChannel,
    destroy_event_channel: unsafe extern "C" fn(*mut RdmaEventChannel),
    create_id: unsafe extern "C" fn(
        *mut RdmaEventChannel,
        *mut *mut RdmaCmId,
        *mut c_void,
        c_int,
    ) -> c_int,
    destroy_id: unsafe extern "C" fn(*mut RdmaCmId) -> c_int,
    bind_addr: unsafe extern "C" fn(*mut RdmaCmId, *const libc::sockaddr) -> c_int,
    listen: unsafe extern "C" fn(*mut RdmaCmId, c_int) -> c_int,
    resolve_addr: unsafe extern "C" fn(
        *mut RdmaCmId,
        *const libc::sockaddr,
        *const libc::sockaddr,
        c_int,
    ) -> c_int,
    resolve_route: unsafe extern "C" fn(*mut RdmaCmId, c_int) -> c_int,
    connect: unsafe extern "C" fn(*mut RdmaCmId, *const ConnParam) -> c_int,
    accept: unsafe extern "C" fn(*mut RdmaCmId, *const ConnParam) -> c_int,
    reject: unsafe extern "C" fn(*mut RdmaCmId, *const c_void, u8) -> c_int,
    disconnect: unsafe extern "C" fn(*mut RdmaCmId) -> c_int,
    create_qp: unsafe extern "C" fn(*mut RdmaCmId, *mut c_void, *mut QpInitAttr) -> c_int,
    destroy_qp: unsafe extern "C" fn(*mut RdmaCmId),
    get_cm_event: unsafe extern "C" fn(*mut RdmaEventChannel, *mut *mut RdmaCmEvent) -> c_int,
    ack_cm_event: unsafe extern "C" fn(*mut RdmaCmEvent) -> c_int,
}

// SAFETY: function pointers into shared libraries that stay loaded for the process's life
// (never dlclose'd); rdma-core's entry points are thread safe.
unsafe impl Send for Lib {}
// SAFETY: as above: the table is never changed after it is resolved.
unsafe impl Sync for Lib {}

fn open_lib(name: &CStr) -> Result<*mut c_void, VerbsError> {
    // SAFETY: dlopen with a NUL-terminated name; the handle is kept for the process's life.
    let h = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if h.is_null() {
        // SAFETY: dlerror returns a NUL-terminated message or null, valid until the next call.
        let msg = unsafe { libc::dlerror() };
        let text = if msg.is_null() {
            name.to_string_lossy().into_owned()
        } else {
            // SAFETY: non-null dlerror text is a C string.
            unsafe { CStr::from_ptr(msg) }
                .to_string_lossy()
                .into_owned()
        };
        return Err(VerbsError::NoLibrary(text));
    }
    Ok(h)
}

fn symbol(h: *mut c_void, name: &CStr) -> Result<*mut c_void, VerbsError> {
    // SAFETY: `h` is a live dlopen handle and `name` a C string.
    let p = unsafe { libc::dlsym(h, name.as_ptr()) };
    if p.is_null() {
        return Err(VerbsError::NoLibrary(format!(
            "{} not found",
            name.to_string_lossy()
        )));
    }
    Ok(p)
}

macro_rules! resolve {
    ($h:expr, $name:literal) => {{
        let p = symbol($h, $name)?;
        // SAFETY: the symbol is rdma-core's function of that name, whose C signature the
        // field's type spells (rdma-core's stable ABI).
        unsafe { std::mem::transmute::<*mut c_void, _>(p) }
    }};
}

impl Lib {
    #[allow(clippy::missing_transmute_annotations)] // each field's type is the annotation
    fn load() -> Result<Self, VerbsError> {
        let ibv = open_lib(c"libibverbs.so.1")?;
        let cm = open_lib(c"librdmacm.so.1")?;
        Ok(Self {
            get_device_list: resolve!(ibv, c"ibv_get_device_list"),
            free_device_list: resolve!(ibv, c"ibv_free_device_list"),
            alloc_pd: resolve!(ibv, c"ibv_alloc_pd"),
            dealloc_pd: resolve!(ibv, c"ibv_dealloc_pd"),
            reg_mr: resolve!(ibv, c"ibv_reg_mr"),
            dereg_mr: resolve!(ibv, c"ibv_dereg_mr"),
            create_comp_channel: resolve!(ibv, c"ibv_create_comp_channel"),
            destroy_comp_channel: resolve!(ibv, c"ibv_destroy_comp_channel"),
            create_cq: resolve!(ibv, c"ibv_create_cq"),
            destroy_cq: resolve!(ibv, c"ibv_destroy_cq"),
            get_cq_event: resolve!(ibv, c"ibv_get_cq_event"),
            ack_cq_events: resolve!(ibv, c"ibv_ack_cq_events"),
            create_event_channel: resolve!(cm, c"rdma_create_event_channel"),
            destroy_event_channel: resolve!(cm, c"rdma_destroy_event_channel"),
            create_id: resolve!(cm, c"rdma_create_id"),
            destroy_id: resolve!(cm, c"rdma_destroy_id"),
            bind_addr: resolve!(cm, c"rdma_bind_addr"),
            listen: resolve!(cm, c"rdma_listen"),
            resolve_addr: resolve!(cm, c"rdma_resolve_addr"),
            resolve_route: resolve!(cm, c"rdma_resolve_route"),
            connect: resolve!(cm, c"rdma_connect"),
            accept: resolve!(cm, c"rdma_accept"),
            reject: resolve!(cm, c"rdma_reject"),
            disconnect: resolve!(cm, c"rdma_disconnect"),
            create_qp: resolve!(cm, c"rdma_create_qp"),
            destroy_qp: resolve!(cm, c"rdma_destroy_qp"),
            get_cm_event: resolve!(cm, c"rdma_get_cm_event"),
            ack_cm_event: resolve!(cm, c"rdma_ack_cm_event"),
        })
    }
}

static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();

fn lib() -> Result<&'static Lib, VerbsError> {
    LIB.get_or_init(|| {
        Lib::load().map_err(|e| match e {
            VerbsError::NoLibrary(why) => why,
            other => other.to_string(),
        })
    })
    .as_ref()
    .map_err(|e| VerbsError::NoLibrary(e.clone()))
}

/// Check that rdma-core can be loaded and at least one RDMA device exists.
pub fn probe() -> Result<usize, VerbsError> {
    let l = lib()?;
    let mut n: c_int = 0;
    // SAFETY: ibv_get_device_list writes the count and returns a list we free below.
    let list = unsafe { (l.get_device_list)(&raw mut n) };
    if list.is_null() {
        return Err(last_error("ibv_get_device_list"));
    }
    // SAFETY: the list came from ibv_get_device_list and is freed once.
    unsafe { (l.free_device_list)(list) };
    if n <= 0 {
        return Err(VerbsError::NoDevice);
    }
    Ok(n as usize)
}

fn set_nonblocking(fd: RawFd) -> Result<(), VerbsError> {
    // SAFETY: fcntl on a descriptor the library gave us; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(last_error("fcntl(O_NONBLOCK)"));
    }
    Ok(())
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { ptr::write((&raw mut ss).cast::<libc::sockaddr_in>(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { ptr::write((&raw mut ss).cast::<libc::sockaddr_in6>(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

// ---- RDMA CM ----

/// An RDMA CM event channel (non-blocking): connection events of its ids.
pub struct EventChannel {
    raw: NonNull<RdmaEventChannel>,
}

// SAFETY: librdmacm's channel may be used from any thread; we use it from one at a time.
unsafe impl Send for EventChannel {}

/// One RDMA CM event, copied out of the library's record (which is acknowledged at once).
pub struct CmEvent {
    pub kind: CmEventKind,
    pub status: i32,
    /// The id the event is about (for a connect request: the new connection's id, which
    /// the receiver must take with [`CmId::from_request`] or reject).
    pub id: RawCmId,
    pub listen_id: RawCmId,
    pub private_data: Vec<u8>,
    pub responder_resources: u8,
    pub initiator_depth: u8,
    /// For a connect request: the new connection's id, to accept or reject (dropping it
    /// destroys it).
    pub request: Option<CmId>,
}

impl std::fmt::Debug for CmEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CmEvent")
            .field("kind", &self.kind)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

/// An id as an event names it, to compare with our ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawCmId(usize);

impl EventChannel {
    pub fn new() -> Result<Self, VerbsError> {
        let l = lib()?;
        // SAFETY: plain constructor; null on error.
        let raw = NonNull::new(unsafe { (l.create_event_channel)() })
            .ok_or_else(|| last_error("rdma_create_event_channel"))?;
        let ch = Self { raw };
        set_nonblocking(ch.fd())?;
        Ok(ch)
    }

    /// The channel's descriptor (readable when an event waits).
    pub fn fd(&self) -> RawFd {
        // SAFETY: the channel is live while self is.
        unsafe { (*self.raw.as_ptr()).fd }
    }

    /// The next event, if one waits.
    pub fn next(&self) -> Result<Option<CmEvent>, VerbsError> {
        let l = lib()?;
        let mut ev: *mut RdmaCmEvent = ptr::null_mut();
        // SAFETY: the channel is live; the event is acknowledged below.
        let rc = unsafe { (l.get_cm_event)(self.raw.as_ptr(), &raw mut ev) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(VerbsError::Call {
                what: "rdma_get_cm_event",
                source: e,
            });
        }
        // SAFETY: a successful rdma_get_cm_event gives a valid event until it is acked; the
        // private data (when present) is `private_data_len` bytes.
        let out = unsafe {
            let e = &*ev;
            let private_data = if e.conn.private_data.is_null() {
                Vec::new()
            } else {
                std::slice::from_raw_parts(
                    e.conn.private_data.cast::<u8>(),
                    e.conn.private_data_len as usize,
                )
                .to_vec()
            };
            let kind = CmEventKind::from_raw(e.event);
            CmEvent {
                request: if kind == CmEventKind::ConnectRequest {
                    NonNull::new(e.id).map(|raw| CmId {
                        raw,
                        has_qp: false,
                        cq: None,
                    })
                } else {
                    None
                },
                kind,
                status: e.status,
                id: RawCmId(e.id as usize),
                listen_id: RawCmId(e.listen_id as usize),
                private_data,
                responder_resources: e.conn.responder_resources,
                initiator_depth: e.conn.initiator_depth,
            }
        };
        // SAFETY: acknowledging the event we got; it is not used after this.
        unsafe { (l.ack_cm_event)(ev) };
        Ok(Some(out))
    }
}

impl AsRawFd for EventChannel {
    fn as_raw_fd(&self) -> RawFd {
        self.fd()
    }
}

impl Drop for EventChannel {
    fn drop(&mut self) {
        if let Ok(l) = lib() {
            // SAFETY: every id of the channel is destroyed before it (owners drop ids first).
            unsafe { (l.destroy_event_channel)(self.raw.as_ptr()) };
        }
    }
}

/// An RDMA CM id: a listener, or one connection with its queue pair.
pub struct CmId {
    raw: NonNull<RdmaCmId>,
    has_qp: bool,
    /// Objects the queue pair uses; dropped after it.
    cq: Option<Arc<CompletionQueue>>,
}

// SAFETY: an id is used by one thread at a time (its owner's); librdmacm allows that.
unsafe impl Send for CmId {}

impl CmId {
    /// A new id on `channel` (TCP port space, reliable connected queue pairs).
    pub fn new(channel: &EventChannel) -> Result<Self, VerbsError> {
        let l = lib()?;
        let mut raw: *mut RdmaCmId = ptr::null_mut();
        // SAFETY: the channel is live; the id is destroyed in Drop.
        check("rdma_create_id", unsafe {
            (l.create_id)(channel.raw.as_ptr(), &raw mut raw, ptr::null_mut(), PS_TCP)
        })?;
        Ok(Self {
            raw: NonNull::new(raw).ok_or_else(|| last_error("rdma_create_id"))?,
            has_qp: false,
            cq: None,
        })
    }

    /// How events name this id.
    pub fn raw(&self) -> RawCmId {
        RawCmId(self.raw.as_ptr() as usize)
    }

    pub fn bind(&self, addr: SocketAddr) -> Result<(), VerbsError> {
        let l = lib()?;
        let (ss, _) = sockaddr(addr);
        // SAFETY: the id is live; the address is a valid sockaddr for its family.
        check("rdma_bind_addr", unsafe {
            (l.bind_addr)(self.raw.as_ptr(), (&raw const ss).cast())
        })
    }

    pub fn listen(&self, backlog: i32) -> Result<(), VerbsError> {
        let l = lib()?;
        // SAFETY: the id is live and bound.
        check("rdma_listen", unsafe {
            (l.listen)(self.raw.as_ptr(), backlog)
        })
    }

    /// Resolve `dst` to a device and path (RDMA CM answers with an event).
    pub fn resolve_addr(&self, dst: SocketAddr, timeout_ms: i32) -> Result<(), VerbsError> {
        let l = lib()?;
        let (ss, _) = sockaddr(dst);
        // SAFETY: the id is live; the address is a valid sockaddr.
        check("rdma_resolve_addr", unsafe {
            (l.resolve_addr)(
                self.raw.as_ptr(),
                ptr::null(),
                (&raw const ss).cast(),
                timeout_ms,
            )
        })
    }

    pub fn resolve_route(&self, timeout_ms: i32) -> Result<(), VerbsError> {
        let l = lib()?;
        // SAFETY: the id is live with its address resolved.
        check("rdma_resolve_route", unsafe {
            (l.resolve_route)(self.raw.as_ptr(), timeout_ms)
        })
    }

    /// The device context the id is bound to (after address resolution or a request).
    pub fn device(&self) -> Option<Device> {
        // SAFETY: the id is live; `verbs` is set once it is bound to a device.
        let ctx = unsafe { (*self.raw.as_ptr()).verbs };
        NonNull::new(ctx).map(|c| Device(c.as_ptr() as usize))
    }

    /// Create the id's reliable connected queue pair on `pd`, both directions on `cq`.
    pub fn create_qp(
        &mut self,
        pd: &ProtectionDomain,
        cq: &Arc<CompletionQueue>,
        send_wr: u32,
        recv_wr: u32,
        inline: u32,
    ) -> Result<(), VerbsError> {
        let l = lib()?;
        let mut attr = QpInitAttr {
            qp_context: ptr::null_mut(),
            send_cq: cq.raw.as_ptr(),
            recv_cq: cq.raw.as_ptr(),
            srq: ptr::null_mut(),
            max_send_wr: send_wr,
            max_recv_wr: recv_wr,
            max_send_sge: 1,
            max_recv_sge: 1,
            max_inline_data: inline,
            qp_type: QPT_RC,
            sq_sig_all: 0,
        };
        // SAFETY: the id, PD and CQ are live; the QP is destroyed before them (Drop).
        check("rdma_create_qp", unsafe {
            (l.create_qp)(self.raw.as_ptr(), pd.raw.as_ptr().cast(), &raw mut attr)
        })?;
        self.has_qp = true;
        self.cq = Some(Arc::clone(cq));
        Ok(())
    }

    fn conn_param(private: &[u8], resources: u8, depth: u8) -> ConnParam {
        ConnParam {
            private_data: private.as_ptr().cast(),
            private_data_len: private.len().min(255) as u8,
            responder_resources: resources,
            initiator_depth: depth,
            flow_control: 1,
            retry_count: 7,
            rnr_retry_count: 7,
            srq: 0,
            qp_num: 0,
        }
    }

    /// Accept a connect request with `private` data (NVMe/RDMA: the CM accept record).
    pub fn accept(&self, private: &[u8], resources: u8, depth: u8) -> Result<(), VerbsError> {
        let l = lib()?;
        let p = Self::conn_param(private, resources, depth);
        // SAFETY: the id is live; the parameters and private data outlive the call.
        check("rdma_accept", unsafe {
            (l.accept)(self.raw.as_ptr(), &raw const p)
        })
    }

    /// Refuse a connect request with `private` data (the CM reject record).
    pub fn reject(&self, private: &[u8]) -> Result<(), VerbsError> {
        let l = lib()?;
        // SAFETY: the id is live; the data outlives the call.
        check("rdma_reject", unsafe {
            (l.reject)(
                self.raw.as_ptr(),
                private.as_ptr().cast(),
                private.len().min(255) as u8,
            )
        })
    }

    /// Connect (after the route is resolved and the QP exists) with `private` data.
    pub fn connect(&self, private: &[u8], resources: u8, depth: u8) -> Result<(), VerbsError> {
        let l = lib()?;
        let p = Self::conn_param(private, resources, depth);
        // SAFETY: the id is live; the parameters outlive the call.
        check("rdma_connect", unsafe {
            (l.connect)(self.raw.as_ptr(), &raw const p)
        })
    }

    pub fn disconnect(&self) {
        if let Ok(l) = lib() {
            // SAFETY: the id is live; disconnecting twice is harmless (EINVAL).
            unsafe { (l.disconnect)(self.raw.as_ptr()) };
        }
    }

    /// The queue pair (after [`create_qp`](Self::create_qp)).
    pub fn qp(&self) -> Option<QueuePair<'_>> {
        if !self.has_qp {
            return None;
        }
        // SAFETY: the id is live and has a QP.
        let qp = unsafe { (*self.raw.as_ptr()).qp };
        NonNull::new(qp).map(|raw| QueuePair {
            raw,
            _id: std::marker::PhantomData,
        })
    }
}

impl Drop for CmId {
    fn drop(&mut self) {
        let Ok(l) = lib() else { return };
        if self.has_qp {
            // SAFETY: the QP was created on this id and is destroyed once.
            unsafe { (l.destroy_qp)(self.raw.as_ptr()) };
        }
        // SAFETY: the id is ours and destroyed once; its events were acknowledged.
        unsafe { (l.destroy_id)(self.raw.as_ptr()) };
        self.cq = None;
    }
}

/// A device context, as an id names it (owned by librdmacm, alive while the device is).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Device(usize);

// ---- protection domains and registered memory ----

/// A protection domain on one device.
pub struct ProtectionDomain {
    raw: NonNull<IbvPd>,
    device: Device,
}

// SAFETY: verbs objects may be used from any thread; ours are used by one at a time.
unsafe impl Send for ProtectionDomain {}
// SAFETY: a PD is only read (to register memory, to create QPs), which verbs allows concurrently.
unsafe impl Sync for ProtectionDomain {}

impl ProtectionDomain {
    pub fn new(device: Device) -> Result<Self, VerbsError> {
        let l = lib()?;
        // SAFETY: `device` came from a live CM id's context (librdmacm keeps it open).
        let raw = NonNull::new(unsafe { (l.alloc_pd)(device.0 as *mut IbvContext) })
            .ok_or_else(|| last_error("ibv_alloc_pd"))?;
        Ok(Self {
            raw: raw.cast(),
            device,
        })
    }

    pub fn device(&self) -> Device {
        self.device
    }
}

impl Drop for ProtectionDomain {
    fn drop(&mut self) {
        if let Ok(l) = lib() {
            // SAFETY: every MR and QP on the PD holds an Arc to it, so none is left.
            unsafe { (l.dealloc_pd)(self.raw.as_ptr().cast()) };
        }
    }
}

/// Memory registered with a device: owned anonymous memory, or a shared mapping of a file
/// (the target's command buffers, which the emulated controller sees too).
pub struct Region {
    mr: NonNull<IbvMr>,
    map: memmap2::MmapMut,
    _pd: Arc<ProtectionDomain>,
}

// SAFETY: the region's memory is only touched through copies (`read`, `write`) and by the
// device; the MR handle is used by one thread at a time.
unsafe impl Send for Region {}
// SAFETY: as above: copies in and out are plain byte copies of memory the device may access.
unsafe impl Sync for Region {}

impl Region {
    /// `len` bytes of zeroed anonymous memory, registered for local and remote access.
    pub fn anonymous(pd: &Arc<ProtectionDomain>, len: usize) -> Result<Self, VerbsError> {
        let map = memmap2::MmapMut::map_anon(len.max(1)).map_err(|source| VerbsError::Call {
            what: "mmap",
            source,
        })?;
        Self::register(pd, map)
    }

    /// `len` bytes of `fd` from offset 0, mapped shared and registered.
    pub fn of_fd(
        pd: &Arc<ProtectionDomain>,
        fd: BorrowedFd<'_>,
        len: usize,
    ) -> Result<Self, VerbsError> {
        // SAFETY: a shared mapping of a memfd the caller owns; its bytes are only accessed
        // by copy here and by devices (the controller and the RDMA adapter), never as Rust
        // references, so concurrent change is not undefined behaviour.
        let map =
            unsafe { memmap2::MmapOptions::new().len(len).map_mut(&fd) }.map_err(|source| {
                VerbsError::Call {
                    what: "mmap",
                    source,
                }
            })?;
        Self::register(pd, map)
    }

    fn register(pd: &Arc<ProtectionDomain>, mut map: memmap2::MmapMut) -> Result<Self, VerbsError> {
        let l = lib()?;
        let access = ACCESS_LOCAL_WRITE | ACCESS_REMOTE_WRITE | ACCESS_REMOTE_READ;
        // SAFETY: the mapping lives as long as the registration (both in Self; the MR is
        // deregistered first in Drop).
        let mr = unsafe {
            (l.reg_mr)(
                pd.raw.as_ptr().cast(),
                map.as_mut_ptr().cast(),
                map.len(),
                access,
            )
        };
        let mr = NonNull::new(mr).ok_or_else(|| last_error("ibv_reg_mr"))?;
        Ok(Self {
            mr,
            map,
            _pd: Arc::clone(pd),
        })
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The key a peer uses to reach this memory.
    pub fn rkey(&self) -> u32 {
        // SAFETY: the MR is live while self is.
        unsafe { (*self.mr.as_ptr()).rkey }
    }

    fn lkey(&self) -> u32 {
        // SAFETY: the MR is live while self is.
        unsafe { (*self.mr.as_ptr()).lkey }
    }

    /// The address a peer uses with [`rkey`](Self::rkey) for byte `offset`.
    pub fn remote_addr(&self, offset: usize) -> u64 {
        self.map.as_ptr() as u64 + offset as u64
    }

    fn sge(&self, offset: usize, len: usize) -> Result<Sge, VerbsError> {
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.map.len())
            || len > u32::MAX as usize
        {
            return Err(VerbsError::OutOfRange("local buffer"));
        }
        Ok(Sge {
            addr: self.remote_addr(offset),
            length: len as u32,
            lkey: self.lkey(),
        })
    }

    /// Copy `out.len()` bytes at `offset` out (the caller knows the device is not writing
    /// them: a receive that completed, data whose transfer completed).
    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<(), VerbsError> {
        self.sge(offset, out.len())?;
        // SAFETY: inside the mapping (checked); a byte copy, never a reference held across
        // a change by the device.
        unsafe {
            ptr::copy_nonoverlapping(self.map.as_ptr().add(offset), out.as_mut_ptr(), out.len());
        }
        Ok(())
    }

    /// Copy `data` in at `offset`.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), VerbsError> {
        self.sge(offset, data.len())?;
        // SAFETY: inside the mapping (checked); a byte copy. The mapping is writable and
        // only ever accessed by copy, so writing through a shared handle is sound.
        unsafe {
            ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.map.as_ptr().add(offset).cast_mut(),
                data.len(),
            );
        }
        Ok(())
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        if let Ok(l) = lib() {
            // SAFETY: the MR is ours; every QP that could use it is gone first (owners drop
            // connections before regions).
            unsafe { (l.dereg_mr)(self.mr.as_ptr()) };
        }
    }
}

/// A region of guest memory registered for memory windows only (no remote access of its
/// own): a peer reaches a piece of it only through a window bound over that piece for one
/// command. Holds the map snapshot, so the mapping outlives the registration.
pub struct GuestMr {
    mr: NonNull<IbvMr>,
    start: u64,
    len: u64,
    _map: Arc<device_model::memory::MemoryMap>,
    _pd: Arc<ProtectionDomain>,
}

// SAFETY: the MR handle is only read (its pointer passed to bind requests); the memory is
// the guest's, reached only by the adapter through windows.
unsafe impl Send for GuestMr {}
// SAFETY: as above.
unsafe impl Sync for GuestMr {}

impl GuestMr {
    /// Register region `index` of `map` on `pd` (`None`: the region has no mapping here).
    pub fn register(
        pd: &Arc<ProtectionDomain>,
        map: &Arc<device_model::memory::MemoryMap>,
        index: usize,
    ) -> Result<Option<Self>, VerbsError> {
        let l = lib()?;
        let Some(b) = map
            .regions()
            .get(index)
            .and_then(device_model::memory::Region::backing)
        else {
            return Ok(None);
        };
        let len = usize::try_from(b.len).map_err(|_| VerbsError::OutOfRange("guest region"))?;
        // SAFETY: `b.host` maps `len` bytes for as long as `map` (an Arc we keep in Self) is
        // alive; the MR is deregistered in Drop, before that Arc goes.
        let mr = unsafe {
            (l.reg_mr)(
                pd.raw.as_ptr().cast(),
                b.host.cast(),
                len,
                ACCESS_LOCAL_WRITE | ACCESS_MW_BIND,
            )
        };
        let mr = NonNull::new(mr).ok_or_else(|| last_error("ibv_reg_mr (guest memory)"))?;
        Ok(Some(Self {
            mr,
            start: b.host as u64,
            len: b.len,
            _map: Arc::clone(map),
            _pd: Arc::clone(pd),
        }))
    }

    /// Whether `[addr, addr + len)` (host addresses) lies inside.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.start && addr.saturating_add(len) <= self.start + self.len
    }
}

impl Drop for GuestMr {
    fn drop(&mut self) {
        if let Ok(l) = lib() {
            // SAFETY: ours, deregistered once; windows over it are invalidated first (the
            // owner keeps a registration while a window may be bound over it).
            unsafe { (l.dereg_mr)(self.mr.as_ptr()) };
        }
    }
}

/// A type 2 memory window: bound over a piece of a [`GuestMr`] for one command, then
/// invalidated (by the peer's Send with Invalidate, or by us).
pub struct MemoryWindow {
    raw: NonNull<IbvMw>,
    /// The key of the next bind (the low byte counts binds).
    next_rkey: u32,
    _pd: Arc<ProtectionDomain>,
}

// SAFETY: used by one thread at a time (its queue's owner).
unsafe impl Send for MemoryWindow {}

impl MemoryWindow {
    pub fn new(pd: &Arc<ProtectionDomain>) -> Result<Self, VerbsError> {
        // SAFETY: the PD and its context are live; alloc_mw is the provider's entry.
        let raw = unsafe {
            let ctx = (*pd.raw.as_ptr()).context;
            let f = (*ctx)
                .ops
                .alloc_mw
                .ok_or(VerbsError::OutOfRange("memory windows (not supported)"))?;
            f(pd.raw.as_ptr(), MW_TYPE_2)
        };
        let raw = NonNull::new(raw).ok_or_else(|| last_error("ibv_alloc_mw"))?;
        // SAFETY: a live MW.
        let rkey = unsafe { (*raw.as_ptr()).rkey };
        Ok(Self {
            raw,
            next_rkey: rkey,
            _pd: Arc::clone(pd),
        })
    }
}

impl Drop for MemoryWindow {
    fn drop(&mut self) {
        // SAFETY: ours, freed once, after its queue pair is gone (owners drop QPs first).
        unsafe {
            let ctx = (*self.raw.as_ptr()).context;
            if let Some(f) = (*ctx).ops.dealloc_mw {
                f(self.raw.as_ptr());
            }
        }
    }
}

// ---- completion queues ----

/// A completion queue with its completion channel (non-blocking, for sleeping on).
pub struct CompletionQueue {
    raw: NonNull<IbvCq>,
    channel: NonNull<IbvCompChannel>,
    armed: std::sync::atomic::AtomicBool,
}

// SAFETY: used by one thread at a time (the owner's reactor); verbs allows any thread.
unsafe impl Send for CompletionQueue {}
// SAFETY: polling and arming go through the provider, which serialises them per CQ.
unsafe impl Sync for CompletionQueue {}

impl CompletionQueue {
    pub fn new(device: Device, entries: i32) -> Result<Self, VerbsError> {
        let l = lib()?;
        let ctx = device.0 as *mut IbvContext;
        // SAFETY: a live device context (owned by librdmacm while the device exists).
        let channel = NonNull::new(unsafe { (l.create_comp_channel)(ctx) })
            .ok_or_else(|| last_error("ibv_create_comp_channel"))?
            .cast::<IbvCompChannel>();
        // SAFETY: as above; the channel is live.
        let raw =
            unsafe { (l.create_cq)(ctx, entries, ptr::null_mut(), channel.as_ptr().cast(), 0) };
        let Some(raw) = NonNull::new(raw) else {
            let e = last_error("ibv_create_cq");
            // SAFETY: the channel has no CQ and is destroyed once.
            unsafe { (l.destroy_comp_channel)(channel.as_ptr().cast()) };
            return Err(e);
        };
        let cq = Self {
            raw,
            channel,
            armed: std::sync::atomic::AtomicBool::new(false),
        };
        // SAFETY: the channel is live.
        set_nonblocking(unsafe { (*channel.as_ptr()).fd })?;
        Ok(cq)
    }

    /// Up to `out.len()` completions; returns how many.
    pub fn poll(&self, out: &mut [WorkCompletion]) -> Result<usize, VerbsError> {
        // SAFETY: the CQ and its context are live; the provider's poll_cq writes at most
        // `out.len()` entries of the C layout WorkCompletion mirrors.
        let n = unsafe {
            let ctx = (*self.raw.as_ptr()).context;
            let f = (*ctx)
                .ops
                .poll_cq
                .ok_or(VerbsError::OutOfRange("poll_cq"))?;
            f(self.raw.as_ptr(), out.len() as c_int, out.as_mut_ptr())
        };
        if n < 0 {
            return Err(VerbsError::Call {
                what: "ibv_poll_cq",
                source: std::io::Error::other("CQ error"),
            });
        }
        Ok(n as usize)
    }

    /// The completion channel's descriptor: readable after [`arm`](Self::arm) once a
    /// completion arrives.
    pub fn fd(&self) -> RawFd {
        // SAFETY: the channel is live while self is.
        unsafe { (*self.channel.as_ptr()).fd }
    }

    /// Ask for an event on the next completion (poll again after: one may have arrived
    /// before). Returns false when already armed.
    pub fn arm(&self) -> Result<bool, VerbsError> {
        if self.armed.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return Ok(false);
        }
        // SAFETY: the CQ and its context are live.
        let rc = unsafe {
            let ctx = (*self.raw.as_ptr()).context;
            let f = (*ctx)
                .ops
                .req_notify_cq
                .ok_or(VerbsError::OutOfRange("req_notify_cq"))?;
            f(self.raw.as_ptr(), 0)
        };
        check("ibv_req_notify_cq", rc)?;
        Ok(true)
    }

    /// Take the channel's pending events (the CQ is then no longer armed). Costs nothing
    /// (no system call) while the CQ is not armed: there are none then.
    pub fn drain_events(&self) {
        if !self.armed.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let Ok(l) = lib() else { return };
        let mut n = 0u32;
        loop {
            let mut cq: *mut IbvCq = ptr::null_mut();
            let mut ctx: *mut c_void = ptr::null_mut();
            // SAFETY: the channel is live and non-blocking; events are acked below.
            let rc = unsafe {
                (l.get_cq_event)(self.channel.as_ptr().cast(), &raw mut cq, &raw mut ctx)
            };
            if rc != 0 {
                break;
            }
            n += 1;
        }
        if n > 0 {
            // SAFETY: acknowledging the events just taken for this CQ.
            unsafe { (l.ack_cq_events)(self.raw.as_ptr(), n) };
            self.armed
                .store(false, std::sync::atomic::Ordering::Release);
        }
    }
}

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        let Ok(l) = lib() else { return };
        self.drain_events();
        // SAFETY: the QP using the CQ is gone (the CmId holding it dropped first, it keeps
        // an Arc); destroyed once, then its channel.
        unsafe {
            (l.destroy_cq)(self.raw.as_ptr());
            (l.destroy_comp_channel)(self.channel.as_ptr().cast());
        }
    }
}

// ---- queue pairs: posting work ----

/// A connection's queue pair, borrowed from its [`CmId`].
pub struct QueuePair<'a> {
    raw: NonNull<IbvQp>,
    _id: std::marker::PhantomData<&'a CmId>,
}

impl QueuePair<'_> {
    fn post(&self, mut wr: SendWr) -> Result<(), VerbsError> {
        let mut bad: *mut SendWr = ptr::null_mut();
        // SAFETY: the QP is live (borrowed from its id); the request and its scatter entry
        // are valid for the call (the provider copies them); local memory it names is a
        // registered region, checked by `Region::sge`.
        let rc = unsafe {
            let ctx = (*self.raw.as_ptr()).context;
            let f = (*ctx)
                .ops
                .post_send
                .ok_or(VerbsError::OutOfRange("post_send"))?;
            f(self.raw.as_ptr(), &raw mut wr, &raw mut bad)
        };
        check("ibv_post_send", rc)
    }

    fn send_wr(wr_id: u64, sge: *mut Sge, opcode: u32, flags: u32) -> SendWr {
        SendWr {
            wr_id,
            next: ptr::null_mut(),
            sg_list: sge,
            num_sge: 1,
            opcode,
            send_flags: flags,
            invalidate_rkey: 0,
            remote_addr: 0,
            rkey: 0,
            _wr_rest: [0; 20],
            _qp_type: [0; 8],
            bind_mw: ptr::null_mut(),
            bind_rkey: 0,
            _pad: 0,
            bind_mr: ptr::null_mut(),
            bind_addr: 0,
            bind_length: 0,
            bind_access: 0,
            _pad2: 0,
        }
    }

    /// Bind `mw` over `[addr, addr + len)` of `mr` (host addresses) for remote `write`s (else
    /// reads) only; returns the key the peer uses. Ordered before what is posted after it;
    /// signaled, so a failed bind shows as its own completion.
    pub fn bind_window(
        &self,
        wr_id: u64,
        mw: &mut MemoryWindow,
        mr: &GuestMr,
        (addr, len): (u64, u64),
        write: bool,
    ) -> Result<u32, VerbsError> {
        if !mr.contains(addr, len) {
            return Err(VerbsError::OutOfRange("window"));
        }
        // ibv_inc_rkey: a new tag in the low byte for every bind
        let rkey = (mw.next_rkey & 0xffff_ff00) | (mw.next_rkey.wrapping_add(1) & 0xff);
        let mut wr = Self::send_wr(wr_id, ptr::null_mut(), WR_BIND_MW, SEND_SIGNALED);
        wr.num_sge = 0;
        wr.bind_mw = mw.raw.as_ptr();
        wr.bind_rkey = rkey;
        wr.bind_mr = mr.mr.as_ptr();
        wr.bind_addr = addr;
        wr.bind_length = len;
        wr.bind_access = if write {
            ACCESS_REMOTE_WRITE as u32
        } else {
            ACCESS_REMOTE_READ as u32
        };
        self.post(wr)?;
        // the window's key is now `rkey`: the provider checks the next bind against the
        // `ibv_mw` record's key, which the application keeps (as ibv_bind_mw does)
        // SAFETY: our live MW record; no other thread touches it.
        unsafe { (*mw.raw.as_ptr()).rkey = rkey };
        mw.next_rkey = rkey;
        Ok(rkey)
    }

    /// Invalidate `rkey` (a window's) locally; signaled when `signaled`.
    pub fn invalidate(&self, wr_id: u64, rkey: u32, signaled: bool) -> Result<(), VerbsError> {
        let flags = if signaled { SEND_SIGNALED } else { 0 };
        let mut wr = Self::send_wr(wr_id, ptr::null_mut(), WR_LOCAL_INV, flags);
        wr.num_sge = 0;
        wr.invalidate_rkey = rkey;
        self.post(wr)
    }

    /// Post a receive of up to `len` bytes into `region` at `offset`.
    pub fn post_recv(
        &self,
        wr_id: u64,
        region: &Region,
        offset: usize,
        len: usize,
    ) -> Result<(), VerbsError> {
        let mut sge = region.sge(offset, len)?;
        let mut wr = RecvWr {
            wr_id,
            next: ptr::null_mut(),
            sg_list: &raw mut sge,
            num_sge: 1,
        };
        let mut bad: *mut RecvWr = ptr::null_mut();
        // SAFETY: as in `post`; the buffer stays registered while the QP lives.
        let rc = unsafe {
            let ctx = (*self.raw.as_ptr()).context;
            let f = (*ctx)
                .ops
                .post_recv
                .ok_or(VerbsError::OutOfRange("post_recv"))?;
            f(self.raw.as_ptr(), &raw mut wr, &raw mut bad)
        };
        check("ibv_post_recv", rc)
    }

    /// Send `data` (at most the QP's inline size) copied into the request: no buffer to
    /// keep. Signaled when `signaled`.
    pub fn send_inline(&self, wr_id: u64, data: &[u8], signaled: bool) -> Result<(), VerbsError> {
        let mut sge = Sge {
            addr: data.as_ptr() as u64,
            length: data.len() as u32,
            lkey: 0,
        };
        let flags = SEND_INLINE | if signaled { SEND_SIGNALED } else { 0 };
        self.post(Self::send_wr(wr_id, &raw mut sge, WR_SEND, flags))
    }

    /// Send `data` as [`send_inline`](Self::send_inline) does, invalidating the peer's key
    /// `rkey` with it (Send with Invalidate).
    pub fn send_inline_invalidating(
        &self,
        wr_id: u64,
        data: &[u8],
        rkey: u32,
        signaled: bool,
    ) -> Result<(), VerbsError> {
        let mut sge = Sge {
            addr: data.as_ptr() as u64,
            length: data.len() as u32,
            lkey: 0,
        };
        let flags = SEND_INLINE | if signaled { SEND_SIGNALED } else { 0 };
        let mut wr = Self::send_wr(wr_id, &raw mut sge, WR_SEND_WITH_INV, flags);
        wr.invalidate_rkey = rkey;
        self.post(wr)
    }

    /// Send `len` bytes of `region` at `offset` (signaled).
    pub fn send(
        &self,
        wr_id: u64,
        region: &Region,
        offset: usize,
        len: usize,
    ) -> Result<(), VerbsError> {
        let mut sge = region.sge(offset, len)?;
        self.post(Self::send_wr(wr_id, &raw mut sge, WR_SEND, SEND_SIGNALED))
    }

    /// RDMA Write `len` bytes of `region` at `offset` to the peer's `(address, key)`.
    pub fn write(
        &self,
        wr_id: u64,
        region: &Region,
        (offset, len): (usize, usize),
        (remote, rkey): (u64, u32),
        signaled: bool,
    ) -> Result<(), VerbsError> {
        let mut sge = region.sge(offset, len)?;
        let flags = if signaled { SEND_SIGNALED } else { 0 };
        let mut wr = Self::send_wr(wr_id, &raw mut sge, WR_RDMA_WRITE, flags);
        wr.remote_addr = remote;
        wr.rkey = rkey;
        self.post(wr)
    }

    /// RDMA Read `len` bytes from the peer's `(address, key)` into `region` at `offset`
    /// (signaled).
    pub fn read(
        &self,
        wr_id: u64,
        region: &Region,
        (offset, len): (usize, usize),
        (remote, rkey): (u64, u32),
    ) -> Result<(), VerbsError> {
        let mut sge = region.sge(offset, len)?;
        let mut wr = Self::send_wr(wr_id, &raw mut sge, WR_RDMA_READ, SEND_SIGNALED);
        wr.remote_addr = remote;
        wr.rkey = rkey;
        self.post(wr)
    }
}

/// Human text for an `ibv_wc_status`.
pub fn wc_status_text(status: u32) -> &'static str {
    match status {
        0 => "success",
        1 => "local length error",
        2 => "local QP operation error",
        4 => "local protection error",
        5 => "work request flushed",
        9 => "remote invalid request",
        10 => "remote access error",
        11 => "remote operation error",
        12 => "transport retry counter exceeded",
        13 => "RNR retry counter exceeded",
        _ => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_rdma_core() {
        assert_eq!(std::mem::offset_of!(ContextOps, poll_cq), 11 * 8);
        assert_eq!(std::mem::offset_of!(ContextOps, alloc_mw), 7 * 8);
        assert_eq!(std::mem::offset_of!(ContextOps, dealloc_mw), 9 * 8);
        assert_eq!(std::mem::offset_of!(IbvMw, rkey), 16);
        assert_eq!(std::mem::offset_of!(ContextOps, post_send), 25 * 8);
        assert_eq!(std::mem::offset_of!(ContextOps, post_recv), 26 * 8);
        assert_eq!(size_of::<ContextOps>(), 32 * 8);
        assert_eq!(std::mem::offset_of!(IbvQp, qp_num), 52);
        assert_eq!(std::mem::offset_of!(IbvMr, rkey), 40);
        assert_eq!(std::mem::offset_of!(RdmaCmId, qp), 24);
        assert_eq!(std::mem::offset_of!(RdmaCmEvent, conn), 24);
        assert_eq!(std::mem::offset_of!(ConnParam, qp_num), 16);
        assert_eq!(size_of::<RecvWr>(), 32);
    }

    #[test]
    fn missing_device_or_library_is_a_clear_error() {
        // on a machine with a device this passes through; without, the error says what to do
        match probe() {
            Ok(n) => assert!(n > 0),
            Err(e) => {
                let t = e.to_string();
                assert!(
                    t.contains("rdma_rxe") || t.contains("rdma-core is not installed"),
                    "{t}"
                );
            }
        }
    }

    #[test]
    fn event_kinds() {
        assert_eq!(CmEventKind::from_raw(4), CmEventKind::ConnectRequest);
        assert_eq!(CmEventKind::from_raw(10), CmEventKind::Disconnected);
        assert_eq!(CmEventKind::from_raw(99), CmEventKind::Other(99));
    }
}
