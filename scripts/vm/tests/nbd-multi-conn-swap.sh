# The kernel's NBD client on four connections to r3map's NBD server (multi-conn), used as swap:
# mkswap and swapon on the device, the swap shows in /proc/swaps and free, then swapoff and
# disconnect leave nothing behind.
# Port 0: the server takes free ports and names them in its ready line.
r3map serve memory:256MiB --nbd 127.0.0.1:0 --insecure-plaintext --metrics 127.0.0.1:0 \
  > /tmp/serve.out 2> /tmp/serve.log &
server=$!
wait-until 60 grep -q '^serving ' /tmp/serve.out
port=$(sed -n 's/^serving .* NBD 127\.0\.0\.1:\([0-9]*\) .*/\1/p' /tmp/serve.out)
metrics=$(sed -n 's|^serving .*; metrics at http://\([^/]*\)/metrics.*|\1|p' /tmp/serve.out)
nbd-client 127.0.0.1 "$port" /dev/nbd1 -N default -b 4096 -C 4
# Four connections open on the server's side (the gauge of its Prometheus metrics), read until
# it says so: a connection counts from when the server's accept loop gets to it.
wait-until 60 sh -c "wget -qO- http://$metrics/metrics | grep -qx 'r3map_nbd_connections 4'"
dd if=/dev/urandom of=/tmp/a bs=1M count=32 2> /dev/null
dd if=/tmp/a of=/dev/nbd1 bs=1M oflag=direct 2> /dev/null
dd if=/dev/nbd1 of=/tmp/b bs=1M count=32 iflag=direct 2> /dev/null
cmp /tmp/a /tmp/b
mkswap /dev/nbd1 > /dev/null
swapon /dev/nbd1
grep -q '^/dev/nbd1 ' /proc/swaps
swap_kib=$(free | awk '/^Swap:/ {print $2}')
test "$swap_kib" -gt 200000
swapoff /dev/nbd1
! grep -q '^/dev/nbd1 ' /proc/swaps
nbd-client -d /dev/nbd1
kill "$server"
wait "$server" || true
