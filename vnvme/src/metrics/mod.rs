//! Observability: the counters every controller keeps ([`device_model::ControllerStats`],
//! per controller and per attached namespace) as the Prometheus text exposition format
//! (`vnvme serve --metrics ADDR:PORT`, [`server`]) and as JSON with latency percentiles
//! (`vnvme rpc stats`).
//!
//! Reading takes a snapshot of relaxed atomics the reactors write: no message to a reactor,
//! no lock a reactor takes per command (the namespace list's lock is taken by a reactor only
//! on attach and detach).

#![allow(clippy::cast_precision_loss)] // counts and nanoseconds shown as seconds and microseconds

pub mod server;

use std::fmt::Write;
use std::sync::Arc;

use device_model::ControllerStats;
use device_model::stats::{ERROR_STATUSES, HistogramSnapshot, IoSnapshot, latency_bucket_bound_ns};
use serde_json::{Value, json};

pub use server::MetricsServer;

/// One controller as the metrics name it.
#[derive(Clone, Debug)]
pub struct Source {
    pub cntlid: u16,
    /// Its subsystem's NQN.
    pub nqn: String,
    /// "pf", "vf", "tcp" or "ctrl".
    pub kind: &'static str,
    /// vfio-user socket or NVMe/TCP listen address.
    pub endpoint: String,
    pub stats: Arc<ControllerStats>,
}

/// What one controller counted, read at one moment.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub io: IoSnapshot,
    pub io_errors: [(&'static str, u64); ERROR_STATUSES.len()],
    pub admin_commands: u64,
    pub admin_errors: u64,
    pub in_flight: u64,
    pub enables: u64,
    pub async_events: u64,
    pub fatal: u64,
    pub shadow_doorbell_configs: u64,
    pub ready: bool,
    pub namespaces: Vec<(u32, IoSnapshot)>,
}

impl Source {
    /// Read its counters now.
    pub fn snapshot(&self) -> Snapshot {
        let s = &self.stats;
        let get = ControllerStats::get;
        Snapshot {
            io: s.io(),
            io_errors: s.io_errors(),
            admin_commands: get(&s.admin_commands),
            admin_errors: get(&s.admin_errors),
            in_flight: get(&s.in_flight),
            enables: get(&s.enables),
            async_events: get(&s.async_events),
            fatal: get(&s.fatal),
            shadow_doorbell_configs: get(&s.shadow_doorbell_configs),
            ready: s.ready.load(std::sync::atomic::Ordering::Relaxed),
            namespaces: s
                .namespaces()
                .into_iter()
                .map(|(nsid, n)| (nsid, n.snapshot()))
                .collect(),
        }
    }
}

/// A label value escaped for the text format (backslash, double quote, newline).
fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Nanoseconds as seconds in decimal, exactly (`256` -> `0.000000256`).
fn seconds(ns: u64) -> String {
    let (s, frac) = (ns / 1_000_000_000, ns % 1_000_000_000);
    if frac == 0 {
        return s.to_string();
    }
    let f = format!("{frac:09}");
    format!("{s}.{}", f.trim_end_matches('0'))
}

/// The text format, built one metric family at a time.
struct Text {
    out: String,
}

impl Text {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &str, extra: &str, value: impl std::fmt::Display) {
        let sep = if labels.is_empty() || extra.is_empty() {
            ""
        } else {
            ","
        };
        let _ = writeln!(self.out, "{name}{{{labels}{sep}{extra}}} {value}");
    }

    fn histogram(&mut self, name: &str, labels: &str, h: &HistogramSnapshot) {
        let mut cumulative = 0u64;
        for (i, n) in h.buckets.iter().enumerate() {
            cumulative += n;
            let le = latency_bucket_bound_ns(i).map_or_else(|| "+Inf".to_owned(), seconds);
            self.sample(
                &format!("{name}_bucket"),
                labels,
                &format!("le=\"{le}\""),
                cumulative,
            );
        }
        self.sample(&format!("{name}_sum"), labels, "", h.sum_ns as f64 / 1e9);
        self.sample(&format!("{name}_count"), labels, "", cumulative);
    }
}

/// The Prometheus text exposition format (version 0.0.4) of `sources`.
pub fn prometheus(sources: &[Source]) -> String {
    let snaps: Vec<(String, Snapshot)> = sources
        .iter()
        .map(|s| {
            let labels = format!(
                "cntlid=\"{}\",nqn=\"{}\",kind=\"{}\"",
                s.cntlid,
                escape(&s.nqn),
                s.kind
            );
            (labels, s.snapshot())
        })
        .collect();
    let mut t = Text { out: String::new() };
    let c = "vnvme_controller_commands_total";
    t.family(
        c,
        "counter",
        "I/O commands completed by the controller, by operation (read, write, other).",
    );
    for (l, s) in &snaps {
        t.sample(c, l, "op=\"read\"", s.io.reads);
        t.sample(c, l, "op=\"write\"", s.io.writes);
        t.sample(c, l, "op=\"other\"", s.io.other);
    }
    let c = "vnvme_controller_bytes_total";
    t.family(
        c,
        "counter",
        "Data bytes of successful Read and Write commands.",
    );
    for (l, s) in &snaps {
        t.sample(c, l, "op=\"read\"", s.io.read_bytes);
        t.sample(c, l, "op=\"write\"", s.io.written_bytes);
    }
    let c = "vnvme_controller_errors_total";
    t.family(
        c,
        "counter",
        "I/O commands completed with an error, by status.",
    );
    for (l, s) in &snaps {
        for (name, n) in &s.io_errors {
            t.sample(c, l, &format!("status=\"{name}\""), n);
        }
    }
    let c = "vnvme_controller_latency_seconds";
    t.family(
        c,
        "histogram",
        "I/O command latency from SQE fetch to CQE post.",
    );
    for (l, s) in &snaps {
        t.histogram(c, l, &s.io.latency);
    }
    let c = "vnvme_controller_queue_depth";
    t.family(
        c,
        "gauge",
        "I/O commands in flight (fetched, not yet completed).",
    );
    for (l, s) in &snaps {
        t.sample(c, l, "", s.in_flight);
    }
    type Field = fn(&Snapshot) -> u64;
    let plain: [(&str, &str, &str, Field); 7] = [
        (
            "vnvme_controller_admin_commands_total",
            "counter",
            "Admin commands completed.",
            |s| s.admin_commands,
        ),
        (
            "vnvme_controller_admin_errors_total",
            "counter",
            "Admin commands completed with an error.",
            |s| s.admin_errors,
        ),
        (
            "vnvme_controller_enables_total",
            "counter",
            "Controller enables (CC.EN 0 to 1).",
            |s| s.enables,
        ),
        (
            "vnvme_controller_async_events_total",
            "counter",
            "Asynchronous events raised.",
            |s| s.async_events,
        ),
        (
            "vnvme_controller_fatal_total",
            "counter",
            "Times the controller entered Controller Fatal Status.",
            |s| s.fatal,
        ),
        (
            "vnvme_controller_shadow_doorbell_configs_total",
            "counter",
            "Successful Doorbell Buffer Config commands.",
            |s| s.shadow_doorbell_configs,
        ),
        (
            "vnvme_controller_ready",
            "gauge",
            "1 when the controller is ready (CSTS.RDY).",
            |s| u64::from(s.ready),
        ),
    ];
    for (name, kind, help, f) in plain {
        t.family(name, kind, help);
        for (l, s) in &snaps {
            t.sample(name, l, "", f(s));
        }
    }
    let ns_labels = |l: &str, nsid: u32| format!("{l},nsid=\"{nsid}\"");
    let c = "vnvme_namespace_commands_total";
    t.family(
        c,
        "counter",
        "I/O commands completed on the namespace through the controller, by operation.",
    );
    for (l, s) in &snaps {
        for (nsid, n) in &s.namespaces {
            let l = ns_labels(l, *nsid);
            t.sample(c, &l, "op=\"read\"", n.reads);
            t.sample(c, &l, "op=\"write\"", n.writes);
            t.sample(c, &l, "op=\"other\"", n.other);
        }
    }
    let c = "vnvme_namespace_bytes_total";
    t.family(
        c,
        "counter",
        "Data bytes of successful Read and Write commands on the namespace.",
    );
    for (l, s) in &snaps {
        for (nsid, n) in &s.namespaces {
            let l = ns_labels(l, *nsid);
            t.sample(c, &l, "op=\"read\"", n.read_bytes);
            t.sample(c, &l, "op=\"write\"", n.written_bytes);
        }
    }
    let c = "vnvme_namespace_errors_total";
    t.family(
        c,
        "counter",
        "I/O commands on the namespace completed with an error.",
    );
    for (l, s) in &snaps {
        for (nsid, n) in &s.namespaces {
            t.sample(c, &ns_labels(l, *nsid), "", n.errors);
        }
    }
    let c = "vnvme_namespace_latency_seconds";
    t.family(
        c,
        "histogram",
        "I/O command latency on the namespace from SQE fetch to CQE post.",
    );
    for (l, s) in &snaps {
        for (nsid, n) in &s.namespaces {
            t.histogram(c, &ns_labels(l, *nsid), &n.latency);
        }
    }
    t.out
}

/// Microseconds, rounded to the nanosecond.
fn micros(ns: f64) -> f64 {
    (ns).round() / 1000.0
}

fn latency_json(h: &HistogramSnapshot) -> Value {
    json!({
        "count": h.count(),
        "mean": micros(h.mean_ns()),
        "p50": micros(h.quantile_ns(0.5)),
        "p99": micros(h.quantile_ns(0.99)),
        "p99.9": micros(h.quantile_ns(0.999)),
    })
}

fn io_json(io: &IoSnapshot) -> serde_json::Map<String, Value> {
    let v = json!({
        "reads": io.reads,
        "writes": io.writes,
        "other": io.other,
        "read_bytes": io.read_bytes,
        "written_bytes": io.written_bytes,
        "errors": io.errors,
        "latency_us": latency_json(&io.latency),
    });
    match v {
        Value::Object(m) => m,
        _ => serde_json::Map::new(),
    }
}

/// `vnvme rpc stats`: each controller's counters with its namespaces', latency percentiles
/// in microseconds (estimated from the log2 histogram: within a factor of two, interpolated).
pub fn json(sources: &[Source]) -> Value {
    let list: Vec<Value> = sources
        .iter()
        .map(|src| {
            let s = src.snapshot();
            let mut m = io_json(&s.io);
            let by_status: serde_json::Map<String, Value> = s
                .io_errors
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(name, n)| ((*name).to_owned(), json!(n)))
                .collect();
            let namespaces: Vec<Value> = s
                .namespaces
                .iter()
                .map(|(nsid, n)| {
                    let mut m = io_json(n);
                    m.insert("nsid".into(), json!(nsid));
                    Value::Object(m)
                })
                .collect();
            for (k, v) in [
                ("cntlid", json!(src.cntlid)),
                ("nqn", json!(src.nqn)),
                ("kind", json!(src.kind)),
                ("endpoint", json!(src.endpoint)),
                ("errors_by_status", Value::Object(by_status)),
                ("queue_depth", json!(s.in_flight)),
                ("admin_commands", json!(s.admin_commands)),
                ("admin_errors", json!(s.admin_errors)),
                ("enables", json!(s.enables)),
                ("async_events", json!(s.async_events)),
                ("fatal", json!(s.fatal)),
                ("ready", json!(s.ready)),
                ("namespaces", Value::Array(namespaces)),
            ] {
                m.insert(k.into(), v);
            }
            Value::Object(m)
        })
        .collect();
    Value::Array(list)
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // exact sample values
mod tests {
    use super::*;
    use device_model::stats::{IoStats, LATENCY_BUCKETS};

    fn source() -> Source {
        Source {
            cntlid: 7,
            nqn: "nqn.2026-11.io.vnvme:a\"b".into(),
            kind: "ctrl",
            endpoint: "/tmp/x.sock".into(),
            stats: Arc::new(ControllerStats::default()),
        }
    }

    /// Sample lines `name{labels} value` of `text` whose name and labels contain every one
    /// of `parts`; their values.
    fn values(text: &str, name: &str, parts: &[&str]) -> Vec<f64> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split('{').next() == Some(name))
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .collect()
    }

    #[test]
    fn seconds_are_exact_decimals() {
        assert_eq!(seconds(256), "0.000000256");
        assert_eq!(seconds(1 << 30), "1.073741824");
        assert_eq!(seconds(2_000_000_000), "2");
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn an_idle_controller_is_all_zero_and_well_formed() {
        let text = prometheus(&[source()]);
        // every sample line is NAME{LABELS} NUMBER and its family was declared before it
        let mut declared = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split(' ');
                declared.insert(it.next().unwrap().to_owned());
                assert!(
                    ["counter", "gauge", "histogram"].contains(&it.next().unwrap()),
                    "{line}"
                );
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
            let name = series.split('{').next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| declared.contains(*f)))
                .unwrap_or(name);
            assert!(declared.contains(family), "{name} before its # TYPE");
            assert!(series.ends_with('}'), "{line}");
            assert!(series.contains("cntlid=\"7\""), "{line}");
            assert!(
                series.contains("nqn=\"nqn.2026-11.io.vnvme:a\\\"b\""),
                "{line}"
            );
        }
        assert_eq!(
            values(&text, "vnvme_controller_commands_total", &[]),
            [0.0; 3]
        );
        assert_eq!(
            values(&text, "vnvme_controller_errors_total", &[]).len(),
            ERROR_STATUSES.len()
        );
        assert!(text.contains("# TYPE vnvme_controller_latency_seconds histogram\n"));
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn counters_and_histograms_match_what_was_counted() {
        let src = source();
        let ns = Arc::new(IoStats::default());
        // what a reactor writes: 3 reads of 4 KiB (one failed), 1 write, 1 flush
        for (op, status, lat) in [
            (0x02, nvme_spec::Status::SUCCESS, 3_000),
            (0x02, nvme_spec::Status::SUCCESS, 5_000),
            (0x02, nvme_spec::Status::UNRECOVERED_READ_ERROR, 600),
            (0x01, nvme_spec::Status::SUCCESS, 40_000),
            (0x00, nvme_spec::Status::SUCCESS, 2_000_000_000_000),
        ] {
            src.stats.others.record(op, 4096, status, lat);
            ns.record(op, 4096, status, lat);
        }
        src.stats.io_errors[10].store(1, std::sync::atomic::Ordering::Relaxed);
        // the namespace list is filled by the controller; reach it through a controller
        let text = prometheus(std::slice::from_ref(&src));
        assert_eq!(
            values(&text, "vnvme_controller_commands_total", &["op=\"read\""]),
            [3.0]
        );
        assert_eq!(
            values(&text, "vnvme_controller_bytes_total", &["op=\"read\""]),
            [8192.0]
        );
        assert_eq!(
            values(
                &text,
                "vnvme_controller_errors_total",
                &["status=\"unrecovered_read_error\""]
            ),
            [1.0]
        );
        let b = |le: &str| {
            values(
                &text,
                "vnvme_controller_latency_seconds_bucket",
                &[&format!("le=\"{le}\"")],
            )
        };
        assert_eq!(b("0.000000256"), [0.0]);
        assert_eq!(b("0.000001024"), [1.0]); // 600 ns
        assert_eq!(b("0.000004096"), [2.0]); // + 3 us
        assert_eq!(b("0.000065536"), [4.0]); // + 5 and 40 us
        assert_eq!(b("34.359738368"), [4.0]);
        assert_eq!(b("+Inf"), [5.0]); // + 2000 s
        assert_eq!(
            values(&text, "vnvme_controller_latency_seconds_count", &[]),
            [5.0]
        );
        let sum = values(&text, "vnvme_controller_latency_seconds_sum", &[])[0];
        assert!((sum - 2000.0000486).abs() < 1e-9, "{sum}");
        let buckets = values(&text, "vnvme_controller_latency_seconds_bucket", &[]);
        assert_eq!(buckets.len(), LATENCY_BUCKETS + 1);
        assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "cumulative");

        let j = json(&[src]);
        assert_eq!(j[0]["reads"], 3);
        assert_eq!(j[0]["read_bytes"], 8192);
        assert_eq!(j[0]["errors"], 1);
        assert_eq!(j[0]["errors_by_status"]["unrecovered_read_error"], 1);
        assert_eq!(j[0]["latency_us"]["count"], 5);
        let p50 = j[0]["latency_us"]["p50"].as_f64().unwrap();
        assert!((4.096..=8.192).contains(&p50), "{p50}"); // the third of five: 5 us
        assert_eq!(j[0]["latency_us"]["p99.9"], (1u64 << 35) as f64 / 1000.0);
        assert_eq!(ns.snapshot().commands(), 5);
    }
}
