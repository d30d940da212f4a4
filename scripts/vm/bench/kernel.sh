# The kernel block device benchmark (crates/mount/benches/kernel.rs), full run: r3map's NBD
# devices next to a loop device, and a managed NBD mount of a server on 127.0.0.1 with netem
# delays on lo. scripts/bench-vm.sh puts the benchmark into /bin as r3map-kernel-bench.
# The benchmark removes its qdisc itself; this trap covers a benchmark that was killed.
trap '[ -x /sbin/tc ] && /sbin/tc qdisc del dev lo root 2> /dev/null || true' EXIT
# Ends before the VM's limit for the test, so that the trap runs and the output is printed.
limit=$(( $(cat /test-timeout 2> /dev/null || echo 240) - 15 ))
timeout "$limit" r3map-kernel-bench
