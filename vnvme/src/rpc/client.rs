//! The RPC client `vnvme rpc` uses.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use super::RpcError;

/// Why a call failed before the daemon answered.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the daemon at {path}: {source} (is it running? `vnvme serve --rpc {path} ...` \
         opens this socket)"
    )]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("rpc socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad answer from the daemon: {0}")]
    Answer(String),
}

/// Call `method` with `params` on the daemon at `socket`: the result, or the daemon's error.
pub fn call(
    socket: &Path,
    method: &str,
    params: &Value,
) -> Result<Result<Value, RpcError>, ClientError> {
    let mut s = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    s.set_read_timeout(Some(Duration::from_mins(1)))?;
    let req = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    s.write_all(format!("{req}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    let v: Value = serde_json::from_str(&line).map_err(|e| ClientError::Answer(e.to_string()))?;
    if let Some(r) = v.get("result") {
        return Ok(Ok(r.clone()));
    }
    let e = v
        .get("error")
        .ok_or_else(|| ClientError::Answer(line.trim().into()))?;
    Ok(Err(RpcError::new(
        e.get("code").and_then(Value::as_i64).unwrap_or(0),
        e.get("message").and_then(Value::as_str).unwrap_or_default(),
    )))
}

/// Parse `key=value` arguments into a params object: a value that reads as JSON (number,
/// list, true/false, quoted string) is taken as JSON, anything else as a string.
pub fn params_from_args(args: &[String]) -> Result<Value, String> {
    let mut map = serde_json::Map::new();
    for a in args {
        let (k, v) = a
            .split_once('=')
            .ok_or_else(|| format!("'{a}': expected KEY=VALUE"))?;
        if k.is_empty() {
            return Err(format!("'{a}': empty key"));
        }
        let v = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.into()));
        map.insert(k.into(), v);
    }
    Ok(Value::Object(map))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_values_become_json() {
        let p = params_from_args(&[
            "nqn=nqn.x:y".into(),
            "nsid=2".into(),
            "controllers=[1,4097]".into(),
            "shared=false".into(),
            "size=1G".into(),
        ])
        .unwrap();
        assert_eq!(
            p,
            json!({"nqn": "nqn.x:y", "nsid": 2, "controllers": [1, 4097], "shared": false, "size": "1G"})
        );
        assert!(params_from_args(&["novalue".into()]).is_err());
        assert!(params_from_args(&["=1".into()]).is_err());
    }
}
