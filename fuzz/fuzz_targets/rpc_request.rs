//! The management socket's request handling (JSON-RPC line -> method -> daemon), against a
//! running daemon with a PF, two VFs and a namespace pool.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vnvme_tests::fuzz::rpc_request(data);
});
