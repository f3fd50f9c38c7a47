//! The RPC methods: what each takes and returns, over [`Daemon`]'s management API.

use serde_json::{Value, json};

use device_model::QosLimits;

use super::{RpcError, code};
use crate::backend_spec::parse_size;
use crate::config::ControllerSpec;
use crate::daemon::{Daemon, MgmtError};

/// Every method, for `vnvme rpc --help` and the method-not-found message.
pub const METHODS: &[&str] = &[
    "subsystem_list",
    "controller_list",
    "subsystem_create",
    "subsystem_delete",
    "ns_create",
    "ns_delete",
    "ns_add",
    "ns_attach",
    "ns_detach",
    "qos_set",
    "vf_enable",
    "stats",
    "raid_create",
    "raid_delete",
    "raid_list",
    "raid_add_member",
    "raid_remove_member",
    "raid_set_rebuild_rate",
    "bdev_raid_add_base_bdev",
    "bdev_raid_remove_base_bdev",
];

/// What a supervisor replays in place of a subsystem made and deleted at run time: the
/// entry number it took, nothing else.
pub const SKIP_ENTRY: &str = "subsystem_skip_entry";

fn invalid(msg: impl Into<String>) -> RpcError {
    RpcError::new(code::INVALID_PARAMS, msg)
}

fn refused(e: &MgmtError) -> RpcError {
    RpcError::new(code::REFUSED, e.to_string())
}

fn string<'a>(p: &'a Value, key: &str) -> Result<&'a str, RpcError> {
    p.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(format!("\"{key}\": a string is required")))
}

fn uint(p: &Value, key: &str, max: u64) -> Result<u64, RpcError> {
    p.get(key)
        .and_then(Value::as_u64)
        .filter(|&v| v <= max)
        .ok_or_else(|| invalid(format!("\"{key}\": an integer 0..={max} is required")))
}

/// A byte count: a number, or a string with a K/M/G/T suffix.
fn bytes(v: &Value, key: &str) -> Result<u64, RpcError> {
    v.as_u64()
        .or_else(|| v.as_str().and_then(parse_size))
        .ok_or_else(|| invalid(format!("\"{key}\": bytes, e.g. 1073741824 or \"1G\"")))
}

fn controllers(p: &Value) -> Result<Vec<u16>, RpcError> {
    let list = p
        .get("controllers")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("\"controllers\": a list of CNTLIDs is required"))?;
    list.iter()
        .map(|v| {
            v.as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .ok_or_else(|| invalid("\"controllers\": CNTLIDs are integers 0..=65535"))
        })
        .collect()
}

/// Run `method` with `params` (an object).
pub fn call(daemon: &mut Daemon, method: &str, p: &Value) -> Result<Value, RpcError> {
    match method {
        "subsystem_list" => Ok(subsystem_list(daemon)),
        "controller_list" => Ok(controller_list(daemon)),
        "subsystem_create" => {
            let spec: ControllerSpec = serde_json::from_value(p.clone())
                .map_err(|e| invalid(format!("a [[controller]] table: {e}")))?;
            let nqn = daemon.add_entry(&spec).map_err(|e| refused(&e))?;
            Ok(json!({ "nqn": nqn }))
        }
        "subsystem_delete" => {
            daemon
                .remove_entry(string(p, "nqn")?)
                .map_err(|e| refused(&e))?;
            Ok(json!(true))
        }
        // a supervisor's replay of a subsystem made and deleted at run time (not listed)
        SKIP_ENTRY => {
            daemon.skip_entry().map_err(|e| refused(&e))?;
            Ok(json!(true))
        }
        "ns_create" => {
            let size = bytes(
                p.get("size")
                    .ok_or_else(|| invalid("\"size\" is required"))?,
                "size",
            )?;
            let block = match p.get("block_size") {
                None => 512,
                Some(_) => uint(p, "block_size", 4096)? as u32,
            };
            let shared = match p.get("shared") {
                None => true,
                Some(v) => v
                    .as_bool()
                    .ok_or_else(|| invalid("\"shared\": true or false"))?,
            };
            let nsid = daemon
                .ns_create(string(p, "nqn")?, size, block, shared)
                .map_err(|e| refused(&e))?;
            Ok(json!({ "nsid": nsid }))
        }
        "ns_add" => {
            let block = match p.get("block_size") {
                None => 512,
                Some(_) => uint(p, "block_size", 4096)? as u32,
            };
            let wanted = match p.get("nsid") {
                None => None,
                Some(_) => Some(uint(p, "nsid", u64::from(sriov::MAX_NAMESPACES))? as u32),
            };
            let nsid = daemon
                .ns_add(string(p, "nqn")?, string(p, "backend")?, block, wanted)
                .map_err(|e| refused(&e))?;
            Ok(json!({ "nsid": nsid }))
        }
        "ns_delete" => {
            let nsid = uint(p, "nsid", u64::from(u32::MAX))? as u32;
            daemon
                .ns_delete(string(p, "nqn")?, nsid)
                .map_err(|e| refused(&e))?;
            Ok(json!(true))
        }
        "ns_attach" | "ns_detach" => {
            let nsid = uint(p, "nsid", u64::from(u32::MAX))? as u32;
            let ids = controllers(p)?;
            daemon
                .ns_attach(string(p, "nqn")?, nsid, &ids, method == "ns_attach")
                .map_err(|e| refused(&e))?;
            Ok(json!(true))
        }
        "qos_set" => {
            let cntlid = uint(p, "cntlid", 0xffff)? as u16;
            let iops = match p.get("iops") {
                None | Some(Value::Null) => None,
                Some(_) => Some(uint(p, "iops", u64::MAX)?).filter(|&n| n > 0),
            };
            let bytes_per_sec = match p.get("bandwidth") {
                None | Some(Value::Null) => None,
                Some(v) => Some(bytes(v, "bandwidth")?).filter(|&n| n > 0),
            };
            daemon
                .set_controller_qos(
                    cntlid,
                    QosLimits {
                        iops,
                        bytes_per_sec,
                    },
                )
                .map_err(|e| refused(&e))?;
            Ok(json!(true))
        }
        "vf_enable" => {
            let n = uint(p, "count", 127)? as u16;
            daemon
                .enable_vfs(string(p, "nqn")?, n)
                .map_err(|e| refused(&e))?;
            Ok(json!(true))
        }
        "stats" => {
            let cntlid = match p.get("cntlid") {
                None | Some(Value::Null) => None,
                Some(_) => Some(uint(p, "cntlid", 0xffff)? as u16),
            };
            let sources: Vec<_> = daemon
                .metric_sources()
                .into_iter()
                .filter(|s| cntlid.is_none_or(|c| c == s.cntlid))
                .collect();
            if let (Some(c), true) = (cntlid, sources.is_empty()) {
                return Err(RpcError::new(
                    code::REFUSED,
                    format!("no controller with CNTLID {c}"),
                ));
            }
            Ok(crate::metrics::json(&sources))
        }
        "raid_create" => {
            let spec = array_spec(p)?;
            let refused = daemon.raid_create(&spec).map_err(|e| refused(&e))?;
            Ok(json!({ "name": spec.name, "refused": refused }))
        }
        "raid_delete" => {
            daemon
                .raid_delete(string(p, "name")?)
                .map_err(|e| refused(&e))?;
            Ok(json!(true))
        }
        "raid_list" => Ok(raid_list(daemon)),
        "raid_add_member" | "bdev_raid_add_base_bdev" => {
            let (name, member) = name_and_member(p)?;
            let out = daemon
                .raid_add_member(name, &member)
                .map_err(|e| refused(&e))?;
            Ok(json!({ "slot": out.slot, "rebuild": if out.partial { "partial" } else { "full" } }))
        }
        "raid_remove_member" | "bdev_raid_remove_base_bdev" => {
            let (name, member) = name_and_member(p)?;
            let (slot, spec) = daemon
                .raid_remove_member(name, &member)
                .map_err(|e| refused(&e))?;
            Ok(json!({ "slot": slot, "member": spec }))
        }
        "raid_set_rebuild_rate" => {
            let mb = uint(p, "mb_per_sec", 1 << 20)?;
            daemon
                .raid_set_rebuild_rate(string(p, "name")?, mb)
                .map_err(|e| refused(&e))?;
            Ok(json!(true))
        }
        _ => super::lvol_methods::call(daemon, method, p).unwrap_or_else(|| {
            Err(RpcError::new(
                code::METHOD_NOT_FOUND,
                format!(
                    "no method '{method}' (methods: {}, {})",
                    METHODS.join(", "),
                    super::lvol_methods::METHODS.join(", ")
                ),
            ))
        }),
    }
}

fn subsystem_list(daemon: &Daemon) -> Value {
    let list: Vec<Value> = daemon
        .subsystems()
        .into_iter()
        .map(|(entry, s)| {
            let (total, free) = s.capacity();
            let namespaces: Vec<Value> = s
                .list()
                .into_iter()
                .map(|n| {
                    json!({
                        "nsid": n.nsid,
                        "size": n.size,
                        "block_size": 1u32 << n.lba_shift,
                        "shared": n.shared,
                        "attached": n.attached,
                        "created": n.pooled,
                    })
                })
                .collect();
            json!({
                "nqn": s.nqn(),
                "entry": entry,
                "controllers": s.controllers(),
                "namespace_pool": s.pool(),
                "capacity": total,
                "unallocated": free,
                "namespaces": namespaces,
            })
        })
        .collect();
    Value::Array(list)
}

fn controller_list(daemon: &Daemon) -> Value {
    let subs = daemon.subsystems();
    let list: Vec<Value> = daemon
        .controllers()
        .iter()
        .map(|c| {
            let q = c.qos.get();
            let nqn = subs
                .iter()
                .find(|(i, _)| *i == c.entry)
                .map(|(_, s)| s.nqn().to_owned());
            json!({
                "cntlid": c.cntlid,
                "nqn": nqn,
                "kind": c.kind,
                "vf": c.vf,
                "endpoint": c.endpoint,
                "state": c.state(),
                "iops_limit": q.iops,
                "bandwidth_limit": q.bytes_per_sec,
            })
        })
        .collect();
    Value::Array(list)
}

/// `raid_create`'s parameters: name, level, members, [strip_size_kb], [rebuild_rate_mb].
fn array_spec(p: &Value) -> Result<crate::config::ArraySpec, RpcError> {
    let members = p
        .get("members")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("\"members\": a list of backend specs is required"))?
        .iter()
        .map(|v| {
            v.as_str()
                .map(str::to_owned)
                .ok_or_else(|| invalid("\"members\": backend specs are strings"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let opt = |key: &str, max: u64| match p.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => uint(p, key, max).map(Some),
    };
    let spec = crate::config::ArraySpec {
        name: string(p, "name")?.to_owned(),
        level: string(p, "level")?.to_owned(),
        members,
        strip_size_kb: opt("strip_size_kb", 1 << 20)?,
        rebuild_rate_mb: opt("rebuild_rate_mb", 1 << 20)?,
    };
    spec.check(&|f: &str| f.to_string())
        .map_err(|e| invalid(e.to_string()))?;
    Ok(spec)
}

/// An array name and a member (a spec string, or a slot number); SPDK's `base_bdev` is
/// taken for `member`.
fn name_and_member(p: &Value) -> Result<(&str, String), RpcError> {
    let name = string(p, "name")?;
    let member = match p.get("member").or_else(|| p.get("base_bdev")) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) if n.as_u64().is_some() => n.to_string(),
        _ => {
            return Err(invalid(
                "\"member\": a backend spec or a slot number is required",
            ));
        }
    };
    Ok((name, member))
}

fn progress(p: &volumes::raid::Progress) -> Value {
    json!({
        "kind": p.kind.name(),
        "percent": (p.percent() * 10.0).round() / 10.0,
        "eta_secs": p.eta_secs().map(|s| (s * 10.0).round() / 10.0),
        "bytes_copied": p.copied,
        "bytes_total": p.total,
        "regions": p.regions,
        "regions_done": p.regions_done,
        "elapsed_secs": (p.elapsed.as_secs_f64() * 10.0).round() / 10.0,
        "rate_mb_per_sec": p.rate / 1_000_000,
        "finished": p.finished,
        "aborted": p.aborted,
    })
}

fn raid_list(daemon: &mut Daemon) -> Value {
    let arrays = daemon.raid_list();
    let list: Vec<Value> = arrays
        .into_iter()
        .map(|(st, used_by, refused, closed)| {
            let members: Vec<Value> = st
                .members
                .iter()
                .map(|m| {
                    let mut v = json!({
                        "slot": m.slot,
                        "member": m.describe,
                        "state": m.state,
                        "reads": m.reads,
                        "writes": m.writes,
                        "errors": m.errors,
                    });
                    if let Some((zero_copy, bounced)) = daemon.raid_member_transfer(&m.describe) {
                        v["zero_copy_bytes"] = zero_copy.into();
                        v["bounced_bytes"] = bounced.into();
                    }
                    v
                })
                .collect();
            json!({
                "name": st.name,
                "uuid": st.uuid,
                "level": st.level,
                "strip_size_kb": st.strip >> 10,
                "size": st.size,
                "state": if closed { "closed" } else { st.state },
                "generation": st.generation,
                "used_by": used_by,
                "members": members,
                "refused": refused,
                "ops": st.ops,
                "iops": st.iops.round(),
                "region_size": st.region_size,
                "dirty_regions": st.dirty_regions,
                "rebuild_rate_mb_per_sec": st.rate / 1_000_000,
                "rebuild": st.rebuild.as_ref().map(progress),
                "last_rebuild": st.last_rebuild.as_ref().map(progress),
            })
        })
        .collect();
    Value::Array(list)
}
