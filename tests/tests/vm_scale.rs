//! 128 controllers in one guest (issue 6): one vnvme process serves a PF and its 127 VFs
//! (all online, two shared reactor threads), each with a namespace of its own; a Linux guest
//! attaches all 128 as vfio-user devices (behind PCIe root ports), its stock driver brings
//! every controller live, `nvme list` shows the 128 namespaces, VF 1 sees only its own
//! namespace (a command naming another VF's gets Invalid Namespace), and fio verify runs on a
//! sample of 8 of them at once.

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::Duration;

use vnvme::config::Config;
use vnvme::daemon::{Daemon, vf_socket};
use vnvme_tests::guest::{TempDir, harness_guest, run_ok, section, value};

const CONTROLLERS: usize = 128;

const SCRIPT: &str = r#"
want=128
for i in $(seq 1 600); do
  n=0; for c in /sys/class/nvme/nvme*; do [ "$(cat $c/state 2>/dev/null)" = live ] && n=$((n+1)); done
  [ $n -ge $want ] && break; sleep 0.2
  [ $((i % 50)) = 0 ] && echo "progress: $n of $want controllers live"
done
echo; echo "live $n"
for i in $(seq 1 300); do [ "$(ls /sys/block | grep -cE '^nvme[0-9]+n[0-9]+$')" -ge $want ] && break; sleep 0.2; done
echo "namespaces $(ls /sys/block | grep -cE '^nvme[0-9]+n[0-9]+$')"
echo "cntlids $(cat /sys/class/nvme/nvme*/cntlid | sort -u | wc -l)"
echo @@LIST-BEGIN; nvme list; echo @@LIST-END
# isolation, seen from the guest: VF 1 (CNTLID 4097) has namespace 2 only. Linux itself
# refuses I/O passthrough on the controller to another NSID, so the controller's own refusal
# is shown with an admin command naming namespace 3 (SMART log: Invalid Namespace)
VF1=
for c in /sys/class/nvme/nvme*; do [ "$(cat $c/cntlid)" = 4097 ] && VF1=/dev/$(basename $c); done
echo @@VF1NS-BEGIN; nvme list-ns $VF1; echo @@VF1NS-END
rc=0; nvme io-passthru $VF1 --opcode=2 --namespace-id=2 --data-len=512 --read >/dev/null || rc=$?
echo; echo "read-own-rc $rc"
echo @@FOREIGN-BEGIN; rc=0; nvme smart-log $VF1 --namespace-id=3 2>&1 >/dev/null || rc=$?; echo; echo "foreign-rc $rc"; echo @@FOREIGN-END
echo "listed $(nvme list | grep -c '^/dev/nvme')"
echo "progress: fio verify on 8 namespaces"
# fio verify on 8 namespaces spread over the controllers, all at once
FILES=$(ls /sys/block | grep -E '^nvme[0-9]+n[0-9]+$' | sort -V | awk 'NR % 16 == 1' | sed 's|^|/dev/|' | tr '\n' ':' | sed 's/:$//')
echo "fio-files $FILES"
rc=0
for f in $(echo $FILES | tr ':' ' '); do
  fio --name=$(basename $f) --filename=$f --direct=1 --ioengine=io_uring --rw=randwrite --bs=4k \
    --iodepth=4 --size=2M --verify=crc32c --verify_fatal=1 --randrepeat=1 >/tmp/fio-$(basename $f).log 2>&1 &
done
for j in $(jobs -p); do wait $j || rc=$?; done
echo; echo "fio-rc $rc"
echo "fio-ok $(grep -l 'err= 0' /tmp/fio-*.log | wc -l)"
"#;

#[test]
fn a_guest_attaches_all_128_controllers() {
    let tmp = TempDir::new("vm-scale");
    let pf = tmp.path().join("pf.sock");
    let mut toml = format!(
        "reactors = 2\n[[controller]]\nsocket = \"{}\"\nserial = \"SCALE\"\nvfs = {}\n\
         vfs_online = true\n",
        pf.display(),
        CONTROLLERS - 1
    );
    for k in 0..CONTROLLERS {
        let _ = write!(
            toml,
            "[[controller.namespace]]\nbackend = \"malloc:8M\"\nattach = [{k}]\n"
        );
    }
    let cfg = Config::parse(&toml, std::path::Path::new("scale.toml")).unwrap();
    let daemon = Daemon::start(&cfg).unwrap();
    let mut guest = harness_guest(SCRIPT)
        .mem_mib(2048)
        .smp(4)
        .timeout(Duration::from_mins(20))
        // the guest takes minutes under TCG: show its milestones (stderr directly, so that
        // the test harness does not hold them back until the end)
        .on_console_line(|line| {
            if let Some(p) = line.trim().strip_prefix("progress: ") {
                let _ = writeln!(std::io::stderr().lock(), "vm_scale: {p}");
            }
        })
        .vfio_user(&pf);
    for k in 1..CONTROLLERS {
        guest = guest.vfio_user(vf_socket(&pf, k));
    }
    let out = run_ok(&guest);
    let all = &out.console;
    let n = |k: &str| value(&out, k).and_then(|v| v.parse::<usize>().ok());
    assert_eq!(n("live"), Some(CONTROLLERS), "{all}");
    assert_eq!(n("cntlids"), Some(CONTROLLERS), "{all}");
    assert_eq!(n("namespaces"), Some(CONTROLLERS), "{all}");
    assert_eq!(
        n("listed"),
        Some(CONTROLLERS),
        "{}",
        section(&out, "@@LIST")
    );
    let own = section(&out, "@@VF1NS");
    assert!(
        own.contains("0x2") && !own.contains("0x3") && !own.contains("0x1\n"),
        "VF 1's active namespaces:\n{own}"
    );
    assert_eq!(value(&out, "read-own-rc"), Some("0"), "{all}");
    let foreign = section(&out, "@@FOREIGN");
    assert!(
        foreign.contains("Invalid Namespace") && !foreign.contains("foreign-rc 0"),
        "another VF's namespace through VF 1:\n{foreign}"
    );
    assert_eq!(value(&out, "fio-rc"), Some("0"), "{all}");
    assert_eq!(n("fio-ok"), Some(8), "{all}");
    daemon.stop().unwrap();
}
