//! NVMe/RDMA command capsules (command, in-capsule data, keyed SGLs) and RDMA CM connect
//! request private data, as a target receives them.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vnvme_tests::fuzz::rdma_capsule(data);
});
