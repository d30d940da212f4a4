# The kernel block device benchmark's smoke run (16 MiB, fewer samples, one netem delay); see
# kernel.sh.
trap '[ -x /sbin/tc ] && /sbin/tc qdisc del dev lo root 2> /dev/null || true' EXIT
limit=$(( $(cat /test-timeout 2> /dev/null || echo 240) - 15 ))
timeout "$limit" r3map-kernel-bench --quick
