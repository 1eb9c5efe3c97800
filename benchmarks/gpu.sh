#!/bin/sh
# One command for a GPU machine: environment, train throughput (eager, compiled, the reference loop), a full
# real-data epoch, a fractional-GPU study and a 20-epoch accuracy run; one JSON summary at the end.
# See benchmarks/gpu.py. --smoke runs every part at tiny sizes (on a CPU too).
exec python "$(dirname "$0")/gpu.py" "$@"
