"""An aarch64 userland with a real TVM runtime, run on the x86 host under ``qemu-aarch64``.

``ensure_aarch64_rootfs`` builds it once into a cache folder and reuses it afterwards:

- ``root/``: Debian bookworm's arm64 ``python3.11`` and the shared libraries it and the TVM wheels
  load, fetched with ``apt-get download`` and unpacked with ``dpkg -x`` (no root, no change to the
  host's dpkg: apt runs on a private state folder with ``APT::Architectures=arm64``);
- ``site-packages/``: the ``manylinux_2_28_aarch64`` wheels of apache-tvm, apache-tvm-ffi and what
  TVM's runtime and RPC server import, plus a ``sitecustomize.py`` that reroutes
  ``sys.executable`` through qemu (there is no binfmt_misc here, and TVM's RPC server starts
  worker processes with ``sys.executable``);
- ``bin/python3``: a host shell script that runs the arm64 python under qemu. The CPU model is
  taken from ``QEMU_CPU`` in the environment, so one rootfs serves every aarch64 preset.

A marker file records a hash of everything that defines the rootfs (package list, wheel pins,
layout version); a changed definition rebuilds, an unchanged one returns at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable

from bitq_tvm.errors import BitqError
from bitq_tvm.targets.cross import require_tool

# The closure python3.11 and the wheels' extension modules actually load (checked by the import
# smoke test below). Left out on purpose from apt's full Depends closure: perl/debconf/tzdata/
# mime and the readline/ncurses/sqlite/gdbm/nis/krb5 libraries of stdlib modules TVM never imports.
DEBIAN_PACKAGES: tuple[str, ...] = (
    "libc6",
    "libgcc-s1",
    "libstdc++6",  # libtvm*.so, ml_dtypes
    "python3.11-minimal",  # /usr/bin/python3.11
    "libpython3.11-minimal",
    "libpython3.11-stdlib",  # multiprocessing, ctypes, json, ...
    "libexpat1",
    "zlib1g",
    "libssl3",  # hashlib, ssl (tornado imports ssl)
    "libffi8",  # ctypes
    "libbz2-1.0",
    "liblzma5",
    "libuuid1",
    "libcrypt1",
)
# Pinned to what the host runs, so both sides of an RPC session are the same TVM build.
# tornado, psutil and cloudpickle are the apache-tvm "rpc" extra (not pulled in by the wheel).
WHEELS: tuple[str, ...] = (
    "apache-tvm==0.27.0.post1",
    "apache-tvm-ffi==0.1.14.post1",
    "numpy==2.4.6",
    "ml_dtypes==0.6.0",
    "typing_extensions==4.15.0",
    "tornado==6.6.1",
    "psutil==7.2.2",
    "cloudpickle==3.1.3",
)
WHEEL_PLATFORM = "manylinux_2_28_aarch64"
PYTHON_VERSION = "3.11"
GUEST_PYTHON = "usr/bin/python3.11"
DEBIAN_ARCH = "arm64"
LAYOUT_VERSION = 1
MARKER_NAME = ".bitq-rootfs.json"
SMOKE_TEST = "import tvm, tvm.rpc, tvm.runtime, numpy, psutil, tornado, cloudpickle; print(tvm.__version__)"
# Downloads and the qemu smoke test are bounded: a stalled mirror must not hang a CI job.
STEP_TIMEOUT_S = 600.0
SMOKE_TIMEOUT_S = 180.0

_SITECUSTOMIZE = '''\
"""Written by bitq_tvm.targets.rootfs: child pythons (sys.executable) must run under qemu too."""
import os
import sys

sys.executable = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bin", "python3")
sys._base_executable = sys.executable
'''

_WRAPPER = '''\
#!/bin/sh
# Written by bitq_tvm.targets.rootfs: run the arm64 python of this rootfs under qemu-aarch64.
# Paths are relative to this script so the folder can be moved; QEMU_CPU picks the CPU model.
here=$(CDPATH= cd -- "$(dirname -- "$0")/.." && pwd)
unset PYTHONHOME PYTHONSTARTUP PYTHONUSERBASE
PYTHONPATH="$here/site-packages" PYTHONNOUSERSITE=1 exec qemu-aarch64 -L "$here/root" "$here/root/{python}" "$@"
'''.format(python=GUEST_PYTHON)


def default_rootfs_dir() -> Path:
    """``<bitq-tvm cache>/aarch64-rootfs`` (see :func:`bitq_tvm.support.cache.default_cache_dir`)."""
    from bitq_tvm.support.cache import default_cache_dir

    return default_cache_dir() / "aarch64-rootfs"


def rootfs_definition_hash() -> str:
    """Hash of everything that defines the rootfs; the marker must carry the same one."""
    definition = json.dumps(
        {"layout": LAYOUT_VERSION, "debs": DEBIAN_PACKAGES, "wheels": WHEELS,
         "platform": WHEEL_PLATFORM, "python": PYTHON_VERSION,
         "sitecustomize": _SITECUSTOMIZE, "wrapper": _WRAPPER},
        sort_keys=True,
    )
    return hashlib.sha256(definition.encode()).hexdigest()[:16]


def rootfs_python(rootfs_dir: str | os.PathLike) -> Path:
    """The host-side launcher of the rootfs' arm64 python (``bin/python3``)."""
    return Path(rootfs_dir) / "bin" / "python3"


def is_ready(rootfs_dir: str | os.PathLike) -> bool:
    """True when ``rootfs_dir`` holds a complete rootfs of the current definition."""
    marker = Path(rootfs_dir) / MARKER_NAME
    try:
        return json.loads(marker.read_text()).get("definition") == rootfs_definition_hash()
    except (OSError, ValueError):
        return False


def ensure_aarch64_rootfs(cache_dir: str | os.PathLike | None = None,
                          progress: Callable[[str], None] | None = None) -> Path:
    """The aarch64 rootfs folder, built on first use (a few hundred MB; about a minute).

    Parameters
    ----------
    cache_dir
        Where the rootfs lives; default :func:`default_rootfs_dir`.
    progress
        Called with one-line status messages while building.

    Returns
    -------
    Path
        The rootfs folder; run its python with :func:`rootfs_python`.

    Raises
    ------
    BitqError
        A missing host tool (names the Debian package), a package or wheel that cannot be
        downloaded (names it), or an arm64 python that cannot import TVM under qemu.
    """
    target = Path(cache_dir) if cache_dir is not None else default_rootfs_dir()
    if is_ready(target):
        return target
    say = progress or (lambda message: None)
    apt_get = require_tool("apt-get", "apt", "downloading the arm64 python packages")
    require_tool("dpkg", "dpkg", "unpacking the arm64 python packages")
    require_tool("qemu-aarch64", "qemu-user", "running the aarch64 TVM runtime")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: an interrupted or concurrent build never leaves a
    # half-made rootfs where a reader would take it for a finished one.
    build = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    start = time.perf_counter()
    try:
        debs = _download_debs(apt_get, build / "downloads", say)
        wheels = _download_wheels(build / "downloads" / "wheels", say)
        say(f"unpacking {len(debs)} Debian packages and {len(wheels)} wheels")
        for deb in debs:
            _run(["dpkg", "-x", str(deb), str(build / "root")], f"dpkg -x {deb.name}")
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(build / "site-packages")
        _write_launchers(build)
        shutil.rmtree(build / "downloads")
        _precompile(build)
        say("checking that the arm64 python imports TVM under qemu-aarch64")
        version = _smoke_test(build)
        (build / MARKER_NAME).write_text(json.dumps({
            "definition": rootfs_definition_hash(),
            "debs": sorted(deb.name for deb in debs),
            "wheels": sorted(wheel.name for wheel in wheels),
            "tvm_version": version,
            "build_seconds": round(time.perf_counter() - start, 1),
        }, indent=1))
        if target.exists():
            shutil.rmtree(target)  # an outdated or broken rootfs (is_ready said no)
        try:
            os.rename(build, target)
        except OSError:
            if not is_ready(target):  # lost a race to a concurrent build only if that one finished
                raise
    finally:
        if build.exists():
            shutil.rmtree(build, ignore_errors=True)
    say(f"aarch64 rootfs ready in {target} ({time.perf_counter() - start:.0f} s)")
    return target


def _run(command: list[str], what: str, timeout_s: float = STEP_TIMEOUT_S, **kwargs) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, **kwargs)
    except subprocess.TimeoutExpired:
        raise BitqError(f"aarch64 rootfs: {what} did not finish within {timeout_s:.0f} s") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith(("E:", "ERROR"))] or lines[-1:]
        raise BitqError(f"aarch64 rootfs: {what} failed: {(errors or ['exit status ' + str(done.returncode)])[0]}")
    return done.stdout


def _download_debs(apt_get: str, folder: Path, say: Callable[[str], None]) -> list[Path]:
    """apt-get update + download of the arm64 packages, on a private apt state folder."""
    state = folder / "apt-state"
    for sub in ("lists/partial", "cache/archives/partial"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    (state / "status").touch()
    # The host's sources.list, but arm64 indexes and package state of our own: the host's dpkg
    # configuration (foreign architectures, installed packages) is neither needed nor changed.
    options = [
        "-q", "-o", f"APT::Architecture={DEBIAN_ARCH}", "-o", f"APT::Architectures::={DEBIAN_ARCH}",
        "-o", f"Dir::State::Lists={state / 'lists'}", "-o", f"Dir::State::status={state / 'status'}",
        "-o", f"Dir::Cache={state / 'cache'}", "-o", "Debug::NoLocking=1",
    ]
    if os.geteuid() == 0:  # apt's _apt sandbox user cannot write into our private folders
        options += ["-o", "APT::Sandbox::User=root"]
    say(f"apt-get update ({DEBIAN_ARCH} package indexes)")
    _run([apt_get, *options, "update"], "apt-get update for arm64")
    say(f"apt-get download {len(DEBIAN_PACKAGES)} arm64 packages")
    debs_dir = folder / "debs"
    debs_dir.mkdir(parents=True)
    for package in DEBIAN_PACKAGES:  # one by one, so a failure names its package
        _run([apt_get, *options, "download", f"{package}:{DEBIAN_ARCH}"],
             f"apt-get download {package}:{DEBIAN_ARCH}", cwd=debs_dir)
    return sorted(debs_dir.glob("*.deb"))


def _download_wheels(folder: Path, say: Callable[[str], None]) -> list[Path]:
    say(f"pip download {len(WHEELS)} {WHEEL_PLATFORM} wheels")
    folder.mkdir(parents=True)
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
          "--no-deps", "--only-binary=:all:", "--platform", WHEEL_PLATFORM,
          "--python-version", PYTHON_VERSION, "--implementation", "cp", "--abi", "cp311",
          "--dest", str(folder), *WHEELS],
         f"pip download of the {WHEEL_PLATFORM} wheels ({', '.join(WHEELS)})")
    wheels = sorted(folder.glob("*.whl"))
    if len(wheels) != len(WHEELS):
        raise BitqError(f"aarch64 rootfs: pip download gave {len(wheels)} wheels for {len(WHEELS)} pins")
    return wheels


def _write_launchers(build: Path) -> None:
    (build / "site-packages" / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    wrapper = rootfs_python(build)
    wrapper.parent.mkdir()
    wrapper.write_text(_WRAPPER)
    wrapper.chmod(0o755)


def _precompile(build: Path) -> None:
    """Byte-compile on the host: 3.11.x share one bytecode format, and qemu imports get faster."""
    guest_stdlib = build / "root" / "usr" / "lib" / f"python{PYTHON_VERSION}"
    if sys.version_info[:2] != (3, 11):
        return  # a different host python would write pyc files the guest ignores
    for folder in (guest_stdlib, build / "site-packages"):
        # Failures are harmless (the guest compiles on import), so the result is not checked.
        subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", str(folder)],
                       capture_output=True, timeout=STEP_TIMEOUT_S)


def _smoke_test(build: Path) -> str:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env["QEMU_CPU"] = "max"
    output = _run([str(rootfs_python(build)), "-c", SMOKE_TEST],
                  "importing tvm with the arm64 python under qemu-aarch64", SMOKE_TIMEOUT_S, env=env)
    return output.strip()


def rootfs_size_bytes(rootfs_dir: str | os.PathLike) -> int:
    """Bytes on disk of the rootfs (files only)."""
    return sum(path.stat().st_size for path in Path(rootfs_dir).rglob("*")
               if path.is_file() and not path.is_symlink())
