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
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_INPUT=1
for dir in "$HOME/.cargo/bin" "$HOME/.pyenv/shims"; do
    if [[ -d $dir && ":$PATH:" != *":$dir:"* ]]; then PATH="$dir:$PATH"; fi
done

venv=${VMSTORE_VENV:-.venv}
echo "== installing vmstore into $venv (builds the Rust core; the first time takes a few minutes)"
python3 -m venv "$venv"
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
