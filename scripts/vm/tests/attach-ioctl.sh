# The ioctl fallback of `r3map attach` (for kernels without the netlink interface): the first
# unused device is claimed with two sockets, data written with direct I/O reads back equal, and
# SIGINT disconnects it; a device another process holds is skipped.
r3map attach memory:64MiB --interface ioctl --connections 2 --index 6 > /tmp/held.out &
held=$!
wait-until 60 grep -q '^attached /dev/nbd6' /tmp/held.out
test -e /sys/block/nbd6/pid
r3map attach memory:64MiB --interface ioctl --connections 2 > /tmp/ioctl.out &
pid=$!
wait-until 60 grep -q '^attached /dev/nbd' /tmp/ioctl.out
cat /tmp/ioctl.out
dev=$(awk '/^attached/ {print $2}' /tmp/ioctl.out)
test -b "$dev"
test "$dev" != /dev/nbd6
name=$(basename "$dev")
test "$(cat /sys/block/$name/size)" = 131072
test -e "/sys/block/$name/pid"
dd if=/dev/urandom of=/tmp/a bs=1M count=16 2> /dev/null
dd if=/tmp/a of="$dev" bs=1M oflag=direct 2> /dev/null
dd if="$dev" of=/tmp/b bs=1M count=16 iflag=direct 2> /dev/null
cmp /tmp/a /tmp/b
kill -INT "$pid"
wait "$pid"
grep -q "^detached $dev" /tmp/ioctl.out
test ! -e "/sys/block/$name/pid"
test "$(cat /sys/block/$name/size)" = 0
kill -INT "$held"
wait "$held"
test ! -e /sys/block/nbd6/pid
