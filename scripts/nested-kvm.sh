#!/bin/sh
# Run pykvmm's tests on mainline KVM (kvm_amd) in a QEMU TCG VM with emulated AMD SVM.
#
#   scripts/nested-kvm.sh [PYTEST ARGS...]      default: the whole suite (tests/)
#
# Everything comes from Debian packages: qemu-system-x86, busybox-static, cpio, kmod, xz-utils
# and zstd are installed with apt-get if missing; Debian's newest linux-image-*-amd64-unsigned
# is downloaded (not installed) and unpacked. The VM boots that kernel with a busybox
# initramfs, loads kvm and kvm_amd, mounts this machine's / read-only over 9p with a tmpfs
# overlay (so the checkout is writable inside and nothing leaks out), and runs pytest in the
# checkout. It prints pytest's result line; the logs stay in the run directory it names:
#   pytest.log   pytest's output          console.log  the VM's serial console (kernel, init)
#   failures.log each failure's report as it happens (pytest.log has them only at the end)
#   status       pytest's exit status     cmdline      what ran
# Exit status: pytest's, or 124 when the watchdog ended QEMU, 2 for bad use, 5 when the VM
# did not get as far as running pytest.
#
# Environment: KUT_DIR (kvm-unit-tests for the kut tests, passed on; default: the checkout's
# ../shared/kvm-unit-tests), NESTED_WORK (downloads, kernel, runs; default /var/tmp/pykvmm-nested),
# NESTED_TIMEOUT (watchdog, seconds; default 7200), NESTED_SMP (vCPUs; default 1: two showed
# soft lockups under TCG), NESTED_MEM (default 2G), NESTED_KERNEL (a package name instead of
# the newest).
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${NESTED_WORK:-/var/tmp/pykvmm-nested}
TIMEOUT=${NESTED_TIMEOUT:-7200}
SMP=${NESTED_SMP:-1}
MEM=${NESTED_MEM:-2G}
MODULES="kvm_amd 9pnet_virtio 9p overlay virtio_pci"

say() { echo "nested-kvm: $*" >&2; }
die() { say "$*"; exit "${2:-5}"; }

case "${1:-}" in -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0;; esac
[ "$(id -u)" = 0 ] || die "must run as root (apt-get, and QEMU's 9p export of /)" 2

# ---- host packages ------------------------------------------------------------------------
need=""
for pair in qemu-system-x86_64:qemu-system-x86 busybox:busybox-static cpio:cpio depmod:kmod \
            xz:xz-utils zstd:zstd; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need="$need ${pair#*:}"
done
# busybox must be the static one: it runs alone in the initramfs
[ -z "$need" ] && ! dpkg -s busybox-static >/dev/null 2>&1 && need="busybox-static"
if [ -n "$need" ]; then
    say "installing$need"
    apt-get update -qq >/dev/null || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >/dev/null \
        || die "apt-get install$need failed"
fi
BUSYBOX=$(command -v busybox)

# ---- the kernel: Debian's newest amd64 image, unpacked --------------------------------------
mkdir -p "$WORK"
newest_kernel() {
    apt-cache search --names-only '^linux-image-[0-9.]+-[0-9]+-amd64-unsigned$' 2>/dev/null \
        | cut -d' ' -f1 | sort -V | tail -n 1
}
PKG=${NESTED_KERNEL:-$(newest_kernel)}
if [ -z "$PKG" ]; then
    apt-get update -qq >/dev/null || true
    PKG=$(newest_kernel)
fi
[ -n "$PKG" ] || die "apt offers no linux-image-*-amd64-unsigned package"
KDIR="$WORK/$PKG"
if [ ! -f "$KDIR/.unpacked" ]; then
    say "downloading and unpacking $PKG"
    rm -rf "$KDIR" && mkdir -p "$KDIR/deb"
    (cd "$KDIR/deb" && apt-get download -qq -o APT::Sandbox::User=root "$PKG" >/dev/null) || die "apt-get download $PKG failed"
    dpkg-deb -x "$KDIR"/deb/*.deb "$KDIR/root"
    touch "$KDIR/.unpacked"
fi
KVER=$(ls "$KDIR/root/lib/modules" | head -n 1)
VMLINUZ="$KDIR/root/boot/vmlinuz-$KVER"
[ -f "$VMLINUZ" ] || die "$PKG has no /boot/vmlinuz-$KVER"

# ---- initramfs: busybox, the modules in load order, /init -----------------------------------
INITRD="$KDIR/initramfs.cpio.gz"
if [ ! -f "$INITRD" ] || [ "$0" -nt "$INITRD" ]; then
    say "building the initramfs for $KVER"
    depmod -b "$KDIR/root" "$KVER"
    IR="$KDIR/initramfs"
    rm -rf "$IR" && mkdir -p "$IR/bin" "$IR/lib/modules" "$IR/proc" "$IR/sys" "$IR/dev" \
        "$IR/lower" "$IR/upper" "$IR/newroot" "$IR/results"
    cp "$BUSYBOX" "$IR/bin/busybox"
    : > "$IR/modules.order"
    for m in $MODULES; do
        modprobe -d "$KDIR/root" -S "$KVER" --show-depends "$m" | while read -r kind path _; do
            [ "$kind" = insmod ] || continue             # "builtin X": nothing to load
            base=$(basename "$path"); ko=${base%.xz}; ko=${ko%.zst}
            grep -qx "$ko" "$IR/modules.order" && continue
            case "$base" in
                *.xz) xz -dc "$path" > "$IR/lib/modules/$ko" ;;
                *.zst) zstd -qdc "$path" > "$IR/lib/modules/$ko" ;;
                *) cp "$path" "$IR/lib/modules/$ko" ;;
            esac
            echo "$ko" >> "$IR/modules.order"
        done
    done
    cat > "$IR/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for ko in $(cat /modules.order); do
    insmod "/lib/modules/$ko" || echo "init: insmod $ko failed"
done
ip link set lo up
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /lower
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 results /results
mount -t tmpfs -o size=75% tmpfs /upper
mkdir -p /upper/rw /upper/work
mount -t overlay -o lowerdir=/lower,upperdir=/upper/rw,workdir=/upper/work overlay /newroot
for d in proc sys dev; do mount --bind /$d /newroot/$d; done
mount -t tmpfs tmpfs /newroot/tmp
mkdir -p /newroot/run/nested-results && mount --bind /results /newroot/run/nested-results
if [ -c /dev/kvm ]; then
    echo "init: /dev/kvm is there ($(cat /sys/module/kvm_amd/parameters/nested 2>/dev/null | sed 's/^/nested=/'))"
    chroot /newroot /bin/sh /run/nested-results/job.sh
else
    echo "init: no /dev/kvm: kvm_amd did not load"
fi
sync
poweroff -f
EOF
    chmod +x "$IR/init"
    (cd "$IR" && find . | cpio -o -H newc --quiet | gzip -1 > "$INITRD.tmp") && mv "$INITRD.tmp" "$INITRD"
fi

# ---- the run ---------------------------------------------------------------------------------
[ $# -gt 0 ] || set -- tests/
make -s -C "$ROOT" setup guests >/dev/null || die "make setup guests failed in $ROOT"
# Bytecode compiled here (seconds) is read through 9p there: every `python -m pykvmm` a test
# starts in the VM would otherwise compile pykvmm again under TCG (several seconds each).
"$ROOT/.venv/bin/python" -m compileall -q "$ROOT/pykvmm" "$ROOT/tests" "$ROOT/scripts" >/dev/null \
    || die "python -m compileall failed in $ROOT"
RUN="$WORK/runs/$(date -u +%Y%m%dT%H%M%S)-$$"
mkdir -p "$RUN"
printf '%s\n' "$*" > "$RUN/cmdline"
{
    echo "cd '$ROOT' || exit 5"
    echo "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp LANG=C.UTF-8"
    echo "export PYKVMM_NESTED=1 PYKVMM_FAILURE_LOG=/run/nested-results/failures.log"
    # the VM sees this machine's / at the same paths: a KUT_DIR given here is valid there
    [ -n "${KUT_DIR:-}" ] && echo "export KUT_DIR='$KUT_DIR'"
    printf '.venv/bin/python -m pytest -p no:cacheprovider'
    for a in "$@"; do printf " '%s'" "$(printf '%s' "$a" | sed "s/'/'\\\\''/g")"; done
    echo " > /run/nested-results/pytest.log 2>&1"
    echo 'echo $? > /run/nested-results/status'
} > "$RUN/job.sh"

say "$PKG in QEMU TCG (-cpu EPYC,+svm, $SMP vCPU, $MEM), watchdog ${TIMEOUT}s; logs in $RUN"
set +e
timeout -k 30 "$TIMEOUT" qemu-system-x86_64 -accel tcg,thread=multi -cpu EPYC,+svm,+npt,+nrip-save \
    -m "$MEM" -smp "$SMP" -display none -monitor none -serial "file:$RUN/console.log" -no-reboot \
    -kernel "$VMLINUZ" -initrd "$INITRD" \
    -append "console=ttyS0 rdinit=/init panic=-1 quiet" \
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
    -virtfs "local,path=$RUN,mount_tag=results,security_model=none,multidevs=remap" \
    > "$RUN/qemu.log" 2>&1
qemu=$?
set -e
if [ "$qemu" = 124 ] || [ "$qemu" = 137 ]; then
    say "watchdog: QEMU still ran after ${TIMEOUT}s and was ended; logs in $RUN"
    [ -f "$RUN/pytest.log" ] && tail -n 5 "$RUN/pytest.log" >&2
    exit 124
fi
if [ ! -f "$RUN/status" ]; then
    say "the VM ended (QEMU status $qemu) without running pytest to the end; see $RUN/console.log:"
    tail -n 15 "$RUN/console.log" >&2
    exit 5
fi
grep -E '(passed|failed|error|skipped|deselected|no tests ran)' "$RUN/pytest.log" | tail -n 1
say "pytest exit status $(cat "$RUN/status"); logs in $RUN"
exit "$(cat "$RUN/status")"
