# r3map's NBD server (in the VM) used by the kernel's own NBD client (nbd-client, over netlink):
# a direct-I/O write read back equal, then ext4 made, mounted, written, remounted, intact.
# Port 0: the server takes a free port and names it in its ready line.
r3map serve memory:128MiB --nbd 127.0.0.1:0 --insecure-plaintext > /tmp/serve.out 2> /tmp/serve.log &
server=$!
wait-until 60 grep -q '^serving ' /tmp/serve.out
port=$(sed -n 's/^serving .* NBD 127\.0\.0\.1:\([0-9]*\) .*/\1/p' /tmp/serve.out)
nbd-client 127.0.0.1 "$port" /dev/nbd0 -N default -b 4096
dd if=/dev/urandom of=/tmp/a bs=1M count=16 2> /dev/null
dd if=/tmp/a of=/dev/nbd0 bs=1M oflag=direct 2> /dev/null
dd if=/dev/nbd0 of=/tmp/b bs=1M count=16 iflag=direct 2> /dev/null
cmp /tmp/a /tmp/b
mkfs.ext4 -q -F /dev/nbd0
mount -t ext4 /dev/nbd0 /mnt
dd if=/tmp/a of=/mnt/data bs=1M 2> /dev/null
echo hello > /mnt/hello
umount /mnt
mount -t ext4 /dev/nbd0 /mnt
cmp /tmp/a /mnt/data
grep -q hello /mnt/hello
umount /mnt
nbd-client -d /dev/nbd0
kill "$server"
wait "$server" || true
