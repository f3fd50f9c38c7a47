//! The `namespace_pool` value of a controller: where namespaces created at run time get
//! their blocks (parsed here, opened by [`crate::namespace_pool`]).

use std::path::PathBuf;

use crate::backend_spec::parse_size;

/// A parsed `namespace_pool` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolSpec {
    /// RAM; under a supervisor kept in its memfd `kept` (`malloc:SIZE@KEY`, named by the
    /// supervisor: [`kept_pool_bytes`] of sparse RAM, a range per NSID).
    Malloc {
        capacity: u64,
        kept: Option<String>,
    },
    Dir {
        path: PathBuf,
        capacity: u64,
    },
    /// Thin volumes of a volume store (`lvs:STORE`).
    Lvs {
        store: String,
    },
}

/// The bytes of the memfd a supervisor keeps for a `malloc:` pool of `capacity` bytes: one
/// range of [`kept_pool_slot`] bytes per possible NSID, sparse (only what namespaces hold
/// is memory), so a namespace's place never depends on the others.
pub fn kept_pool_bytes(capacity: u64) -> u64 {
    kept_pool_slot(capacity).saturating_mul(u64::from(sriov::MAX_NAMESPACES))
}

/// The range of one NSID in a kept `malloc:` pool: the capacity, in whole 2 MiB.
pub fn kept_pool_slot(capacity: u64) -> u64 {
    capacity.next_multiple_of(2 << 20)
}

/// What a `namespace_pool` value must look like.
pub const POOL_SYNTAX: &str =
    "malloc:SIZE, dir:PATH:SIZE (SIZE at least 1M, e.g. 4G) or lvs:STORE (a volume store)";

impl std::str::FromStr for PoolSpec {
    type Err = &'static str;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let size = |v: &str| parse_size(v).filter(|&n| n >= 1 << 20).ok_or(POOL_SYNTAX);
        if let Some(v) = s.strip_prefix("malloc:") {
            let (v, kept) = match v.split_once('@') {
                Some((v, key)) if !key.is_empty() => (v, Some(key.to_owned())),
                Some(_) => return Err(POOL_SYNTAX),
                None => (v, None),
            };
            return Ok(PoolSpec::Malloc {
                capacity: size(v)?,
                kept,
            });
        }
        if let Some(v) = s.strip_prefix("dir:") {
            let (path, cap) = v.rsplit_once(':').ok_or(POOL_SYNTAX)?;
            if path.is_empty() {
                return Err(POOL_SYNTAX);
            }
            return Ok(PoolSpec::Dir {
                path: path.into(),
                capacity: size(cap)?,
            });
        }
        if let Some(v) = s.strip_prefix("lvs:")
            && !v.is_empty()
        {
            return Ok(PoolSpec::Lvs { store: v.into() });
        }
        Err(POOL_SYNTAX)
    }
}
