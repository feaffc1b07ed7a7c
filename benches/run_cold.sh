#!/bin/sh
# The cold-cache runs of issue 7, one server after the other (each bench drops the page cache
# before every contender run; root needed). Arguments go to every bench, e.g.:
#   sh benches/run_cold.sh --size 1G --size 4G --reps 3
#   sh benches/run_cold.sh --size 1G --reps 3          # when 4 GiB does not fit the time
# Results: benches/results/{s3,s3-seaweedfs,http}-cold-DATE.json; then regenerate the doc:
#   python benches/bench_s3.py --report benches/results/s3-cold-DATE.json --update-doc docs/BENCHMARKS.md
set -eu
cd "$(dirname "$0")/.."
d=$(date +%F)
python3 benches/bench_s3.py --server rclone "$@" --out "benches/results/s3-cold-$d.json"
python3 benches/bench_http.py "$@" --out "benches/results/http-cold-$d.json"
python3 benches/bench_s3.py --server seaweedfs "$@" --out "benches/results/s3-seaweedfs-cold-$d.json"
