//! The `namespace_pool` value of a controller: where namespaces created at run time get
//! their blocks (parsed here, opened by [`crate::namespace_pool`]).

use std::path::PathBuf;

use crate::backend_spec::parse_size;

/// A parsed `namespace_pool` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolSpec {
    Malloc {
        capacity: u64,
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

/// What a `namespace_pool` value must look like.
pub const POOL_SYNTAX: &str =
    "malloc:SIZE, dir:PATH:SIZE (SIZE at least 1M, e.g. 4G) or lvs:STORE (a volume store)";

impl std::str::FromStr for PoolSpec {
    type Err = &'static str;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let size = |v: &str| parse_size(v).filter(|&n| n >= 1 << 20).ok_or(POOL_SYNTAX);
        if let Some(v) = s.strip_prefix("malloc:") {
            return Ok(PoolSpec::Malloc { capacity: size(v)? });
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
