"""dsgd's C++ TensorFlow kernels, compiled on first use and cached.

``load()`` compiles ``multi_momentum.cc`` with the system C++ compiler against the
installed TensorFlow (``tf.sysconfig`` flags) into a cache directory, then loads it with
``tf.load_op_library``.  The cached library's name holds a hash of the source, the
TensorFlow version, the compiler's version and the flags, so a change of any of them
builds a new one; builds write to a temporary file and rename it, so concurrent processes
never load a half-written library.

* cache: ``$DSGD_KERNEL_CACHE`` or ``~/.cache/dsgd/kernels``;
* compiler: ``$CXX`` or ``g++``;
* ``DSGD_DISABLE_KERNELS=1`` makes the kernels unavailable (``auto`` then uses ``per_shard``).

Nothing here raises at import: :func:`unavailable_reason` says why the kernels cannot be
used (no compiler, a failed build with the compiler's last lines, a failed load).

A build (a cache miss: the first use on a machine, or after a change of TensorFlow, compiler
or source) takes ~20 s of g++; the first one in a process announces itself on stderr, once,
with a line starting ``dsgd: `` (what, why, how long, where it is cached), and each compile
says how long it took.  :func:`prepare` builds and loads both libraries up front, so that a
harness can keep that time out of a step's first-call time (``dsgd bench``'s ``build_s``).

A second artifact, ``dispatch.cc``, is a small CPython extension (``_dsgd_dispatch``) built the
same way: it hands the components of many DTensors on every local device to one kernel call
from C++, by address, without a Python object per component (:func:`load_dispatch`; ``DSGD_DISABLE_DISPATCH=1`` turns it
off, and then the kernels are fed through ``dtensor.unpack``); :func:`dsgd.kernels.dispatch.run_all` calls it by name.

The Python-C++ interface of the kernels (the ``hyper`` and ``meta`` vectors, the in-graph node's
inputs) is named once in :mod:`dsgd.kernels.abi`.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

SOURCE = Path(__file__).with_name("multi_momentum.cc")
DISPATCH_SOURCE = Path(__file__).with_name("dispatch.cc")
_lock = threading.Lock()
_module = None
_error: Optional[str] = None
_dispatch = None
_dispatch_error: Optional[str] = None
_announced = False
NOTE = "dsgd: "  # stderr lines with this prefix are notes a worker's parent passes on (dsgd.harness.isolate)


class KernelUnavailable(RuntimeError):
    """The kernels could not be built or loaded; the message says why."""


def cache_dir() -> Path:
    return Path(os.environ.get("DSGD_KERNEL_CACHE") or Path.home() / ".cache" / "dsgd" / "kernels")


def compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CXX") or "g++")


def cpu_flags() -> list[str]:
    """Vector-ISA flags this CPU supports (checked in /proc/cpuinfo; never ``-march=native``).

    They are part of the cache key, so a cache shared by different machines never hands a
    library to a CPU that cannot run it.
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    break
            else:
                return []
    except OSError:
        return []
    if {"avx2", "fma", "f16c"} <= have:
        return ["-mavx2", "-mfma", "-mf16c"]
    return []


def build_command(cxx: str, out: str, source: Path = SOURCE) -> list[str]:
    import tensorflow as tf

    if source == DISPATCH_SOURCE:
        return _dispatch_command(cxx, out)
    # -ffp-contract=off: no fused multiply-adds, so float32 results equal TF's own training ops.
    return [cxx, "-shared", "-fPIC", "-O3", "-w", "-ffp-contract=off", *cpu_flags(), str(source), "-o", out,
            *tf.sysconfig.get_compile_flags(), *tf.sysconfig.get_link_flags()]


def _dispatch_command(cxx: str, out: str) -> list[str]:
    """The extension links TensorFlow's C API (libtensorflow_cc) and its Python bindings'
    EagerTensor helpers (lib_pywrap_tensorflow_common), both already loaded by ``import
    tensorflow``; the rpath finds the same files."""
    import sysconfig

    import tensorflow as tf

    tf_dir = Path(tf.sysconfig.get_lib())
    py_dir = tf_dir / "python"
    return [cxx, "-shared", "-fPIC", "-O2", "-w", str(DISPATCH_SOURCE), "-o", out,
            f"-I{sysconfig.get_paths()['include']}", *tf.sysconfig.get_compile_flags(),
            f"-L{tf_dir}", "-l:libtensorflow_cc.so.2", "-l:libtensorflow_framework.so.2",
            f"-L{py_dir}", "-l:lib_pywrap_tensorflow_common.so", f"-Wl,-rpath,{tf_dir}", f"-Wl,-rpath,{py_dir}"]


def _compiler_version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"


def library_path(cxx: str, source: Path = SOURCE) -> Path:
    import tensorflow as tf

    h = hashlib.sha256()
    for part in (source.read_bytes(), tf.__version__.encode(), _compiler_version(cxx).encode(),
                 " ".join(build_command(cxx, "OUT", source)).encode(), sys.platform.encode(), sys.version.encode()):
        h.update(part)
        h.update(b"\0")
    return cache_dir() / f"{source.stem}-{h.hexdigest()[:20]}.so"


def build(force: bool = False, source: Path = SOURCE) -> Path:
    """The compiled library's path (compiling it if it is not cached). Raises KernelUnavailable."""
    if os.environ.get("DSGD_DISABLE_KERNELS", "") not in ("", "0"):
        raise KernelUnavailable("disabled by DSGD_DISABLE_KERNELS")
    cxx = compiler()
    if cxx is None:
        raise KernelUnavailable(f"no C++ compiler found (looked for {os.environ.get('CXX') or 'g++'}; set CXX)")
    if not source.exists():
        raise KernelUnavailable(f"kernel source {source} is missing")
    target = library_path(cxx, source)
    if target.exists() and not force:
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KernelUnavailable(
            f"cannot create the kernel cache {target.parent}: {e} (set DSGD_KERNEL_CACHE)") from None
    with _file_lock(target.with_suffix(".lock")):
        if target.exists() and not force:  # another process built it while we waited
            return target
        _announce(target.parent)
        t0 = time.perf_counter()
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.stem + ".", suffix=".tmp")
        os.close(fd)
        try:
            cmd = build_command(cxx, tmp, source)
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            except (OSError, subprocess.SubprocessError) as e:
                raise KernelUnavailable(f"running the compiler failed: {e}") from None
            if res.returncode != 0:
                tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-15:])
                raise KernelUnavailable(f"compiling {source.name} failed (exit {res.returncode}):\n{tail}")
            os.replace(tmp, target)
            note(f"compiled {source.name} in {time.perf_counter() - t0:.1f} s -> {target}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


def note(text: str) -> None:
    """One line on stderr for the user (a worker's parent passes ``dsgd: `` lines on)."""
    print(NOTE + text, file=sys.stderr, flush=True)


def _announce(where: Path) -> None:
    """Say once per process that the one-time build is starting: what, why, how long, where."""
    global _announced
    if _announced:
        return
    _announced = True
    note(f"building dsgd's C++ kernels ({SOURCE.name}, {DISPATCH_SOURCE.name}) with {compiler()}: needed once per "
         f"machine and TensorFlow/compiler version, ~20 s; cached in {where} (DSGD_KERNEL_CACHE moves it)")


def prepare() -> float:
    """Build (on a cache miss) and load the kernels and the dispatch extension now; the seconds
    it took (0 when this process already has them).  Never raises: what is unavailable says so
    through :func:`unavailable_reason` / :func:`dispatch_unavailable_reason`, as on first use."""
    if (_module is not None or _error is not None) and (_dispatch is not None or _dispatch_error is not None):
        return 0.0  # this process already built/loaded them, or knows why not
    t0 = time.perf_counter()
    if unavailable_reason() is None:
        load_dispatch()
    return time.perf_counter() - t0


class _file_lock:
    """An advisory lock on a file (POSIX); a no-op where fcntl is missing."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:
            return self
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)


def load():
    """The loaded op library (built on first use). Raises KernelUnavailable with the reason."""
    global _module, _error
    if _module is not None:
        return _module
    with _lock:
        if _module is None and _error is None:
            try:
                import tensorflow as tf

                path = build()
                try:
                    _module = tf.load_op_library(str(path))
                except Exception as e:  # noqa: BLE001 - e.g. a stale library from another TF build
                    raise KernelUnavailable(f"loading {path} failed: {type(e).__name__}: {e}") from None
            except KernelUnavailable as e:
                _error = str(e)
        if _module is None:
            raise KernelUnavailable(_error)
    return _module


def loaded():
    """The op library if this process has already loaded it, else None (never builds)."""
    return _module


def unavailable_reason() -> Optional[str]:
    """None when the kernels are usable in this process, else why not (builds on first call)."""
    try:
        load()
    except KernelUnavailable as e:
        return str(e)
    return None


def load_dispatch():
    """The ``_dsgd_dispatch`` extension (built on first use), or None with the reason in
    :func:`dispatch_unavailable_reason`.  Never raises."""
    global _dispatch, _dispatch_error
    if _dispatch is not None or _dispatch_error is not None:
        return _dispatch
    with _lock:
        if _dispatch is None and _dispatch_error is None:
            try:
                if os.environ.get("DSGD_DISABLE_DISPATCH", "") not in ("", "0"):
                    raise KernelUnavailable("disabled by DSGD_DISABLE_DISPATCH")
                path = build(source=DISPATCH_SOURCE)
                import importlib.util

                spec = importlib.util.spec_from_file_location("_dsgd_dispatch", path)
                mod = importlib.util.module_from_spec(spec)
                try:
                    spec.loader.exec_module(mod)
                except Exception as e:  # noqa: BLE001 - a missing symbol in another TF build
                    raise KernelUnavailable(f"loading {path} failed: {type(e).__name__}: {e}") from None
                _dispatch = mod  # dsgd.eager_dtensor.direct() checks it against dtensor.unpack before use
            except KernelUnavailable as e:
                _dispatch_error = str(e)
    return _dispatch


def dispatch_unavailable_reason() -> Optional[str]:
    """None when the dispatch extension is usable in this process, else why not."""
    load_dispatch()
    return _dispatch_error


__all__ = ["load", "build", "prepare", "unavailable_reason", "KernelUnavailable", "cache_dir", "load_dispatch",
           "dispatch_unavailable_reason"]
