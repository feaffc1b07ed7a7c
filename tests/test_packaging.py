"""The wheel as a user gets it: built portable, tagged manylinux, installed and used elsewhere.

``maturin build --release --zig --compatibility manylinux_2_28`` links the extension against
glibc 2.28 with zig (the ``ziglang`` package), so the wheel imports on RHEL 8, Ubuntu 20.04 and
Debian 11 as well as on the build host. ``auditwheel show`` reads the glibc symbol versions the
extension really references and must agree with the tag. The wheel is then installed into
throwaway virtual environments, away from the checkout, and does a real NFS round trip there.

Builds in cargo's own target directory, so a second run only relinks (about a minute on two
cores the first time). Set VMSTORE_SKIP_WHEEL=1 to skip this module; CI runs it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.skipif(os.environ.get("VMSTORE_SKIP_WHEEL") == "1", reason="VMSTORE_SKIP_WHEEL=1"),
    pytest.mark.slow,
]

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
POLICY = "manylinux_2_28"
"""The oldest glibc the wheel may need: 2.28 (RHEL 8); auditwheel must not find a newer one."""
ARCH = platform.machine()


def run(
    args: list[str | Path],
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        timeout=timeout,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result


def tool_missing(module: str) -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, check=False
    )
    return probe.returncode != 0


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = [m for m in ("maturin", "ziglang", "auditwheel") if tool_missing(m)]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not installed: pip install -e '.[test]' "
            "(or set VMSTORE_SKIP_WHEEL=1 to skip the wheel build)"
        )
    out = tmp_path_factory.mktemp("wheelhouse")
    run(
        [
            sys.executable, "-m", "maturin", "build", "--release", "--zig",
            "--compatibility", POLICY, "--out", out,
        ],
        cwd=ROOT,
        timeout=900,
    )  # fmt: skip
    wheels = sorted(out.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_the_wheel_is_abi3_and_tagged_manylinux(wheel: Path) -> None:
    version = PROJECT["version"]

    assert wheel.name == f"vmstore-{version}-cp311-abi3-{POLICY}_{ARCH}.whl"
    with zipfile.ZipFile(wheel) as archive:
        tags = archive.read(f"vmstore-{version}.dist-info/WHEEL").decode()
    assert f"Tag: cp311-abi3-{POLICY}_{ARCH}" in tags.splitlines()


def test_auditwheel_finds_no_glibc_symbol_newer_than_the_tag(wheel: Path) -> None:
    shown = run([sys.executable, "-m", "auditwheel", "show", wheel]).stdout
    text = " ".join(shown.split())  # auditwheel wraps its sentences at 72 columns

    found = re.search(
        r'consistent with the following platform tag: "(manylinux_(\d+)_(\d+)_\w+)"', text
    )
    assert found, shown
    assert (int(found[2]), int(found[3])) <= (2, 28), f"needs {found[1]}, newer than {POLICY}"
    glibc = {tuple(map(int, v.split("."))) for v in re.findall(r"GLIBC_(\d+\.\d+(?:\.\d+)?)", text)}
    assert glibc and max(glibc) <= (2, 28), sorted(glibc)


def test_the_wheel_carries_its_metadata_stubs_and_python_floor(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"vmstore-{PROJECT['version']}.dist-info/METADATA").decode()
    lines = metadata.splitlines()

    assert {"vmstore/py.typed", "vmstore/_native.pyi", "vmstore/_native.abi3.so"} <= names
    assert "Requires-Python: >=3.11" in lines
    classifiers = {
        line.removeprefix("Classifier: ") for line in lines if line.startswith("Classifier:")
    }
    assert set(PROJECT["classifiers"]) == classifiers
    assert "Programming Language :: Python :: 3.11" in classifiers
    assert "Operating System :: POSIX :: Linux" in classifiers


# --- installed away from the checkout ------------------------------------------------------

ROUND_TRIP = textwrap.dedent(
    """
    import hashlib, json, os, sys
    import vmstore, vmstore._native
    from vmstore import DownloadRequest, StorageConfig, UploadRequest, new_storage

    work = sys.argv[1]
    share = os.path.join(work, "share")
    os.makedirs(share)
    data = os.urandom(3 << 20)  # a few chunks of the native copy
    with open(os.path.join(work, "disk.img"), "wb") as f:
        f.write(data)
    config = StorageConfig(type="nfs", endpoint=share, chunk_size=1 << 20)
    with new_storage(config) as store:
        up = store.upload(UploadRequest(os.path.join(work, "disk.img"), "nfs://vm/disk.img",
                                        metadata={"vm-name": "wheel-test"}))
        down = store.download(DownloadRequest(up.url, os.path.join(work, "back.img"),
                                              expected_checksum=up.checksum))
        md = store.get_metadata(up.url)
        store.delete(up.url)
    with open(os.path.join(work, "back.img"), "rb") as f:
        back = f.read()
    print(json.dumps({
        "python": list(sys.version_info[:2]),
        "vmstore": vmstore.__file__,
        "native": vmstore._native.__file__,
        "version": vmstore.__version__,
        "sha256": hashlib.sha256(data).hexdigest(),
        "uploaded": up.checksum,
        "downloaded": down.checksum,
        "stored": md.checksum,
        "vm-name": md.custom_metadata.get("vm-name"),
        "identical": back == data,
        "left": sorted(os.listdir(share)),
    }))
    """
)


def install_into_new_venv(python: str, wheel: Path, where: Path) -> Path:
    """A fresh venv made from ``python`` with only the wheel installed (no index, no deps).

    pip runs from ``python`` itself with ``--python`` pointing into the new venv: the install
    is the same, without the seconds ensurepip takes to put a pip into every throwaway venv.
    """
    has_pip = subprocess.run([python, "-m", "pip", "--version"], capture_output=True).returncode
    run([python, "-m", "venv", *(["--without-pip"] if has_pip == 0 else []), where])
    venv_python = where / "bin" / "python"
    pip = (
        [python, "-m", "pip", "--python", venv_python]
        if has_pip == 0
        else [venv_python, "-m", "pip"]
    )
    run(
        [*pip, "install", "-q", "--no-index", "--no-deps", wheel],
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    return venv_python


def round_trip(venv_python: Path, tmp_path: Path) -> dict[str, object]:
    work = tmp_path / "work"
    work.mkdir(parents=True)
    script = tmp_path / "round_trip.py"
    script.write_text(ROUND_TRIP)
    # Away from the checkout and with no PYTHONPATH: only the installed wheel can answer.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = run([venv_python, "-I", script, work], cwd=tmp_path, env=env)
    answer: dict[str, object] = json.loads(result.stdout)
    return answer


def assert_round_trip_from_the_wheel(answer: dict[str, object], venv: Path) -> None:
    assert str(answer["native"]).startswith(str(venv)), answer["native"]
    assert str(answer["native"]).endswith("_native.abi3.so")
    assert answer["version"] == PROJECT["version"]
    assert answer["uploaded"] == answer["downloaded"] == answer["stored"] == answer["sha256"]
    assert answer["vm-name"] == "wheel-test"
    assert answer["identical"] is True
    assert answer["left"] == ["vm"]  # the delete removed the image and its sidecar


def test_the_installed_wheel_imports_and_does_an_nfs_round_trip(
    wheel: Path, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    venv_python = install_into_new_venv(sys.executable, wheel, venv)

    answer = round_trip(venv_python, tmp_path)

    assert_round_trip_from_the_wheel(answer, venv)
    # The console script came with it and uses the same native core.
    (tmp_path / "small").write_bytes(b"vmstore\n")
    printed = run([venv / "bin" / "vmstore", "checksum", tmp_path / "small"], cwd=tmp_path).stdout
    assert printed.split()[0] == hashlib.sha256(b"vmstore\n").hexdigest()


def other_cpythons() -> Iterator[tuple[tuple[int, int], str]]:
    """Every other CPython on this machine (PATH, pyenv), one per version, GIL builds only."""
    candidates = [shutil.which(f"python3.{minor}") for minor in range(8, 20)]
    candidates += glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin/python3"))
    candidates += glob.glob("/usr/bin/python3.*[0-9]")
    seen: set[tuple[int, int]] = {sys.version_info[:2]}
    probe = (
        "import sys, sysconfig; print(sys.implementation.name, *sys.version_info[:2], "
        "int(bool(sysconfig.get_config_var('Py_GIL_DISABLED'))))"
    )
    for exe in candidates:
        if exe is None:
            continue
        # A pyenv shim for a version that is not selected exits non-zero: not usable.
        found = subprocess.run([exe, "-c", probe], capture_output=True, text=True, check=False)
        if found.returncode != 0:
            continue
        name, major, minor, free_threaded = found.stdout.split()
        version = (int(major), int(minor))
        if name == "cpython" and free_threaded == "0" and version not in seen:
            seen.add(version)
            yield version, exe


def test_the_abi3_wheel_installs_on_every_newer_cpython_here_and_is_refused_below_3_11(
    wheel: Path, tmp_path: Path
) -> None:
    others = sorted(other_cpythons())
    newer = [(version, exe) for version, exe in others if version >= (3, 11)]
    older = [(version, exe) for version, exe in others if version < (3, 11)]
    if not others:
        pytest.skip("no other CPython on this machine to install the abi3 wheel into")
    # Every newer one, and the newest one below the floor (enough to see the floor hold).
    for (major, minor), exe in newer + older[-1:]:
        venv = tmp_path / f"venv{major}.{minor}"
        if (major, minor) >= (3, 11):
            answer = round_trip(install_into_new_venv(exe, wheel, venv), tmp_path / venv.name)
            assert answer["python"] == [major, minor]
            assert_round_trip_from_the_wheel(answer, venv)
            continue
        # pip's own check, without making a venv: --target skips the externally-managed
        # guard of a distribution's interpreter, --dry-run installs nothing.
        command = [exe, "-m", "pip", "install", "--dry-run", "--no-index", "--no-deps"]
        refused = subprocess.run(
            [*command, "--target", str(venv), str(wheel)],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if "No module named pip" in refused.stderr:
            continue
        assert refused.returncode != 0, f"Python {major}.{minor} accepted a cp311-abi3 wheel"
        assert "is not a supported wheel on this platform" in refused.stderr, refused.stderr
