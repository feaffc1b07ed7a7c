"""atheris driver for the targets in fuzz/targets.py.

    python fuzz/fuzz_parsers.py TARGET [CORPUS_DIR] [libFuzzer options, e.g. -max_total_time=60]
    python fuzz/fuzz_parsers.py --list

vmstore's modules are instrumented for coverage, so the fuzzer steers towards new branches
of the parsers. CORPUS_DIR (a fresh temporary one if not given) is seeded with the target's
seeds and grows with the inputs that found new coverage. A failing input is written as
``crash-*`` to ``-artifact_prefix`` (default: the current directory) and the process exits
non-zero; replay it with ``python fuzz/fuzz_parsers.py TARGET crash-...``.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

with atheris.instrument_imports(include=["vmstore", "targets"]):
    import targets


def _seed(directory: str, name: str) -> None:
    os.makedirs(directory, exist_ok=True)
    for seed in targets.SEEDS.get(name, []):
        path = os.path.join(directory, "seed-" + hashlib.sha256(seed).hexdigest()[:16])
        if not os.path.exists(path):
            with open(path, "wb") as handle:
                handle.write(seed)


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] in ("-h", "--help", "--list"):
        print("targets:", " ".join(targets.TARGETS))
        raise SystemExit(0 if len(argv) >= 2 else 2)
    name = argv[1]
    if name not in targets.TARGETS:
        raise SystemExit(f"unknown target {name!r}; targets: {' '.join(targets.TARGETS)}")
    rest = argv[2:]
    paths = [arg for arg in rest if not arg.startswith("-")]
    if not paths:
        corpus = tempfile.mkdtemp(prefix=f"vmstore-fuzz-{name}-")
        rest = [corpus, *rest]
        paths = [corpus]
    if os.path.isdir(paths[0]) or not os.path.exists(paths[0]):
        _seed(paths[0], name)
    targets.workspace()  # set up once, outside the timed runs
    atheris.Setup([argv[0], *rest], targets.TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
