# The kernel's NBD client on four connections to r3map's NBD server (multi-conn), used as swap:
# mkswap and swapon on the device, the swap shows in /proc/swaps and free, then swapoff and
# disconnect leave nothing behind.
r3map serve memory:256MiB --nbd 127.0.0.1:10809 --insecure-plaintext --metrics 127.0.0.1:9100 \
  > /tmp/serve.log 2>&1 &
server=$!
wait-until 20 nbd-client -l 127.0.0.1 10809
nbd-client 127.0.0.1 10809 /dev/nbd1 -N default -b 4096 -C 4
# Four connections open on the server's side (the gauge of its Prometheus metrics).
open=$(wget -qO- http://127.0.0.1:9100/metrics | awk '/^r3map_nbd_connections / {print $2}')
test "$open" = 4
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
