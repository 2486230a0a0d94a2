# Sourced by the benchmark scripts: the machine's CPU over a run, from two /proc/stat "cpu"
# lines: busy, idle, and stolen by the host (a virtual machine's neighbours). Figures from a run
# with much stolen are not comparable with other runs'.
#   before=$(cpu_now); ...; cpu_use "$before" "$(cpu_now)"
cpu_now() { head -1 /proc/stat; }

cpu_use() {
  awk -v a="$1" -v b="$2" 'BEGIN {
    split(a, x); split(b, y); total = 0
    for (i = 2; i <= 9; i++) { d[i] = y[i] - x[i]; total += d[i] }
    if (total <= 0) exit
    printf "cpu: busy %d%%, idle %d%%, stolen %d%%", 100 * (total - d[5] - d[6] - d[9]) / total,
      100 * (d[5] + d[6]) / total, 100 * d[9] / total
  }'
}

# Run a command, then print the CPU over it on a line of its own.
with_cpu() {
  local before
  before=$(cpu_now)
  "$@"
  echo "   $(cpu_use "$before" "$(cpu_now)")"
}
