//! NVMe/TCP PDU decoder (common header checks, every PDU type, digests), with a
//! decode-encode-decode round trip.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vnvme_tests::fuzz::nvme_tcp_pdu(data);
});
