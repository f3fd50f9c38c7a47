//! UUIDs as text (RFC 9562 §4: `8-4-4-4-12` lowercase hex), as host NQNs and namespace
//! identifiers show them.

/// `8-4-4-4-12` text of a UUID.
pub fn format(id: &[u8; 16]) -> String {
    let mut h = String::with_capacity(32);
    for b in id {
        use std::fmt::Write;
        let _ = write!(h, "{b:02x}");
    }
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn eight_four_four_four_twelve() {
        let id = [
            0x0f, 0x8f, 0xad, 0x5b, 0xd9, 0xcb, 0x46, 0x9f, 0xa1, 0x65, 0x70, 0x86, 0x77, 0x28,
            0x95, 0x0e,
        ];
        assert_eq!(super::format(&id), "0f8fad5b-d9cb-469f-a165-70867728950e");
    }
}
