#!/bin/sh
# vnvme guest /init: mount the basics, load drivers for the PCI devices present, run the
# test script handed in by the harness (/h/script), print an exit-status marker, power off.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
for d in /dev/shm /tmp /run; do mount -t tmpfs tmpfs "$d"; done
exec </dev/console >/dev/console 2>&1
modprobe configfs && mount -t configfs configfs /sys/kernel/config
hostname guest
ip link set lo up
# coldplug (no udev): load a driver for every PCI device unless hnocoldplug=1
if [ -z "$hnocoldplug" ]; then
  for a in /sys/bus/pci/devices/*/modalias; do modprobe -q "$(cat "$a")" 2>/dev/null; done
fi
mkdir -p /tmp/h
[ -d /h ] && cp -a /h/. /tmp/h/
echo "=== VNVME-GUEST BOOTED uptime=$(cut -d' ' -f1 /proc/uptime)s kernel=$(uname -r) ==="
rc=0
if [ -e /tmp/h/script ]; then
  cd /tmp/h && sh -e /tmp/h/script
  rc=$?
  cd /
else
  echo "no script given"
  rc=127
fi
echo "=== VNVME-GUEST-EXIT-STATUS: $rc ==="
sync
poweroff -f
