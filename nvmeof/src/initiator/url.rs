//! `nvme-tcp://HOST:PORT[,HOST:PORT...]/NQN[/NSID][?OPTIONS]` (or `nvme-rdma://`, the same
//! but over RDMA, without digests): where a namespace backend connects. Several addresses are paths to one subsystem, tried in order (failover).
//! Options (`&`-separated): `hdgst`, `ddgst`, `kato=SECS`, `ctrl_loss_tmo=SECS`,
//! `reconnect_delay=SECS`, `io_timeout=SECS`, `queue_size=N`, `nr_io_queues=N`,
//! `hostnqn=NQN` — named as nvme-cli names them; NVMe/RDMA only: `no_remote_invalidate`
//! (the host revokes each command's memory window itself instead of asking the target to,
//! for a target that does not honour Send with Invalidate).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use nvme_spec::fabrics::NQN_MAX;

/// Scheme prefix.
pub const SCHEME: &str = "nvme-tcp://";
/// Scheme prefix of NVMe/RDMA.
pub const RDMA_SCHEME: &str = "nvme-rdma://";

/// Whether `s` names a remote NVMe-oF namespace (either transport).
pub fn is_fabrics_url(s: &str) -> bool {
    s.starts_with(SCHEME) || s.starts_with(RDMA_SCHEME)
}

/// The transport a queue connects over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Transport {
    #[default]
    Tcp,
    Rdma,
}

impl Transport {
    /// The transport as logs name it (`nvme-tcp`, `nvme-rdma`).
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "nvme-tcp",
            Transport::Rdma => "nvme-rdma",
        }
    }
}

/// A parsed `nvme-tcp://` or `nvme-rdma://` address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpUrl {
    pub transport: Transport,
    /// `host:port` of each path, in failover order.
    pub paths: Vec<String>,
    pub subnqn: String,
    pub nsid: u32,
    pub header_digest: bool,
    pub data_digest: bool,
    pub kato: Duration,
    pub ctrl_loss_tmo: Duration,
    /// With the connection lost this long, commands fail (Host Pathing Error) instead of
    /// waiting for a reconnect, which goes on until `ctrl_loss_tmo` (Linux's
    /// `fast_io_fail_tmo`). `None` (the default): they wait.
    pub fast_io_fail_tmo: Option<Duration>,
    pub reconnect_delay: Duration,
    pub io_timeout: Duration,
    pub queue_size: u16,
    /// I/O queues (TCP connections) per namespace backend.
    pub nr_io_queues: u16,
    pub hostnqn: Option<String>,
    /// NVMe/RDMA: the target invalidates each command's memory window with its response
    /// (the default; `no_remote_invalidate` turns it off).
    pub remote_invalidate: bool,
}

/// Why an address was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{0} (expected {SCHEME}HOST:PORT[,HOST:PORT]/NQN[/NSID][?hdgst&ddgst&kato=S&ctrl_loss_tmo=S&fast_io_fail_tmo=S&reconnect_delay=S&io_timeout=S&queue_size=N&hostnqn=NQN&no_remote_invalidate])"
)]
pub struct UrlError(String);

fn bad(s: impl Into<String>) -> UrlError {
    UrlError(s.into())
}

/// The longest time an option takes, in seconds: what Keep Alive Timeout's 32-bit count of
/// milliseconds holds (NVMe base 2.0 §5.27.1.12), about 49 days. Longer would overflow the
/// clock arithmetic of the reconnect loop.
const MAX_SECS: u64 = u32::MAX as u64 / 1000;

fn secs(k: &str, v: &str) -> Result<Duration, UrlError> {
    let n: u64 = v
        .parse()
        .ok()
        .filter(|n| *n <= MAX_SECS)
        .ok_or_else(|| bad(format!("{k}={v}: want a number of seconds, 0..={MAX_SECS}")))?;
    Ok(Duration::from_secs(n))
}

impl FromStr for TcpUrl {
    type Err = UrlError;

    fn from_str(s: &str) -> Result<Self, UrlError> {
        let (transport, rest) = match (s.strip_prefix(SCHEME), s.strip_prefix(RDMA_SCHEME)) {
            (Some(r), _) => (Transport::Tcp, r),
            (_, Some(r)) => (Transport::Rdma, r),
            _ => {
                return Err(bad(format!(
                    "{s:?} does not start with {SCHEME} or {RDMA_SCHEME}"
                )));
            }
        };
        let (main, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (addrs, path) = main
            .split_once('/')
            .ok_or_else(|| bad(format!("{s:?}: no /NQN after the address")))?;
        let mut paths = Vec::new();
        for a in addrs.split(',') {
            let (host, port) = a
                .rsplit_once(':')
                .ok_or_else(|| bad(format!("{a:?}: no :PORT")))?;
            if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
                return Err(bad(format!("{a:?}: want HOST:PORT with a port 1..65535")));
            }
            paths.push(a.to_string());
        }
        let (subnqn, nsid) = match path.rsplit_once('/') {
            Some((nqn, n)) => (
                nqn,
                n.parse::<u32>()
                    .ok()
                    .filter(|&n| n != 0 && n != u32::MAX)
                    .ok_or_else(|| bad(format!("{n:?}: not a namespace id")))?,
            ),
            None => (path, 1),
        };
        if subnqn.is_empty() || subnqn.len() > NQN_MAX || !subnqn.is_ascii() {
            return Err(bad(format!("{subnqn:?}: not an NQN (1..=223 ASCII bytes)")));
        }
        let mut u = TcpUrl {
            transport,
            paths,
            subnqn: subnqn.to_string(),
            nsid,
            header_digest: false,
            data_digest: false,
            kato: Duration::from_secs(5),
            ctrl_loss_tmo: Duration::from_mins(1),
            fast_io_fail_tmo: None,
            reconnect_delay: Duration::from_secs(2),
            io_timeout: Duration::from_secs(30),
            queue_size: 128,
            nr_io_queues: 1,
            hostnqn: None,
            remote_invalidate: true,
        };
        for opt in query.split('&').filter(|o| !o.is_empty()) {
            let (k, v) = opt.split_once('=').unwrap_or((opt, ""));
            match k {
                "hdgst" | "ddgst" if transport == Transport::Rdma => {
                    return Err(bad(format!("{k}: digests are NVMe/TCP's")));
                }
                "no_remote_invalidate" if transport == Transport::Tcp => {
                    return Err(bad(format!("{k}: an NVMe/RDMA option")));
                }
                "no_remote_invalidate" if v.is_empty() => u.remote_invalidate = false,
                "hdgst" => u.header_digest = true,
                "ddgst" => u.data_digest = true,
                "kato" => u.kato = secs(k, v)?,
                "ctrl_loss_tmo" => u.ctrl_loss_tmo = secs(k, v)?,
                "fast_io_fail_tmo" => u.fast_io_fail_tmo = Some(secs(k, v)?),
                "reconnect_delay" => {
                    u.reconnect_delay = secs(k, v)?.max(Duration::from_millis(100));
                }
                "io_timeout" => u.io_timeout = secs(k, v)?.max(Duration::from_secs(1)),
                "queue_size" => {
                    u.queue_size = v
                        .parse()
                        .ok()
                        .filter(|n| (2..=1024).contains(n))
                        .ok_or_else(|| bad(format!("queue_size={v}: want 2..=1024")))?;
                }
                "nr_io_queues" => {
                    u.nr_io_queues = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=16).contains(n))
                        .ok_or_else(|| bad(format!("nr_io_queues={v}: want 1..=16")))?;
                }
                "hostnqn" if !v.is_empty() && v.len() <= NQN_MAX => u.hostnqn = Some(v.into()),
                _ => return Err(bad(format!("unknown or malformed option {opt:?}"))),
            }
        }
        Ok(u)
    }
}

impl fmt::Display for TcpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.transport {
            Transport::Tcp => SCHEME,
            Transport::Rdma => RDMA_SCHEME,
        };
        write!(
            f,
            "{scheme}{}/{}/{}",
            self.paths.join(","),
            self.subnqn,
            self.nsid
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_paths_nqn_nsid_and_options() {
        let u: TcpUrl =
            "nvme-tcp://127.0.0.1:4420,[::1]:4421/nqn.2014-08.org.test:a/2?hdgst&ctrl_loss_tmo=5&fast_io_fail_tmo=0"
                .parse()
                .unwrap();
        assert_eq!(u.fast_io_fail_tmo, Some(Duration::ZERO));
        for bad in [
            "fast_io_fail_tmo=-1",
            "fast_io_fail_tmo=",
            "fast_io_fail_tmo",
            "reconnect_delay=18446744073709551615",
            "kato=4294968",
            "ctrl_loss_tmo=1e3",
        ] {
            let e = format!("nvme-tcp://127.0.0.1:4420/nqn.x/1?{bad}")
                .parse::<TcpUrl>()
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("want a number of seconds, 0..=4294967"),
                "{bad}: {e}"
            );
        }
        assert_eq!(u.paths, ["127.0.0.1:4420", "[::1]:4421"]);
        assert_eq!(u.subnqn, "nqn.2014-08.org.test:a");
        assert_eq!(u.nsid, 2);
        assert!(u.header_digest && !u.data_digest);
        assert_eq!(u.ctrl_loss_tmo, Duration::from_secs(5));
        let d: TcpUrl = "nvme-tcp://h:1/nqn.x".parse().unwrap();
        assert_eq!(d.nsid, 1);
        assert_eq!(d.to_string(), "nvme-tcp://h:1/nqn.x/1");
    }

    #[test]
    fn refuses_garbage_with_the_reason() {
        for s in [
            "nvme-tcp:/x",
            "nvme-tcp://host/nqn",
            "nvme-tcp://host:0/nqn",
            "nvme-tcp://host:99999/nqn",
            "nvme-tcp://:4420/nqn",
            "nvme-tcp://h:1",
            "nvme-tcp://h:1/",
            "nvme-tcp://h:1/nqn/0",
            "nvme-tcp://h:1/nqn/x",
            "nvme-tcp://h:1/nqn?kato=x",
            "nvme-tcp://h:1/nqn?queue_size=1",
            "nvme-tcp://h:1/nqn?nr_io_queues=0",
            "nvme-tcp://h:1/nqn?bogus",
        ] {
            let e = s.parse::<TcpUrl>().unwrap_err();
            assert!(e.to_string().contains("expected nvme-tcp://"), "{s}: {e}");
        }
        let r: TcpUrl = "nvme-rdma://10.0.0.1:4420/nqn.x/2?queue_size=64"
            .parse()
            .unwrap();
        assert_eq!(r.transport, Transport::Rdma);
        assert_eq!(r.to_string(), "nvme-rdma://10.0.0.1:4420/nqn.x/2");
        assert!("nvme-rdma://h:1/nqn?hdgst".parse::<TcpUrl>().is_err());
        assert!(r.remote_invalidate);
        let own: TcpUrl = "nvme-rdma://h:1/nqn?no_remote_invalidate".parse().unwrap();
        assert!(!own.remote_invalidate);
        for bad in [
            "nvme-tcp://h:1/nqn?no_remote_invalidate",
            "nvme-rdma://h:1/nqn?no_remote_invalidate=1",
        ] {
            assert!(bad.parse::<TcpUrl>().is_err(), "{bad}");
        }
        assert!(is_fabrics_url("nvme-rdma://h:1/n") && !is_fabrics_url("file:x"));
        let long = format!("nvme-tcp://h:1/{}", "n".repeat(224));
        assert!(long.parse::<TcpUrl>().is_err());
    }
}
