//! Namespace backend specs as users write them: `null:1G`, `malloc:256M`,
//! `file:/path/to/img[:SIZE]`.

use std::path::PathBuf;

use device_model::backend::{Backend, FileBackend, MallocBackend, NullBackend};

/// A parsed backend spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendSpec {
    Null { size: u64 },
    Malloc { size: u64 },
    File { path: PathBuf, size: Option<u64> },
}

/// Why a spec was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("'{0}': expected null:SIZE, malloc:SIZE or file:PATH[:SIZE]")]
    Syntax(String),
    #[error("'{0}': bad size (a number with an optional K, M, G or T suffix, at least 1M)")]
    Size(String),
}

/// Parse `512`, `64K`, `256M`, `1G`, `2T` (binary multiples).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&s[..i], 1 << 20),
        (i, 'G' | 'g') => (&s[..i], 1 << 30),
        (i, 'T' | 't') => (&s[..i], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

impl std::str::FromStr for BackendSpec {
    type Err = SpecError;
    fn from_str(spec: &str) -> Result<Self, SpecError> {
        let (kind, rest) = spec
            .split_once(':')
            .ok_or_else(|| SpecError::Syntax(spec.into()))?;
        let size = |s: &str| {
            parse_size(s)
                .filter(|&n| n >= 1 << 20 && n % 4096 == 0)
                .ok_or_else(|| SpecError::Size(spec.into()))
        };
        match kind {
            "null" => Ok(BackendSpec::Null { size: size(rest)? }),
            "malloc" => Ok(BackendSpec::Malloc { size: size(rest)? }),
            "file" if !rest.is_empty() => {
                // file:/path or file:/path:SIZE (a trailing :SIZE only if it parses as one)
                if let Some((path, sz)) = rest.rsplit_once(':')
                    && let Some(n) = parse_size(sz)
                {
                    size(sz)?;
                    return Ok(BackendSpec::File {
                        path: path.into(),
                        size: Some(n),
                    });
                }
                Ok(BackendSpec::File {
                    path: rest.into(),
                    size: None,
                })
            }
            _ => Err(SpecError::Syntax(spec.into())),
        }
    }
}

/// Errors creating a backend.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Malloc(#[from] device_model::backend::MallocError),
    #[error(transparent)]
    File(#[from] device_model::backend::FileError),
}

impl BackendSpec {
    /// Create the backend.
    pub fn open(&self) -> Result<Box<dyn Backend>, OpenError> {
        Ok(match self {
            BackendSpec::Null { size } => Box::new(NullBackend::new(*size)),
            BackendSpec::Malloc { size } => Box::new(MallocBackend::new(*size)?),
            BackendSpec::File { path, size } => Box::new(FileBackend::open(path, *size)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs_and_refuses_garbage() {
        assert_eq!("null:1G".parse(), Ok(BackendSpec::Null { size: 1 << 30 }));
        assert_eq!(
            "malloc:256M".parse(),
            Ok(BackendSpec::Malloc { size: 256 << 20 })
        );
        assert_eq!(
            "file:/tmp/a.img".parse(),
            Ok(BackendSpec::File {
                path: "/tmp/a.img".into(),
                size: None
            })
        );
        assert_eq!(
            "file:/tmp/a.img:2G".parse(),
            Ok(BackendSpec::File {
                path: "/tmp/a.img".into(),
                size: Some(2 << 30)
            })
        );
        assert_eq!(
            "file:/odd:name".parse(),
            Ok(BackendSpec::File {
                path: "/odd:name".into(),
                size: None
            })
        );
        assert!(matches!(
            "malloc".parse::<BackendSpec>(),
            Err(SpecError::Syntax(_))
        ));
        assert!(matches!(
            "malloc:lots".parse::<BackendSpec>(),
            Err(SpecError::Size(_))
        ));
        assert!(matches!(
            "malloc:100".parse::<BackendSpec>(),
            Err(SpecError::Size(_))
        ));
        assert!(matches!(
            "malloc:99999999999999999999T".parse::<BackendSpec>(),
            Err(SpecError::Size(_))
        ));
        assert!(matches!(
            "tape:1G".parse::<BackendSpec>(),
            Err(SpecError::Syntax(_))
        ));
        assert!(matches!(
            "file:".parse::<BackendSpec>(),
            Err(SpecError::Syntax(_))
        ));
    }
}
