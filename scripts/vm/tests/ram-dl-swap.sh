# ram-ul and ram-dl over the VM's loopback: ram-dl attaches the server's memory as a kernel NBD
# device and makes it swap (free shows it); a process whose memory cgroup holds less than it
# fills swaps through it and gets its data back; SIGINT takes the swap off and removes the device.
# Their standard error goes to this test's output. ram-ul listens on ram-dl's default server
# address (nothing else runs in this VM); its metrics on a port it picks and names.
ram-ul --backend memory --size 256MiB --addr 127.0.0.1:1337 --insecure-plaintext --mlock \
  --metrics 127.0.0.1:0 > /tmp/ul.out &
ul=$!
wait-until 60 grep -q '^serving ' /tmp/ul.out
metrics=$(sed -n 's|^serving .*; metrics at http://\([^/]*\)/metrics.*|\1|p' /tmp/ul.out)
swap_before=$(free | awk '/^Swap:/ {print $2}')
ram-dl --insecure-plaintext > /tmp/dl.out &
dl=$!
wait-until 120 grep -q '^swap on ' /tmp/dl.out
cat /tmp/dl.out
# The kernel NBD path was taken (nbd.ko is loaded here), and said so.
grep -q '^/dev/nbd[0-9]*: 256.0 MiB from localhost:1337 (kernel NBD, 4 connections)' /tmp/dl.out
dev=$(sed -n 's/^swap on \([^:]*\):.*/\1/p' /tmp/dl.out)
name=$(basename "$dev")
grep -q "^$dev " /proc/swaps
swap_after=$(free | awk '/^Swap:/ {print $2}')
test $((swap_after - swap_before)) -ge 262000
# ram-dl locked its memory.
grep -q '^VmLck:.*[1-9]' "/proc/$dl/status"

# 96 MiB filled and checked by a process limited to 32 MiB (kept small: software emulation is slow).
echo +memory > /sys/fs/cgroup/cgroup.subtree_control
mkdir /sys/fs/cgroup/swapper
echo $((32 * 1024 * 1024)) > /sys/fs/cgroup/swapper/memory.max
sh -c 'echo $$ > /sys/fs/cgroup/swapper/cgroup.procs && exec swap-check 96 1' > /tmp/check.out
cat /tmp/check.out
grep -q '^swap-check: OK' /tmp/check.out
peak=$(sed -n 's/^swap-check: peak swapped out: \([0-9]*\) KiB/\1/p' /tmp/check.out)
test "$peak" -gt 32768
rmdir /sys/fs/cgroup/swapper
# The pages went to ram-ul and came back from it.
read_bytes=$(wget -qO- "http://$metrics/metrics" | awk '/^r3map_server_bytes_total\{direction="read"\}/ {print $2}')
test "${read_bytes%.*}" -gt $((32 * 1024 * 1024))

# SIGINT: swapoff, then the device is disconnected and ram-dl exits cleanly.
kill -INT "$dl"
wait "$dl"
cat /tmp/dl.out
grep -q "^removed the swap and $dev" /tmp/dl.out
! grep -q "^$dev " /proc/swaps
test "$(free | awk '/^Swap:/ {print $2}')" = "$swap_before"
test ! -e "/sys/block/$name/pid"
kill -INT "$ul"
wait "$ul"
