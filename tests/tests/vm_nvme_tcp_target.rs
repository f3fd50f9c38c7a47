//! vnvme's NVMe/TCP target against the real Linux kernel initiator: a guest runs stock
//! nvme-cli `discover` and `connect -t tcp -a 10.0.2.2` (header and data digests on) to the
//! target on the host, fio write+verify on the connected namespace, reads Identify through
//! it, and disconnects. A second subsystem allows only another host: it is absent from the
//! guest's discovery log and its Connect is refused.

use std::path::Path;

use vnvme::config::Config;
use vnvme::daemon::Daemon;
use vnvme_tests::guest::{TempDir, harness_guest, run_ok, section, value};

const NQN: &str = "nqn.2026-11.io.vnvme:tcp-target";
const FORBIDDEN: &str = "nqn.2026-11.io.vnvme:other-hosts-only";

const SCRIPT: &str = r#"
net_up
modprobe nvme_tcp
echo @@DISC-BEGIN
rc=0; nvme discover -t tcp -a 10.0.2.2 -s $PORT || rc=$?
echo; echo "discover-rc $rc"
echo @@DISC-END
rc=0; nvme connect -t tcp -a 10.0.2.2 -s $PORT -n $NQN --hdr-digest --data-digest -k 5 || rc=$?
echo; echo "connect-rc $rc"
for i in $(seq 1 100); do [ -b /dev/nvme0n1 ] && break; sleep 0.1; done
echo; echo "size $(cat /sys/block/nvme0n1/size)"
echo "transport $(cat /sys/class/nvme/nvme0/transport)"
echo @@ID-BEGIN; nvme id-ctrl /dev/nvme0 | grep -E '^(subnqn|cntlid|mdts|ioccsz|cntrltype|maxcmd) '; echo @@ID-END
echo @@FIO-BEGIN
rc=0
fio --name=tcp --filename=/dev/nvme0n1 --direct=1 --ioengine=io_uring --rw=randwrite \
  --bsrange=4k-128k --iodepth=16 --numjobs=2 --size=16M --offset_increment=24M \
  --verify=crc32c --verify_fatal=1 --randrepeat=1 --group_reporting || rc=$?
echo; echo "fio-rc $rc"
echo @@FIO-END
rc=0; nvme disconnect -n $NQN || rc=$?
echo; echo "disconnect-rc $rc"
sleep 0.5
echo "left $(ls /sys/class/nvme | wc -l)"
rc=0; nvme connect -t tcp -a 10.0.2.2 -s $PORT -n $FORBIDDEN 2>&1 || rc=$?
echo; echo "forbidden-rc $rc"
echo @@DMESG-BEGIN; dmesg | grep -iE 'nvme' | tail -30; echo @@DMESG-END
"#;

#[test]
fn linux_kernel_initiator_against_the_target() {
    let tmp = TempDir::new("tcp-target");
    let cfg = Config::parse(
        &format!(
            "[[controller]]\ntcp_listen = \"127.0.0.1:0\"\nnqn = \"{NQN}\"\nserial = \"TCPTGT\"\n\
             [[controller.namespace]]\nbackend = \"file:{img}:64M\"\n\
             [[controller]]\ntcp_listen = \"127.0.0.1:0\"\nnqn = \"{FORBIDDEN}\"\n\
             allowed_hosts = [\"nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000000\"]\n\
             [[controller.namespace]]\nbackend = \"malloc:16M\"\n",
            img = tmp.path().join("ns.img").display()
        ),
        Path::new("target.toml"),
    )
    .unwrap();
    let daemon = Daemon::start(&cfg).expect("target starts");
    let port = daemon.tcp_addrs()[0].port();
    let script = format!("PORT={port}\nNQN={NQN}\nFORBIDDEN={FORBIDDEN}\n{SCRIPT}");
    let out = run_ok(&harness_guest(script).reach_host());
    let all = &out.console;

    let disc = section(&out, "@@DISC");
    assert_eq!(value(&out, "discover-rc"), Some("0"), "{disc}");
    assert!(
        disc.contains(NQN),
        "our subsystem missing from discovery:\n{disc}"
    );
    assert!(
        !disc.contains(FORBIDDEN),
        "a subsystem this host may not use was listed:\n{disc}"
    );
    assert_eq!(value(&out, "connect-rc"), Some("0"), "{all}");
    assert_eq!(value(&out, "transport"), Some("tcp"), "{all}");
    assert_eq!(value(&out, "size"), Some("131072"), "{all}");
    let id = section(&out, "@@ID");
    assert!(id.contains(NQN) && id.contains("ioccsz    : 516"), "{id}");
    assert_eq!(
        value(&out, "fio-rc"),
        Some("0"),
        "fio verify over NVMe/TCP:\n{}",
        section(&out, "@@FIO")
    );
    assert_eq!(value(&out, "disconnect-rc"), Some("0"), "{all}");
    assert_eq!(
        value(&out, "left"),
        Some("0"),
        "controller still present:\n{all}"
    );
    assert_ne!(
        value(&out, "forbidden-rc"),
        Some("0"),
        "a host outside allowed_hosts connected:\n{all}"
    );
    daemon.stop().unwrap();
}
