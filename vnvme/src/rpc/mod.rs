//! The management plane: JSON-RPC 2.0 over a Unix socket, one request per line (SPDK's
//! model: `vnvme rpc METHOD` is to vnvme what `rpc.py` is to SPDK). The daemon's main thread
//! serves it between signal checks, so a request sees and changes the daemon without locks.
//!
//! Methods ([`methods`]): `subsystem_list`, `controller_list`, `subsystem_create`,
//! `subsystem_delete`, `ns_create`, `ns_delete`, `ns_attach`, `ns_detach`, `qos_set`,
//! `vf_enable`, `stats`, the arrays' `raid_*` and the volume stores' `lvs_*` and `lvol_*`
//! ([`lvol_methods`]).

pub(crate) mod acceptor;
pub mod client;
pub mod lvol_methods;
pub mod methods;
pub(crate) mod request_lines;
pub(crate) mod server;

pub use server::{RpcServer, answer};

/// Error codes (JSON-RPC 2.0 §5.1; -32000: the daemon refused the request).
pub mod code {
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    pub const INVALID_PARAMS: i64 = -32602;
    pub const REFUSED: i64 = -32000;
}

/// A request's failure: code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
}

impl RpcError {
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// The response to a request with id `id`: its result or its error (JSON-RPC 2.0 §5).
pub(crate) fn response(
    id: &serde_json::Value,
    r: Result<serde_json::Value, RpcError>,
) -> serde_json::Value {
    match r {
        Ok(result) => serde_json::json!({"jsonrpc": "2.0", "id": id, "result": result}),
        Err(e) => serde_json::json!(
            {"jsonrpc": "2.0", "id": id, "error": {"code": e.code, "message": e.message}}
        ),
    }
}

/// Longest request line accepted.
pub const MAX_REQUEST: usize = 1 << 20;
