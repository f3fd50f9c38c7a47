//! The host NQN and host identifier sent in Connect: `/etc/nvme/hostnqn` and
//! `/etc/nvme/hostid` when present (as nvme-cli uses them), otherwise a UUID-based NQN
//! derived from `/etc/machine-id`, stable across restarts.

/// Host NQN and host identifier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostIdentity {
    pub nqn: String,
    pub id: [u8; 16],
}

impl HostIdentity {
    /// This machine's identity (see the module documentation).
    pub fn local() -> Self {
        let machine = std::fs::read_to_string("/etc/machine-id").unwrap_or_default();
        let id = std::fs::read_to_string("/etc/nvme/hostid")
            .ok()
            .and_then(|s| parse_uuid(s.trim()))
            .or_else(|| hex16(machine.trim()))
            .unwrap_or(*b"vnvme-host-id-00");
        let nqn = std::fs::read_to_string("/etc/nvme/hostnqn")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| s.starts_with("nqn."))
            .unwrap_or_else(|| {
                format!(
                    "nqn.2014-08.org.nvmexpress:uuid:{}",
                    nvme_spec::uuid::format(&id)
                )
            });
        Self { nqn, id }
    }
}

fn hex16(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    hex16(&s.replace('-', ""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_text_round_trips() {
        let id = parse_uuid("0f8fad5b-d9cb-469f-a165-70867728950e").unwrap();
        assert_eq!(
            nvme_spec::uuid::format(&id),
            "0f8fad5b-d9cb-469f-a165-70867728950e"
        );
        assert_eq!(parse_uuid("xyz"), None);
        let me = HostIdentity::local();
        assert!(me.nqn.starts_with("nqn."));
    }
}
