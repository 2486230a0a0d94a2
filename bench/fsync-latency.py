"""How long this machine's disk takes to make one small write durable: the least any durable
answer waits. Writes 4 KiB at a time through a file in DIRECTORY, each followed by fdatasync (as a
write-ahead log's commit is), and prints the median and 99th percentile in milliseconds. The file
is written out and synced first, so each timed write overwrites blocks the file already has, as
SQLite's log does once a checkpoint has restarted it (a write that grows a file also has to
commit the file system's journal, which is slower and not the steady state).

    python3 bench/fsync-latency.py DIRECTORY [count]
"""

import os
import statistics
import sys
import tempfile
import time


def main() -> None:
    directory = sys.argv[1]
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    block = os.urandom(4096)
    times = []
    with tempfile.NamedTemporaryFile(dir=directory) as log:
        os.pwrite(log.fileno(), block * count, 0)
        os.fsync(log.fileno())
        for i in range(count):
            started = time.perf_counter()
            os.pwrite(log.fileno(), block, i * len(block))
            os.fdatasync(log.fileno())
            times.append(time.perf_counter() - started)
    times.sort()
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
    print(f"{statistics.median(times) * 1000:.3f} {p99 * 1000:.3f}")


if __name__ == "__main__":
    main()
