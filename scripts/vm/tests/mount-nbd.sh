# Direct and managed mounts of a remote (an r3map server in the VM) through the NBD frontend,
# four connections each: data written through the device reaches the remote, and ext4 made on a
# managed mount is intact when the remote is mounted again directly.
r3map serve memory:128MiB --unix /tmp/remote.sock > /tmp/serve.out 2> /tmp/serve.log &
server=$!
# The ready line comes once the socket listens (its file exists a moment before).
wait-until 60 grep -q '^serving ' /tmp/serve.out
remote='r3map+unix:///default?socket=/tmp/remote.sock'

mount_nbd() { # $1: output file; the rest: extra flags
  out=$1; shift
  r3map mount "$remote" --nbd --nbd-connections 4 "$@" > "$out" 2>&1 &
  wait-until 60 grep -q '^mounted ' "$out"
  cat "$out"
}
device_of() { sed -n 's/^mounted .* at \(\/dev\/nbd[0-9]*\) in .*/\1/p' "$1"; }

# Direct: a write through the device, read back, then ext4 on a managed mount.
mount_nbd /tmp/direct.out
direct=$!
dev=$(device_of /tmp/direct.out)
test -b "$dev"
dd if=/dev/urandom of=/tmp/a bs=1M count=8 2> /dev/null
dd if=/tmp/a of="$dev" bs=1M oflag=direct 2> /dev/null
dd if="$dev" of=/tmp/b bs=1M count=8 iflag=direct 2> /dev/null
cmp /tmp/a /tmp/b
kill -INT "$direct"
wait "$direct"

mount_nbd /tmp/managed.out --managed --push-interval 1s
managed=$!
dev=$(device_of /tmp/managed.out)
test -b "$dev"
# What the direct mount wrote is there (pulled from the remote).
dd if="$dev" of=/tmp/c bs=1M count=8 iflag=direct 2> /dev/null
cmp /tmp/a /tmp/c
mkfs.ext4 -q -F "$dev"
mount -t ext4 "$dev" /mnt
cp /tmp/a /mnt/data
echo hello > /mnt/hello
umount /mnt
kill -INT "$managed"
wait "$managed"

# The remote has it all: a direct mount sees the file system intact.
mount_nbd /tmp/again.out
again=$!
dev=$(device_of /tmp/again.out)
mount -t ext4 "$dev" /mnt
cmp /tmp/a /mnt/data
grep -q hello /mnt/hello
umount /mnt
kill -INT "$again"
wait "$again"
kill "$server"
wait "$server" || true
