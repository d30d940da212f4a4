# r3map's own kernel attach (generic netlink, 4 socketpairs to an in-process server): the device
# appears, data written with direct I/O reads back equal, ext4 survives a remount, and SIGINT
# disconnects the device and ends the process; `r3map detach` cleans up after a killed process.
r3map attach memory:128MiB --connections 4 > /tmp/attach.out 2> /tmp/attach.err &
pid=$!
wait-until 60 grep -q '^attached /dev/nbd' /tmp/attach.out
cat /tmp/attach.out
dev=$(awk '/^attached/ {print $2}' /tmp/attach.out)
test -b "$dev"
name=$(basename "$dev")
test "$(cat /sys/block/$name/size)" = 262144
dd if=/dev/urandom of=/tmp/a bs=1M count=16 2> /dev/null
dd if=/tmp/a of="$dev" bs=1M oflag=direct 2> /dev/null
dd if="$dev" of=/tmp/b bs=1M count=16 iflag=direct 2> /dev/null
cmp /tmp/a /tmp/b
mkfs.ext4 -q -F "$dev"
mount -t ext4 "$dev" /mnt
cp /tmp/a /mnt/data
umount /mnt
mount -t ext4 "$dev" /mnt
cmp /tmp/a /mnt/data
umount /mnt
kill -INT "$pid"
wait "$pid"
grep -q "^detached $dev" /tmp/attach.out
# Disconnected: the kernel no longer has a server for it.
test ! -e "/sys/block/$name/pid"

# A process killed outright leaves its device connected; detach removes it.
r3map attach memory:8MiB --connections 1 --index 5 > /tmp/attach2.out 2>&1 &
pid=$!
wait-until 60 grep -q '^attached /dev/nbd5' /tmp/attach2.out
test -e /sys/block/nbd5/pid
kill -KILL "$pid"
wait "$pid" || true
r3map detach /dev/nbd5
wait-until 60 test ! -e /sys/block/nbd5/pid
