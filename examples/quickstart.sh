#!/usr/bin/env bash
# Install vmstore into a virtual environment and run a real export/import through the NFS
# backend, with a plain local directory standing in for the mounted share:
#
#   bash examples/quickstart.sh
#
# Makes a small qcow2 (qemu-img, if installed; otherwise a raw file of random bytes), uploads
# it with metadata, shows its stored metadata, downloads it back with the checksum pinned and
# checks that both ends hash the same. Leaves nothing behind but the virtual environment.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
# Toolchains installed per user (rustup, pyenv) are not always on a non-login shell's PATH.
for dir in "$HOME/.cargo/bin" "$HOME/.pyenv/shims"; do
    if [[ -d $dir && ":$PATH:" != *":$dir:"* ]]; then PATH="$dir:$PATH"; fi
done
PYTHON=${PYTHON:-python3}
venv=${VMSTORE_VENV:-.venv}
die() {
    printf 'quickstart: %s\n' "$*" >&2
    exit 1
}

# What the build needs and a stock Debian 12 / Ubuntu 24.04 may lack, installed with apt:
# the venv module (Debian ships it apart from Python) and a C linker for the Rust build.
command -v "$PYTHON" >/dev/null || die "no $PYTHON on PATH: install Python >= 3.11"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$PYTHON is older than 3.11"
pyver=$("$PYTHON" -c 'import sys; print(*sys.version_info[:2], sep=".")')
base=$("$PYTHON" -c 'import sys; print(sys.base_prefix)')
packages=()
if [[ $base == /usr ]] &&
    ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    packages+=("python$pyver-venv")
fi
if ! command -v cc >/dev/null || ! printf 'int main(void) { return 0; }\n' |
    cc -x c - -o /dev/null 2>/dev/null; then
    packages+=(gcc libc6-dev)
fi
if ((${#packages[@]})); then
    command -v apt-get >/dev/null || die "missing: ${packages[*]}; install them, then run this again"
    sudo=""
    if [[ $(id -u) != 0 ]]; then sudo="sudo"; fi
    echo "== apt-get install ${packages[*]}"
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi
# Debian's packaged rustc is older than the crate needs: rustup's toolchain builds it.
rust_needed=$(sed -n 's/^rust-version *= *"\(.*\)"/\1/p' Cargo.toml)
rust_found=$(rustc --version 2>/dev/null | cut -d' ' -f2 || true)
if [[ -z $rust_found || $(printf '%s\n%s\n' "$rust_needed" "$rust_found" | sort -V | head -n1) != "$rust_needed" ]]; then
    if ! command -v rustup >/dev/null; then
        die "the Rust core needs rustc >= $rust_needed, found ${rust_found:-none} $(command -v rustc || true).
Debian's and Ubuntu's packaged rustc is too old; install rustup's toolchain:
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
then run this again (it finds ~/.cargo/bin by itself)"
    fi
    echo "== rustc ${rust_found:-missing} is older than $rust_needed: rustup toolchain install stable"
    rustup toolchain install stable --profile minimal
    export RUSTUP_TOOLCHAIN=stable # for this script only; the default stays as it was
fi

# Never the system interpreter: Debian's and Ubuntu's Python is externally managed (PEP 668).
echo "== installing vmstore into $venv (builds the Rust core; the first time takes a few minutes)"
if [[ ! -x $venv/bin/python ]] ||
    [[ $("$venv/bin/python" -c 'import sys; print(sys.base_prefix)' 2>/dev/null) != "$base" ]]; then
    "$PYTHON" -m venv --clear "$venv" # new, or made from another interpreter: start afresh
fi
"$venv/bin/python" -m pip install -q .
vmstore="$venv/bin/vmstore"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/share"
disk="$work/disk.qcow2"
if command -v qemu-img >/dev/null && command -v qemu-io >/dev/null; then
    qemu-img create -q -f qcow2 "$disk" 256M
    qemu-io -c 'write -P 0xab 0 8M' -c 'write -P 0xcd 128M 8M' "$disk" >/dev/null
else
    disk="$work/disk.raw"
    dd if=/dev/urandom of="$disk" bs=1M count=16 status=none
fi

# The share: on a real host this is the NFS mount every node of the cluster sees.
export VMSTORE_TYPE=nfs VMSTORE_ENDPOINT="$work/share"
url="nfs://vm-exports/demo-vm/$(basename "$disk")"

echo "== export: vmstore upload $disk $url"
"$vmstore" upload "$disk" "$url" --metadata vm-name=demo-vm --json
echo "== stored: vmstore stat $url"
"$vmstore" stat "$url"

sum=$("$vmstore" checksum "$disk" | cut -d' ' -f1)
echo "== import: vmstore download $url (expecting sha256 $sum)"
"$vmstore" download "$url" "$work/imported" --expected-checksum "$sum" --json

if [[ $(sha256sum "$work/imported" | cut -d' ' -f1) != "$sum" ]]; then
    echo "quickstart FAILED: the imported disk differs from the exported one" >&2
    exit 1
fi
if command -v qemu-img >/dev/null && [[ $disk == *.qcow2 ]]; then
    qemu-img compare -q -f qcow2 -F qcow2 "$disk" "$work/imported"
    qemu-img check -q -f qcow2 "$work/imported"
fi
"$vmstore" rm "$url"
echo "== quickstart OK: the imported disk is byte-identical to the exported one ($sum)"
