//! Namespace management at scale from a guest (issue 16, item 16): the stock nvme-cli on the
//! PF creates and attaches namespaces one by one until the subsystem holds NN = 256, the
//! guest's driver finds every one through the Namespace Attribute Changed events, then one
//! delete-ns removes them all. The guest prints how long each phase took (seconds under TCG,
//! shown by the test, not asserted: BENCHMARKS.md records the figures).

use std::io::Write as _;

use vnvme::config::Config;
use vnvme::daemon::Daemon;
use vnvme_tests::guest::{TempDir, harness_guest, run_ok, value};

/// Namespaces created in the guest: with the configured one, NN (256).
const CREATED: u32 = 255;

const SCRIPT: &str = r#"
PF=/dev/nvme0
for i in $(seq 1 100); do [ -e $PF ] && break; sleep 0.1; done
t0=$(cut -d' ' -f1 /proc/uptime)
i=0; failed=0
while [ $i -lt $N ]; do
  out=$(nvme create-ns $PF --nsze=256 --ncap=256 --flbas=0 --nmic=1 2>&1)
  nsid=$(echo "$out" | sed -n 's/.*nsid:\([0-9]*\).*/\1/p')
  if [ -z "$nsid" ]; then echo "create failed: $out"; failed=$((failed+1)); break; fi
  nvme attach-ns $PF --namespace-id=$nsid --controllers=1 >/dev/null 2>&1 || failed=$((failed+1))
  i=$((i+1))
  [ $((i % 64)) = 0 ] && echo "progress: $i namespaces created and attached"
done
t1=$(cut -d' ' -f1 /proc/uptime)
for k in $(seq 1 100); do [ "$(ls /sys/block | grep -c '^nvme0n')" -ge $((N+1)) ] && break; sleep 0.2; done
echo; echo "failed $failed"
echo "blockdevs $(ls /sys/block | grep -c '^nvme0n')"
echo "listed $(nvme list-ns $PF | grep -c ':0x')"
t2=$(cut -d' ' -f1 /proc/uptime)
nvme delete-ns $PF --namespace-id=0xffffffff >/dev/null 2>&1 || echo "delete-all failed"
for k in $(seq 1 100); do [ "$(ls /sys/block | grep -c '^nvme0n')" = 0 ] && break; sleep 0.2; done
t3=$(cut -d' ' -f1 /proc/uptime)
echo "blockdevs-after $(ls /sys/block | grep -c '^nvme0n')"
echo "allocated-after $(nvme list-ns $PF --all | grep -c ':0x')"
awk -v a=$t0 -v b=$t1 -v c=$t2 -v d=$t3 'BEGIN { printf "timing create+attach %.1f s, delete all %.1f s\n", b-a, d-c }'
"#;

#[test]
fn a_guest_creates_attaches_and_deletes_256_namespaces() {
    let tmp = TempDir::new("vm-ns-scale");
    let pf = tmp.path().join("pf.sock");
    let cfg = Config::parse(
        &format!(
            "[[controller]]\nsocket = \"{}\"\nnamespace_pool = \"malloc:64M\"\n\
             [[controller.namespace]]\nbackend = \"malloc:16M\"\n",
            pf.display()
        ),
        std::path::Path::new("ns-scale.toml"),
    )
    .unwrap();
    let daemon = Daemon::start(&cfg).unwrap();
    let guest = harness_guest(format!("N={CREATED}\n{SCRIPT}"))
        .on_console_line(|line| {
            let l = line.trim();
            if let Some(p) = l.strip_prefix("progress: ").or(l.strip_prefix("timing ")) {
                let _ = writeln!(std::io::stderr().lock(), "vm_namespace_scale: {p}");
            }
        })
        .vfio_user(&pf);
    let out = run_ok(&guest);
    let all = &out.console;
    assert_eq!(value(&out, "failed"), Some("0"), "{all}");
    let n = |k: &str| value(&out, k).and_then(|v| v.parse::<u32>().ok());
    assert_eq!(n("blockdevs"), Some(CREATED + 1), "{all}");
    assert_eq!(n("listed"), Some(CREATED + 1), "{all}");
    assert_eq!(n("blockdevs-after"), Some(0), "{all}");
    assert_eq!(n("allocated-after"), Some(0), "{all}");
    daemon.stop().unwrap();
}
