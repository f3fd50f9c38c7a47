//! SR-IOV with the stock nvme-cli and Linux nvme driver (issue 6): a guest gets the PF and
//! its two VFs as three vfio-user devices (QEMU hides the SR-IOV capability, so each VF is
//! its own device). The offline VFs fail to come up; `nvme primary-ctrl-caps` and `nvme
//! list-secondary` on the PF show the pools and the secondaries; `nvme virt-mgmt` assigns
//! resources to VF 1 and brings it online; bound again, the driver brings it up as a live
//! controller of the same subsystem, and fio verify runs through it. Then namespace
//! management with the stock nvme-cli on the PF: create-ns (shared and private), attach-ns to
//! the PF and VF 1 (VF 1's driver finds it through the Namespace Attribute Changed event),
//! fio verify on it, detach-ns (the path goes away), delete-ns (the capacity comes back).

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
# namespace management with the stock nvme-cli on the PF; VF 1 is not touched by nvme-cli,
# so its path to the new namespace can only come from the Namespace Attribute Changed event
paths() { ls /sys/class/nvme/$1/ | grep -E "^nvme[0-9]+(c[0-9]+)?n$2\$" | head -1; }
PFC=$(basename $PF)
echo @@IDCTRL-BEGIN; nvme id-ctrl $PF | grep -E '^(oacs|oaes|nn|tnvmcap|unvmcap|mnan) '; echo @@IDCTRL-END
echo @@CREATE-BEGIN; rc=0; nvme create-ns $PF --nsze=32768 --ncap=32768 --flbas=0 --nmic=1 || rc=$?; echo; echo "create-rc $rc"; echo @@CREATE-END
echo @@PRIVATE-BEGIN; rc=0; nvme create-ns $PF --nsze=2048 --ncap=2048 --flbas=0 --nmic=0 || rc=$?; echo; echo "private-rc $rc"; echo @@PRIVATE-END
rc=0; nvme attach-ns $PF --namespace-id=3 --controllers=1,4097 2>&1 || rc=$?
echo; echo "attach-private-rc $rc"
rc=0; nvme attach-ns $PF --namespace-id=2 --controllers=1,4097 || rc=$?
echo; echo "attach-rc $rc"
for i in $(seq 1 100); do [ -n "$(paths $VF 2)" ] && [ -n "$(paths $PFC 2)" ] && break; sleep 0.1; done
echo "vf-path-ns2 $(paths $VF 2)"
echo "pf-path-ns2 $(paths $PFC 2)"
NS2=$(ls /sys/block | grep -E '^nvme[0-9]+n2$' | head -1)
echo "ns2-dev $NS2"
echo "ns2-bytes $(blockdev --getsize64 /dev/$NS2 2>/dev/null)"
echo @@LIST-NS-BEGIN; nvme list; echo @@LIST-NS-END
rc=0
fio --name=ns2 --filename=/dev/$NS2 --direct=1 --ioengine=io_uring --rw=randwrite --bs=4k \
  --iodepth=8 --size=8M --verify=crc32c --verify_fatal=1 --randrepeat=1 >/dev/null || rc=$?
echo; echo "ns2-fio-rc $rc"
rc=0; nvme detach-ns $PF --namespace-id=2 --controllers=4097 || rc=$?
echo; echo "detach-vf-rc $rc"
for i in $(seq 1 100); do [ -z "$(paths $VF 2)" ] && break; sleep 0.1; done
echo "vf-path-ns2-after-detach $(paths $VF 2)"
echo "pf-path-ns2-after-detach $(paths $PFC 2)"
rc=0; nvme detach-ns $PF --namespace-id=2 --controllers=1 || rc=$?
nvme delete-ns $PF --namespace-id=2 || rc=$?
nvme delete-ns $PF --namespace-id=3 || rc=$?
echo; echo "delete-rc $rc"
for i in $(seq 1 100); do ls /sys/block | grep -qE '^nvme[0-9]+n2$' || break; sleep 0.1; done
echo "ns2-after-delete $(ls /sys/block | grep -cE '^nvme[0-9]+n2$')"
echo @@IDCTRL2-BEGIN; nvme id-ctrl $PF | grep -E '^unvmcap '; echo @@IDCTRL2-END
"#;

#[test]
fn nvme_cli_manages_vfs_through_the_pf() {
    let tmp = TempDir::new("vm-sriov");
    let pf = tmp.path().join("pf.sock");
    let cfg = Config::parse(
        &format!(
            "[[controller]]\nsocket = \"{}\"\nserial = \"SRIOV-PF\"\nvfs = 2\n\
             namespace_pool = \"malloc:256M\"\n\
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

    // namespace management: nvme-cli create-ns / attach-ns / detach-ns / delete-ns
    // `nvme id-ctrl` prints "name : value" (numbers maybe with thousands separators)
    let field = |sec: &str, name: &str| {
        sec.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == name).then(|| v.trim().replace([',', '.'], ""))
            })
            .unwrap_or_default()
    };
    let idc = section(&out, "@@IDCTRL");
    assert_eq!(field(idc, "unvmcap"), "201326592", "{idc}");
    assert_eq!(field(idc, "nn"), "256", "{idc}");
    assert_eq!(value(&out, "create-rc"), Some("0"), "{all}");
    assert!(
        section(&out, "@@CREATE").contains("nsid:2"),
        "{}",
        section(&out, "@@CREATE")
    );
    assert_eq!(value(&out, "private-rc"), Some("0"), "{all}");
    assert_ne!(
        value(&out, "attach-private-rc"),
        Some("0"),
        "a private namespace went to two controllers:\n{all}"
    );
    assert_eq!(value(&out, "attach-rc"), Some("0"), "{all}");
    assert!(
        value(&out, "vf-path-ns2").is_some_and(|p| p.ends_with("n2")),
        "VF 1 never saw namespace 2 (event + rescan):\n{all}"
    );
    assert!(
        value(&out, "pf-path-ns2").is_some_and(|p| p.ends_with("n2")),
        "{all}"
    );
    assert_eq!(value(&out, "ns2-bytes"), Some("16777216"), "{all}");
    assert_eq!(value(&out, "ns2-fio-rc"), Some("0"), "{all}");
    assert_eq!(value(&out, "detach-vf-rc"), Some("0"), "{all}");
    assert_eq!(
        value(&out, "vf-path-ns2-after-detach"),
        None,
        "VF 1 still has namespace 2:\n{all}"
    );
    assert!(
        value(&out, "pf-path-ns2-after-detach").is_some_and(|p| p.ends_with("n2")),
        "{all}"
    );
    assert_eq!(value(&out, "delete-rc"), Some("0"), "{all}");
    assert_eq!(value(&out, "ns2-after-delete"), Some("0"), "{all}");
    let idc2 = section(&out, "@@IDCTRL2");
    assert_eq!(
        field(idc2, "unvmcap"),
        "201326592",
        "capacity back:\n{idc2}"
    );
    daemon.stop().unwrap();
}
