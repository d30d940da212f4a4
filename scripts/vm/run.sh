#!/usr/bin/env bash
# Boots Debian's own kernel under QEMU's software emulation and runs kernel-path tests inside it
# (this host kernel has no nbd.ko; Debian's kernel package has). Prints one PASS/FAIL line per
# test and exits non-zero if any failed or gave no result.
#
#   bash scripts/vm/run.sh                 # every test in scripts/vm/tests
#   bash scripts/vm/run.sh nbd-client-ext4 # some of them
#
# Environment: R3MAP_VM_TESTS, a directory of test scripts to run instead of scripts/vm/tests;
# R3MAP_VM_BINS, more executables (space-separated paths) to put into the VM's /bin;
# R3MAP_VM_SHOW_OUTPUT=1 prints the output of passing tests too (benchmarks print figures);
# R3MAP_VM_TEST_TIMEOUT, seconds each test may take (240); R3MAP_VM_TIMEOUT, the whole VM (900).
#
# Nothing is installed on the host: the kernel, QEMU, busybox, cpio and nbd-client packages are
# fetched with `apt-get download` and unpacked into a cache ($R3MAP_VM_CACHE, by default
# ~/.cache/r3map/vm); QEMU runs from there. (Installing qemu-system-x86 would replace a newer
# preinstalled qemu-utils, whose qemu-io, qemu-img and qemu-nbd the NBD tests use.) The initramfs
# holds busybox, nbd.ko, the r3map, ram-ul and ram-dl binaries and the swap-check example (built
# here, stripped), the programs the tests call (the host's tc, for netem) and their shared
# libraries.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD

cache="${R3MAP_VM_CACHE:-$HOME/.cache/r3map/vm}"
mkdir -p "$cache"

# The current kernel package: its version follows Debian's updates, so it is discovered.
kernel_pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$kernel_pkg" ]; then
  apt-get update -qq
  kernel_pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
fi
tools=(qemu-system-x86 qemu-system-common qemu-system-data seabios libcapstone4 libfdt1 libslirp0
  libvdeplug2 busybox-static cpio nbd-client libnl-3-200 libnl-genl-3-200)
stamp="$cache/ready-$kernel_pkg"
if [ ! -e "$stamp" ]; then
  echo "==> fetching $kernel_pkg and the VM's tools into $cache"
  rm -rf "$cache/debs" "$cache/root" "$cache/kernel" "$cache"/ready-*
  mkdir -p "$cache/debs"
  # apt-get download as root warns that its sandbox user cannot write here; harmless. Stale
  # package lists name versions the mirror no longer has: refresh them once and retry.
  fetch() { (cd "$cache/debs" && apt-get download -q "$kernel_pkg" "${tools[@]}" 2>&1 | grep -v '^W: Download is performed unsandboxed'; exit "${PIPESTATUS[0]}"); }
  if ! fetch; then
    apt-get update -qq
    kernel_pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    stamp="$cache/ready-$kernel_pkg"
    fetch
  fi
  for deb in "$cache"/debs/*.deb; do
    case "$(basename "$deb")" in
      linux-image-*) dpkg -x "$deb" "$cache/kernel" ;;
      *) dpkg -x "$deb" "$cache/root" ;;
    esac
  done
  rm -rf "$cache/debs"
  touch "$stamp"
fi
root="$cache/root"
vmlinuz=$(ls "$cache"/kernel/boot/vmlinuz-* | head -1)
modules=$(ls -d "$cache"/kernel/lib/modules/* | head -1)

tests_dir="${R3MAP_VM_TESTS:-scripts/vm/tests}"
echo "==> building r3map, ram-ul, ram-dl and swap-check"
cargo build --quiet --locked -p r3map-cli --bin r3map --bin ram-ul --bin ram-dl --example swap-check
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
init="$work/initrd"
mkdir -p "$init"/{bin,sbin,proc,sys,dev,tmp,mnt,tests,etc,lib/modules}
# Names as on any installed system (`localhost` is ram-dl's default server).
printf '127.0.0.1 localhost\n::1 localhost\n' > "$init/etc/hosts"
echo 'hosts: files' > "$init/etc/nsswitch.conf"
cp "$root/bin/busybox" "$init/bin/"
for applet in $("$init/bin/busybox" --list); do
  [ -e "$init/bin/$applet" ] || ln -s busybox "$init/bin/$applet"
done
# `wait-until SECONDS COMMAND...`: runs COMMAND every 0.1 s until it succeeds; fails, saying what
# it waited for, when SECONDS pass first.
cat > "$init/bin/wait-until" <<'WAIT'
#!/bin/sh
limit=$(($1 * 10))
shift
i=0
until "$@" > /dev/null 2>&1; do
  i=$((i + 1))
  if [ "$i" -ge "$limit" ]; then
    echo "wait-until: gave up waiting for: $*" >&2
    exit 1
  fi
  sleep 0.1
done
WAIT
chmod +x "$init/bin/wait-until"
# Modules, in the order they are loaded (each after what it needs); nbd with 8 devices.
for m in lib/crc16.ko crypto/crc32c_generic.ko fs/mbcache.ko fs/jbd2/jbd2.ko fs/ext4/ext4.ko \
  drivers/block/loop.ko drivers/block/nbd.ko net/sched/sch_netem.ko; do
  cp "$modules/kernel/$m" "$init/lib/modules/"
  echo "$(basename "$m")" >> "$init/lib/modules/order"
done
target="${CARGO_TARGET_DIR:-$repo/target}"
progs=()
for bin in "$target/debug/r3map" "$target/debug/ram-ul" "$target/debug/ram-dl" \
  "$target/debug/examples/swap-check" ${R3MAP_VM_BINS:-}; do
  strip --strip-debug -o "$init/bin/$(basename "$bin")" "$bin"
  progs+=("$init/bin/$(basename "$bin")")
done
cp "$root/sbin/nbd-client" "$init/sbin/"
cp /sbin/mke2fs "$init/sbin/mkfs.ext4"
progs+=("$init/sbin/nbd-client" "$init/sbin/mkfs.ext4")
# iproute2's tc for netem (busybox's tc has no netem); tests that need it check for it.
if tc_bin=$(command -v tc); then
  cp "$tc_bin" "$init/sbin/tc"
  progs+=("$init/sbin/tc")
fi
# Shared libraries of every program copied, at the same paths (the loader among them).
# Libraries the host lacks come from the unpacked packages; they go to the standard paths.
unpacked_libs="$root/usr/lib/x86_64-linux-gnu:$root/lib/x86_64-linux-gnu"
for prog in "${progs[@]}"; do
  if LD_LIBRARY_PATH="$unpacked_libs" ldd "$prog" | grep -q 'not found'; then
    echo "missing libraries for $prog:" >&2
    LD_LIBRARY_PATH="$unpacked_libs" ldd "$prog" | grep 'not found' >&2
    exit 1
  fi
  LD_LIBRARY_PATH="$unpacked_libs" ldd "$prog" | awk '/=> \// {print $3} /^\t\/lib/ {print $1}' |
    while read -r lib; do
      dest="${lib#"$root"}"
      mkdir -p "$init$(dirname "$dest")"
      cp -L "$lib" "$init$dest"
    done
done

# The tests to run.
if [ $# -eq 0 ]; then
  mapfile -t names < <(cd "$tests_dir" && ls ./*.sh | sed 's|^\./||; s|\.sh$||')
else
  names=("$@")
fi
for n in "${names[@]}"; do
  cp "$tests_dir/$n.sh" "$init/tests/"
done

cat > "$init/init" <<'INIT'
#!/bin/sh
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/shm && mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup
ip link set lo up
while read -r m; do
  case "$m" in
    nbd.ko) insmod "/lib/modules/$m" nbds_max=8 ;;
    *) insmod "/lib/modules/$m" ;;
  esac || echo "R3MAP-VM: cannot load $m"
done < /lib/modules/order
for t in /tests/*.sh; do
  name=$(basename "$t" .sh)
  echo "R3MAP-VM: START $name"
  # Each test is a session of its own: whatever it leaves running (a failed or timed-out test's
  # servers) is killed with it, so the next test does not meet its processes or their ports.
  if timeout "$(cat /test-timeout)" setsid sh -c 'echo $$ > /tmp/test.pgid; exec sh -e "$0"' "$t" \
    > "/tmp/$name.log" 2>&1; then
    echo "R3MAP-VM: PASS $name"
    [ -e /show-output ] && sed 's/^/    /' "/tmp/$name.log"
  else
    echo "R3MAP-VM: FAIL $name (exit $?); its output:"
    sed 's/^/    /' "/tmp/$name.log" | tail -40
  fi
  kill -s KILL "-$(cat /tmp/test.pgid)" 2> /dev/null
done
echo "R3MAP-VM: DONE"
poweroff -f
INIT
chmod +x "$init/init"
[ "${R3MAP_VM_SHOW_OUTPUT:-0}" = 1 ] && touch "$init/show-output"
echo "${R3MAP_VM_TEST_TIMEOUT:-240}" > "$init/test-timeout"
(cd "$init" && find . | "$root/bin/cpio" -o -H newc --quiet | gzip -1 > "$work/initrd.gz")

echo "==> booting $(basename "$vmlinuz") under QEMU (software emulation) for: ${names[*]}"
log="$work/console.log"
timeout "${R3MAP_VM_TIMEOUT:-900}" env LD_LIBRARY_PATH="$root/usr/lib/x86_64-linux-gnu" "$root/usr/bin/qemu-system-x86_64" \
  -L "$root/usr/share/seabios" -L "$root/usr/share/qemu" -accel tcg -cpu max -smp 2 -m 2048 \
  -nographic -no-reboot -nic none -kernel "$vmlinuz" -initrd "$work/initrd.gz" \
  -append "console=ttyS0 quiet panic=-1" > "$log" 2>&1 || true
tr -d '\r' < "$log" | grep -a -E '^R3MAP-VM: (PASS|FAIL)|^    ' || true

failed=0
for n in "${names[@]}"; do
  if ! tr -d '\r' < "$log" | grep -a -q "^R3MAP-VM: PASS $n$"; then
    if ! tr -d '\r' < "$log" | grep -a -q "^R3MAP-VM: FAIL $n"; then
      echo "R3MAP-VM: FAIL $n (no result: the VM stopped before it ended)"
    fi
    failed=1
  fi
done
if ! tr -d '\r' < "$log" | grep -a -q '^R3MAP-VM: DONE'; then
  echo "the VM did not finish; the end of its console:"
  tr -d '\r' < "$log" | tail -30
  failed=1
fi
exit $failed
