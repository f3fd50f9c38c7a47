#!/bin/bash
# Build (once, idempotently) the vnvme VM test harness in $VNVME_CACHE/harness:
#   trixie/   Debian trixie minbase chroot with QEMU from trixie-backports (has vfio-user-pci)
#             and the guest userland (busybox-static, nvme-cli, fio, lspci)
#   guest/    vmlinuz, initramfs.cpio (uncompressed: fastest under TCG), qemu + qemu-img wrappers
#   stamps/   one file per finished stage; delete one to redo that stage
# QEMU runs from the chroot through the chroot's own loader (no chroot(2) at run time).
# Env: VNVME_CACHE (default ~/.cache/vnvme), MIRROR (default: this machine's apt sources),
#      GUEST_KVER (default: what trixie's linux-image-amd64 depends on).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${VNVME_CACHE:-$HOME/.cache/vnvme}
H=$CACHE/harness
ROOT=$H/trixie; STAMPS=$H/stamps; GUEST=$H/guest; LOGS=$H/logs
mkdir -p "$STAMPS" "$GUEST" "$LOGS"

# The Debian mirror apt uses on this machine (deb822 or one-line format); never hard-coded.
apt_uri() { # $1 = "" for the main archive, "-security" for the security archive
  { awk -v want="$1" '/^URIs:/{u=$2} /^Suites:/{for(i=2;i<=NF;i++){sec=($i ~ /-security$/); if((want=="-security")==sec){print u; exit}}}' \
      /etc/apt/sources.list.d/*.sources 2>/dev/null || true
    awk -v want="$1" '$1=="deb"{for(i=2;i<=NF;i++) if($i ~ /^[a-z]+:\/\//){s=$(i+1); sec=(s ~ /-security$/ || s ~ /\/updates$/); if((want=="-security")==sec) print $i; break}}' \
      /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true; } | head -n1 || true
}
MIRROR=${MIRROR:-$(apt_uri '')}
SECMIRROR=${SECMIRROR:-$(apt_uri -security)}
SECMIRROR=${SECMIRROR:-${MIRROR%/debian}/debian-security}

now() { date +%s; }
T0=$(now)
step() { STEP=$1; STEP_T=$(now); echo "vnvme harness: [$STEP] $2 ..." >&2; }
done_step() { date -u +%FT%TZ > "$STAMPS/$STEP"; echo "vnvme harness: [$STEP] done in $(( $(now) - STEP_T )) s" >&2; }
have() { [ -e "$STAMPS/$1" ]; }
fail() { echo "vnvme harness: [$STEP] FAILED: $1 (log: $2)" >&2; tail -n 20 "$2" >&2; exit 1; }

mounted_proc=0
enter() { mountpoint -q "$ROOT/proc" || { mount -t proc proc "$ROOT/proc"; mounted_proc=1; }; }
leave() { if [ "$mounted_proc" = 1 ]; then umount "$ROOT/proc" 2>/dev/null || umount -l "$ROOT/proc"; mounted_proc=0; fi; }
trap leave EXIT
inch() { DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 chroot "$ROOT" "$@"; }

if ! have debootstrap; then
  STEP=debootstrap
  [ -n "$MIRROR" ] || { echo "vnvme harness: no Debian mirror in this machine's apt sources; set MIRROR" >&2; exit 1; }
  if ! command -v debootstrap >/dev/null; then
    step host-packages "installing debootstrap on the host"
    { apt-get update -qq || true; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap; } >"$LOGS/host-apt.log" 2>&1 \
      || fail "apt-get install debootstrap" "$LOGS/host-apt.log"
  fi
  step debootstrap "debootstrap Debian trixie (about a minute)"
  if [ -d "$ROOT" ]; then
    grep -q " $ROOT/" /proc/mounts && { echo "mounts left under $ROOT, refusing to delete" >&2; exit 1; }
    rm -rf "$ROOT"
  fi
  debootstrap --variant=minbase trixie "$ROOT" "$MIRROR" >"$LOGS/debootstrap.log" 2>&1 || fail debootstrap "$LOGS/debootstrap.log"
  done_step
fi

if ! have packages; then
  step packages "installing QEMU (trixie-backports), nvme-cli, fio, busybox in the chroot"
  rm -f "$ROOT/etc/apt/sources.list"
  cat > "$ROOT/etc/apt/sources.list.d/debian.sources" <<SRC
Types: deb
URIs: $MIRROR
Suites: trixie trixie-updates trixie-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECMIRROR
Suites: trixie-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  printf 'path-exclude /usr/share/doc/*\npath-exclude /usr/share/man/*\npath-exclude /usr/share/locale/*\npath-exclude /usr/share/info/*\n' \
    > "$ROOT/etc/dpkg/dpkg.cfg.d/01-vnvme-nodoc"
  printf '#!/bin/sh\nexit 101\n' > "$ROOT/usr/sbin/policy-rc.d"; chmod +x "$ROOT/usr/sbin/policy-rc.d"
  enter
  { inch apt-get update \
    && inch apt-get install -y --no-install-recommends -t trixie-backports qemu-system-x86 qemu-utils \
    && inch apt-get install -y --no-install-recommends busybox-static nvme-cli fio pciutils pci.ids kmod cpio xz-utils \
    && inch apt-get clean; } >"$LOGS/chroot-apt.log" 2>&1 || fail "apt-get in chroot" "$LOGS/chroot-apt.log"
  inch dpkg-query -W -f='${Package} ${Version}\n' qemu-system-x86 busybox-static nvme-cli fio > "$H/versions.txt"
  leave
  done_step
fi

# Soft-RoCE userland for the RDMA tests: rdma-core (verbs, RDMA CM, the rxe provider) and
# iproute2's `rdma` tool; the -dev packages give the headers the verbs bindings follow.
RDMA_PKGS="libibverbs1 librdmacm1 ibverbs-providers iproute2 rdmacm-utils libibverbs-dev librdmacm-dev"
if ! have rdma-packages; then
  step rdma-packages "installing rdma-core (Soft-RoCE userland) in the chroot"
  enter
  { inch apt-get update && inch apt-get install -y --no-install-recommends $RDMA_PKGS && inch apt-get clean; } \
    >"$LOGS/chroot-rdma.log" 2>&1 || fail "apt-get rdma-core in chroot" "$LOGS/chroot-rdma.log"
  leave
  done_step
fi

if ! have kernel; then
  step kernel "downloading the Debian guest kernel"
  enter
  KVER=${GUEST_KVER:-$(inch apt-cache depends linux-image-amd64 | sed -n 's/^ *Depends: linux-image-\(.*\)$/\1/p' | grep -v unsigned | head -1)}
  rm -rf "$ROOT/opt/guest-kernel" "$ROOT/var/cache/guestdebs"
  mkdir -p "$ROOT/var/cache/guestdebs" "$ROOT/opt/guest-kernel"
  inch sh -c "cd /var/cache/guestdebs && apt-get download linux-image-$KVER" >"$LOGS/kernel.log" 2>&1 || fail "apt-get download" "$LOGS/kernel.log"
  dpkg-deb -x "$ROOT"/var/cache/guestdebs/linux-image-"$KVER"_*.deb "$ROOT/opt/guest-kernel"
  inch depmod -b /opt/guest-kernel/usr "$KVER"
  cp "$ROOT/opt/guest-kernel/boot/vmlinuz-$KVER" "$GUEST/vmlinuz"
  echo "$KVER" > "$GUEST/kver"
  rm -rf "$ROOT/var/cache/guestdebs"; rm -f "$ROOT"/var/cache/apt/*.bin
  leave
  done_step
fi
KVER=$(cat "$GUEST/kver")

MODULES="configfs qemu_fw_cfg virtio_net nvme nvme_core nvme_fabrics nvme_tcp nvmet nvmet_tcp
 vfio vfio_pci vfio_pci_core vfio_iommu_type1 null_blk loop crc32c_generic tls
 rdma_rxe rdma_cm rdma_ucm ib_uverbs nvme_rdma nvmet_rdma crc32_generic"
if ! have initramfs || [ "$0" -nt "$STAMPS/initramfs" ] || [ "$HERE/init.sh" -nt "$STAMPS/initramfs" ] \
   || [ "$HERE/net_up.sh" -nt "$STAMPS/initramfs" ]; then
  step initramfs "building the guest initramfs (busybox, nvme-cli, fio, lspci, nvme/vfio modules)"
  enter
  B=/build/initramfs; IR=$ROOT$B
  rm -rf "$IR"; mkdir -p "$IR"
  (cd "$IR" && mkdir -p usr/bin usr/sbin usr/lib/x86_64-linux-gnu usr/lib64 proc sys dev run tmp etc root mnt \
     && ln -s usr/bin bin && ln -s usr/sbin sbin && ln -s usr/lib lib && ln -s usr/lib64 lib64)
  cp "$ROOT/usr/bin/busybox" "$IR/usr/bin/busybox"
  for a in $("$ROOT/usr/bin/busybox" --list-full); do
    [ -e "$IR/$a" ] || [ -L "$IR/$a" ] || ln -s /usr/bin/busybox "$IR/$a"
  done
  BINS="/usr/sbin/nvme /usr/bin/fio /usr/bin/lspci /usr/bin/rdma /usr/bin/rping"
  # libraries a program opens at run time (vnvme's RDMA transport: libibverbs and
  # librdmacm by dlopen, and libibverbs its rxe provider, found through /etc/libibverbs.d)
  for l in /usr/lib/x86_64-linux-gnu/libibverbs.so.1 /usr/lib/x86_64-linux-gnu/librdmacm.so.1 \
           $(cd "$ROOT" && ls usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav*.so | sed 's|^|/|'); do
    real=$(inch readlink -f "$l"); mkdir -p "$IR$(dirname "$real")" "$IR$(dirname "$l")"
    cp "$ROOT$real" "$IR$real"; [ "$real" = "$l" ] || ln -sf "$real" "$IR$l"
  done
  mkdir -p "$IR/etc/libibverbs.d"; cp "$ROOT"/etc/libibverbs.d/rxe.driver "$IR/etc/libibverbs.d/"
  for b in $BINS; do rm -f "$IR$b"; cp "$ROOT$b" "$IR$b"; done
  for l in $(inch sh -c "for b in $BINS; do ldd \$b; done" | awk '/=>/ {print $3} /^\t\/lib64/ {print $1}' | sort -u); do
    real=$(inch readlink -f "$l")
    mkdir -p "$IR$(dirname "$real")"; cp "$ROOT$real" "$IR$real"
    # merged /usr: normalise /lib/... to /usr/lib/... or the soname link overwrites the library
    case $l in /lib/*|/lib64/*) l=/usr$l ;; esac
    [ "$real" = "$l" ] || { mkdir -p "$IR$(dirname "$l")"; ln -sf "$real" "$IR$l"; }
  done
  cp -a "$ROOT/etc/ld.so.conf" "$ROOT/etc/ld.so.conf.d" "$IR/etc/" 2>/dev/null || true
  inch ldconfig -r "$B" 2>/dev/null || true
  [ -d "$ROOT/etc/nvme" ] && cp -a "$ROOT/etc/nvme" "$IR/etc/"
  mkdir -p "$IR/usr/share/misc"; cp -L "$ROOT/usr/share/misc/pci.ids" "$IR/usr/share/misc/" 2>/dev/null || true
  printf 'root:x:0:0:root:/root:/bin/sh\n' > "$IR/etc/passwd"; printf 'root:x:0:\n' > "$IR/etc/group"
  MD=/opt/guest-kernel/usr/lib/modules/$KVER
  mkdir -p "$IR/usr/lib/modules/$KVER"
  for f in modules.builtin modules.builtin.modinfo modules.order; do cp "$ROOT$MD/$f" "$IR/usr/lib/modules/$KVER/"; done
  for f in $(for m in $MODULES; do inch modprobe -d /opt/guest-kernel/usr -S "$KVER" --show-depends "$m" 2>/dev/null | awk '$1=="insmod"{print $2}'; done | sort -u); do
    rel=${f#"$MD"/}; mkdir -p "$IR/usr/lib/modules/$KVER/$(dirname "$rel")"
    case $f in
      *.xz) inch xz -dc "$f" > "$IR/usr/lib/modules/$KVER/${rel%.xz}" ;;   # busybox modprobe: plain .ko
      *) cp "$ROOT$f" "$IR/usr/lib/modules/$KVER/$rel" ;;
    esac
  done
  inch depmod -b "$B/usr" "$KVER"
  install -m 755 "$HERE/init.sh" "$IR/init"
  install -m 755 "$HERE/net_up.sh" "$IR/usr/bin/net_up"
  inch sh -c "cd $B && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet" > "$GUEST/initramfs.cpio.tmp"
  mv "$GUEST/initramfs.cpio.tmp" "$GUEST/initramfs.cpio"
  rm -rf "$IR"
  leave
  done_step
fi

# wrappers: the chroot's QEMU through the chroot's loader, firmware from the chroot
cat > "$GUEST/qemu" <<W
#!/bin/sh
R=$ROOT
export QEMU_MODULE_DIR="\$R/usr/lib/x86_64-linux-gnu/qemu"
exec "\$R/usr/lib64/ld-linux-x86-64.so.2" --library-path "\$R/usr/lib/x86_64-linux-gnu" \\
  "\$R/usr/bin/qemu-system-x86_64" -L "\$R/usr/share/qemu" -L "\$R/usr/share/seabios" "\$@"
W
cat > "$GUEST/qemu-img" <<W
#!/bin/sh
R=$ROOT
exec "\$R/usr/lib64/ld-linux-x86-64.so.2" --library-path "\$R/usr/lib/x86_64-linux-gnu" "\$R/usr/bin/qemu-img" "\$@"
W
chmod +x "$GUEST/qemu" "$GUEST/qemu-img"
echo "vnvme harness: ready in $H ($(( $(now) - T0 )) s)" >&2
