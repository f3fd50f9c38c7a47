//! The NVMe-oF host side (TCP and RDMA transports, one fabrics layer): a namespace [`Backend`](device_model::backend::Backend) on a
//! remote namespace ([`TcpBackend`]) and discovery ([`discover`]).
//!
//! - `url.rs`: the `nvme-tcp://` address and its options;
//! - `queue.rs`: one connection = one queue, its set-up and its commands in flight;
//! - `admin.rs`: synchronous admin commands (Property Get/Set, Identify, Keep Alive, ...);
//! - `session.rs`: the association with a controller, kept alive and reconnected;
//! - `backend.rs`: the backend the reactor polls;
//! - `discovery.rs`: the Discovery log page;
//! - `host_identity.rs`: host NQN and host ID.

mod admin;
// guest buffers (and the static zero chunk) handed to queues as iovecs
#[allow(unsafe_code)]
mod backend;
mod discovery;
mod host_identity;
// a synchronous command's local buffers as guest buffers
#[allow(unsafe_code)]
pub mod queue;
mod session;
mod url;

pub use backend::TcpBackend;
pub use discovery::{DiscoveryRecord, discover, discover_over};
pub use host_identity::HostIdentity;
pub use session::{RemoteNamespace, SessionError};
pub use url::{RDMA_SCHEME, SCHEME, TcpUrl, Transport, UrlError, is_fabrics_url};
