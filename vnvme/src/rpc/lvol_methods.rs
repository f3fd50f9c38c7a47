//! The volume store methods (`lvs_*`, `lvol_*`, named like SPDK's): stores made or loaded
//! on a backend, volumes created, resized, renamed, snapshotted, cloned, inflated and
//! listed. A volume is named `STORE/NAME` (or `lvs=STORE name=NAME`).

use serde_json::{Value, json};

use super::{RpcError, code};
use crate::backend_spec::parse_size;
use crate::config::{LvstoreSpec, SizeValue};
use crate::daemon::Daemon;

/// The methods of this file.
pub const METHODS: &[&str] = &[
    "lvs_create",
    "lvs_delete",
    "lvs_list",
    "lvol_create",
    "lvol_delete",
    "lvol_resize",
    "lvol_rename",
    "lvol_snapshot",
    "lvol_clone",
    "lvol_inflate",
    "lvol_decouple",
    "lvol_list",
];

fn invalid(msg: impl Into<String>) -> RpcError {
    RpcError::new(code::INVALID_PARAMS, msg)
}

fn refused(e: impl std::fmt::Display) -> RpcError {
    RpcError::new(code::REFUSED, e.to_string())
}

fn string<'a>(p: &'a Value, keys: &[&str]) -> Result<&'a str, RpcError> {
    keys.iter()
        .find_map(|k| p.get(*k).and_then(Value::as_str))
        .ok_or_else(|| invalid(format!("\"{}\": a string is required", keys[0])))
}

/// A volume reference: `STORE/NAME` in `keys`, or `lvs=STORE` and a plain name.
fn volume(p: &Value, keys: &[&str]) -> Result<(String, String), RpcError> {
    let v = string(p, keys)?;
    if let Some((s, n)) = v.split_once('/') {
        if s.is_empty() || n.is_empty() || n.contains('/') {
            return Err(invalid(format!("\"{}\": STORE/NAME, not {v:?}", keys[0])));
        }
        return Ok((s.into(), n.into()));
    }
    let store = string(p, &["lvs", "lvs_name"]).map_err(|_| {
        invalid(format!(
            "\"{}\": STORE/NAME (or give the store as \"lvs\")",
            keys[0]
        ))
    })?;
    Ok((store.into(), v.into()))
}

fn size(p: &Value, key: &str) -> Result<u64, RpcError> {
    let v = p
        .get(key)
        .ok_or_else(|| invalid(format!("\"{key}\" is required")))?;
    v.as_u64()
        .or_else(|| v.as_str().and_then(parse_size))
        .ok_or_else(|| invalid(format!("\"{key}\": bytes, e.g. 1073741824 or \"1G\"")))
}

fn flag(p: &Value, key: &str) -> Result<bool, RpcError> {
    match p.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(invalid(format!("\"{key}\": true or false"))),
    }
}

/// Run volume store method `method`; `None` when it is not one.
pub fn call(daemon: &mut Daemon, method: &str, p: &Value) -> Option<Result<Value, RpcError>> {
    Some(match method {
        "lvs_create" => lvs_create(daemon, p),
        "lvs_delete" => string(p, &["name", "lvs_name"]).and_then(|n| {
            daemon.lvs_delete(n).map_err(refused)?;
            Ok(json!(true))
        }),
        "lvs_list" => Ok(lvs_list(daemon)),
        "lvol_list" => lvol_list(daemon, p),
        "lvol_create" => (|| {
            let (s, n) = volume(p, &["name", "lvol_name"])?;
            let size = size(p, "size")?;
            let thin = flag(p, "thin")? || flag(p, "thin_provision")?;
            store(daemon, &s)?.create(&n, size, thin).map_err(refused)?;
            Ok(json!({ "name": format!("{s}/{n}") }))
        })(),
        _ => return volume_op(daemon, method, p),
    })
}

fn store(daemon: &Daemon, name: &str) -> Result<volumes::lvol::Store, RpcError> {
    daemon.lvstores().store(name).map_err(refused)
}

/// Methods on one volume.
fn volume_op(daemon: &mut Daemon, method: &str, p: &Value) -> Option<Result<Value, RpcError>> {
    let run = || -> Result<Value, RpcError> {
        let (s, n) = volume(p, &["name", "lvol_name"])?;
        let st = store(daemon, &s)?;
        match method {
            "lvol_delete" => st.delete(&n),
            "lvol_resize" => st.resize(&n, size(p, "size")?),
            "lvol_rename" => st.rename(&n, string(p, &["new_name"])?),
            "lvol_snapshot" => {
                let snap = string(p, &["snapshot_name", "snapshot"])?;
                if snap.contains('/') {
                    return Err(invalid("\"snapshot_name\": a plain name (same store)"));
                }
                st.snapshot(&n, snap)
            }
            "lvol_inflate" => st.inflate(&n),
            "lvol_decouple" => st.decouple(&n),
            _ => unreachable!("listed below"),
        }
        .map_err(refused)?;
        Ok(json!(true))
    };
    match method {
        "lvol_delete" | "lvol_resize" | "lvol_rename" | "lvol_snapshot" | "lvol_inflate"
        | "lvol_decouple" => Some(run()),
        "lvol_clone" => Some((|| {
            // the clone lives in its snapshot's store: a STORE/ prefix on its name must
            // be that store
            let (ss, snap) = volume(p, &["snapshot", "snapshot_name"])?;
            let clone = string(p, &["clone_name", "name"])?;
            let clone = match clone.split_once('/') {
                Some((cs, c)) if cs == ss && !c.is_empty() => c,
                Some(_) => return Err(invalid("a clone lives in its snapshot's store")),
                None => clone,
            };
            store(daemon, &ss)?
                .clone_snapshot(&snap, clone)
                .map_err(refused)?;
            Ok(json!({ "name": format!("{ss}/{clone}") }))
        })()),
        _ => None,
    }
}

fn lvs_create(daemon: &mut Daemon, p: &Value) -> Result<Value, RpcError> {
    let name = string(p, &["name", "lvs_name"])?.to_owned();
    let backend = string(p, &["backend", "bdev_name"])?.to_owned();
    let cluster_size = match p.get("cluster_size").or_else(|| p.get("cluster_sz")) {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(SizeValue::Bytes(
            n.as_u64()
                .ok_or_else(|| invalid("\"cluster_size\": bytes"))?,
        )),
        Some(Value::String(s)) => Some(SizeValue::Text(s.clone())),
        Some(_) => return Err(invalid("\"cluster_size\": bytes, e.g. \"1M\"")),
    };
    let warn_percent = match p.get("warn_percent") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|&n| n <= 100)
                .ok_or_else(|| invalid("\"warn_percent\": 0 to 100"))? as u8,
        ),
    };
    let spec = LvstoreSpec {
        name: name.clone(),
        backend,
        cluster_size,
        warn_percent,
        volumes: Vec::new(),
    };
    spec.check(&|f: &str| f.to_string())
        .map_err(|e| invalid(e.to_string()))?;
    let made = daemon.lvs_create(&spec).map_err(refused)?;
    Ok(json!({
        "name": name,
        "made": match made {
            crate::lvstores::Made::Loaded => "loaded",
            crate::lvstores::Made::Created => "created",
        },
    }))
}

fn lvs_list(daemon: &Daemon) -> Value {
    let list: Vec<Value> = daemon
        .lvstores()
        .list()
        .into_iter()
        .map(|(s, backend)| {
            json!({
                "name": s.name,
                "backend": backend,
                "capacity": s.capacity,
                "used": s.used,
                "clusters_free": s.clusters_free,
                "clusters": s.clusters,
                "cluster_size": s.cluster_size,
                "volumes": s.volumes,
                "metadata_bytes": s.metadata.0,
                "metadata_capacity": s.metadata.1,
                "failed": s.failed,
            })
        })
        .collect();
    Value::Array(list)
}

fn lvol_list(daemon: &Daemon, p: &Value) -> Result<Value, RpcError> {
    let only = p
        .get("lvs")
        .or_else(|| p.get("lvs_name"))
        .and_then(Value::as_str);
    let stores = daemon.lvstores();
    let names: Vec<String> = match only {
        Some(s) => {
            stores.store(s).map_err(refused)?;
            vec![s.to_owned()]
        }
        None => stores.names(),
    };
    let mut out = Vec::new();
    for s in names {
        for v in stores.volumes(&s).map_err(refused)? {
            out.push(json!({
                "name": format!("{s}/{}", v.name),
                "store": s,
                "size": v.size,
                "thin": v.thin,
                "snapshot": v.snapshot,
                "parent": v.parent,
                "used": v.used,
                "shared": v.shared,
                "clones": v.clones,
                "open": v.open,
            }));
        }
    }
    Ok(Value::Array(out))
}
