//! The NVMe/TCP target's state machine from the network: ICReq, Connect, commands with
//! in-capsule data or R2T/H2CData, CIDs, Keep Alive and property access, built from the input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vnvme_tests::fuzz::nvme_tcp_target(data);
});
