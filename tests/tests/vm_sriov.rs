//! SR-IOV with the stock nvme-cli and Linux nvme driver (issue 6): a guest gets the PF and
//! its two VFs as three vfio-user devices (QEMU hides the SR-IOV capability, so each VF is
//! its own device). The offline VFs fail to come up; `nvme primary-ctrl-caps` and `nvme
//! list-secondary` on the PF show the pools and the secondaries; `nvme virt-mgmt` assigns
//! resources to VF 1 and brings it online; bound again, the driver brings it up as a live
//! controller of the same subsystem, and fio verify runs through it.

use vnvme::config::Config;
use vnvme::daemon::{Daemon, vf_socket};
use vnvme_tests::guest::{TempDir, harness_guest, run_ok, section, value};

const SCRIPT: &str = r#"
for i in $(seq 1 100); do ls /sys/class/nvme/ 2>/dev/null | grep -q nvme && break; sleep 0.1; done
sleep 3   # the offline VFs time out (CAP.TO 1 s) and are released by the driver
PF=
for c in /sys/class/nvme/nvme*; do [ "$(cat $c/cntlid)" = 1 ] && PF=/dev/$(basename $c); done
echo; echo "pf $PF"
echo "controllers-before $(ls /sys/class/nvme | wc -l)"
echo @@CAPS-BEGIN; nvme primary-ctrl-caps $PF; echo @@CAPS-END
echo @@LIST-BEGIN; nvme list-secondary $PF; echo @@LIST-END
rc=0
nvme virt-mgmt $PF -c 4097 -r 0 -a 8 -n 2 || rc=$?
nvme virt-mgmt $PF -c 4097 -r 1 -a 8 -n 1 || rc=$?
nvme virt-mgmt $PF -c 4097 -a 9 || rc=$?
echo; echo "virt-mgmt-rc $rc"
echo @@LIST2-BEGIN; nvme list-secondary $PF; echo @@LIST2-END
# bind the nvme driver to the NVMe PCI functions it gave up on
for d in /sys/bus/pci/devices/*; do
  if [ "$(cat $d/class)" = 0x010802 ] && [ ! -e $d/driver ]; then echo $(basename $d) > /sys/bus/pci/drivers/nvme/bind 2>/dev/null || true; fi
done
for i in $(seq 1 50); do
  n=0; for c in /sys/class/nvme/nvme*; do [ "$(cat $c/state)" = live ] && n=$((n+1)); done
  [ $n -ge 2 ] && break; sleep 0.1
done
echo @@CTRLS-BEGIN
for c in /sys/class/nvme/nvme*; do echo "$(basename $c) cntlid=$(cat $c/cntlid) state=$(cat $c/state)"; done
echo @@CTRLS-END
VF=
for c in /sys/class/nvme/nvme*; do [ "$(cat $c/cntlid)" = 4097 ] && VF=$(basename $c); done
echo; echo "vf-state $(cat /sys/class/nvme/$VF/state 2>/dev/null)"
echo "vf-io-queues $(ls /sys/class/nvme/$VF/device/msi_irqs 2>/dev/null | wc -l)"
NS=$(ls /sys/class/nvme/$VF/ | grep -E '^nvme[0-9]+(c[0-9]+)?n1$' | head -1)
echo "vf-ns $NS"
rc=0
fio --name=vf --filename=/dev/nvme0n1 --direct=1 --ioengine=io_uring --rw=randwrite --bs=4k \
  --iodepth=8 --size=8M --verify=crc32c --verify_fatal=1 --randrepeat=1 || rc=$?
echo; echo "fio-rc $rc"
echo @@SUBSYS-BEGIN; nvme list-subsys; echo @@SUBSYS-END
"#;

#[test]
fn nvme_cli_manages_vfs_through_the_pf() {
    let tmp = TempDir::new("vm-sriov");
    let pf = tmp.path().join("pf.sock");
    let cfg = Config::parse(
        &format!(
            "[[controller]]\nsocket = \"{}\"\nserial = \"SRIOV-PF\"\nvfs = 2\n\
             [[controller.namespace]]\nbackend = \"malloc:64M\"\n",
            pf.display()
        ),
        std::path::Path::new("sriov.toml"),
    )
    .unwrap();
    let daemon = Daemon::start(&cfg).unwrap();
    let guest = harness_guest(SCRIPT)
        .vfio_user(&pf)
        .vfio_user(vf_socket(&pf, 1))
        .vfio_user(vf_socket(&pf, 2));
    let out = run_ok(&guest);
    let all = &out.console;
    assert!(
        value(&out, "pf").is_some_and(|p| p.starts_with("/dev/nvme")),
        "{all}"
    );
    assert_eq!(
        value(&out, "controllers-before"),
        Some("1"),
        "offline VFs came up:\n{all}"
    );
    let caps = section(&out, "@@CAPS");
    assert!(caps.contains("vqfrt") && caps.contains(": 18"), "{caps}");
    let list = section(&out, "@@LIST");
    assert!(list.contains("0x1001") && list.contains("0x1002"), "{list}");
    assert_eq!(value(&out, "virt-mgmt-rc"), Some("0"), "{all}");
    let list2 = section(&out, "@@LIST2");
    assert!(list2.contains("Online"), "VF 1 not online:\n{list2}");
    assert_eq!(
        value(&out, "vf-state"),
        Some("live"),
        "{}",
        section(&out, "@@CTRLS")
    );
    assert_eq!(value(&out, "fio-rc"), Some("0"), "{all}");
    daemon.stop().unwrap();
}
