"""Running work in child processes: the one place processes are managed.

Logical devices are fixed when TensorFlow starts, and an eager DTensor error poisons its
process, so sweeps run their cases in a worker process (``python -m dsgd.harness.isolate``).
Each result is streamed back as one JSON line as soon as it exists; if a case fails the
worker records it and exits, and a fresh worker takes the remaining cases.  Nothing
already produced is lost and one bad case never stops the sweep.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import traceback
from typing import Callable, Iterable, Optional

_PREFIX = "@@dsgd-result "


def _resolve(path: str) -> Callable[[dict], dict]:
    mod, _, fn = path.partition(":")
    return getattr(importlib.import_module(mod), fn)


def child_env(extra: Optional[dict] = None) -> dict:
    # A worker is a fresh single-client process: it must not join a DTensor cluster its parent
    # belongs to (it would pose as a second copy of the same client).
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("DTENSOR_") and k not in ("DSGD_LOCAL_DEVICES", "DSGD_DEVICE_TYPE", "DSGD_LAUNCHED")}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # holds dsgd/
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


NOTE = "dsgd: "  # a worker's stderr lines starting so are notes for the user (dsgd.kernels.note), passed on


def _read_stderr(stream, lines: list[str]) -> None:
    """Keep a worker's stderr (its tail goes into failure messages); pass its notes on to ours."""
    for line in stream:
        lines.append(line)
        if line.startswith(NOTE):
            try:  # above a progress bar, which tqdm redraws
                from tqdm.auto import tqdm

                tqdm.write(line.rstrip("\n"), file=sys.stderr)
            except ImportError:
                sys.stderr.write(line)
                sys.stderr.flush()


def run_isolated(func: str, payloads: list[dict], *, devices: int = 8, device_type: str = "CPU",
                 timeout: Optional[float] = None, on_result: Optional[Callable[[int, dict], None]] = None,
                 env: Optional[dict] = None) -> list[dict]:
    """Run ``func(payload) -> dict`` (``"module:function"``) for each payload in worker processes.

    Returns one dict per payload, in order; a failed payload gives
    ``{"status": "failed", "error": ...}``.  ``on_result(i, result)`` is called as results arrive.
    ``timeout`` bounds each worker process (seconds).
    """
    results: list[Optional[dict]] = [None] * len(payloads)
    pending = list(range(len(payloads)))
    while pending:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump([payloads[i] for i in pending], f)
            path = f.name
        cmd = [sys.executable, "-m", "dsgd.harness.isolate", "--func", func, "--payloads", path,
               "--devices", str(devices), "--device-type", device_type]
        got: list[tuple[int, dict]] = []
        err_tail = ""
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(env))
            import threading

            stderr_lines: list[str] = []
            t = threading.Thread(target=_read_stderr, args=(proc.stderr, stderr_lines), daemon=True)
            t.start()
            timer = None
            if timeout:
                timer = threading.Timer(timeout, proc.kill)
                timer.start()
            for line in proc.stdout:
                if line.startswith(_PREFIX):
                    k, res = json.loads(line[len(_PREFIX):])
                    idx = pending[k]
                    results[idx] = res
                    got.append((idx, res))
                    if on_result:
                        on_result(idx, res)
            proc.wait()
            if timer:
                timer.cancel()
            t.join(timeout=5)
            err_tail = "".join(stderr_lines[-20:])
        finally:
            os.unlink(path)
        done = {i for i, _ in got}
        rest = [i for i in pending if i not in done]
        if rest and (not got or got[-1][1].get("status") != "failed"):
            # the worker died (crash, kill, timeout) on the first case without a result
            bad = rest[0]
            results[bad] = {"status": "failed",
                            "error": f"worker exited with code {proc.returncode}: {err_tail.strip()[-800:]}"}
            if on_result:
                on_result(bad, results[bad])
            rest = rest[1:]
        pending = rest
    return [r if r is not None else {"status": "failed", "error": "no result"} for r in results]


def _worker(func: str, payloads_path: str, devices: int, device_type: str) -> int:
    from dsgd.devices import configure_devices

    with open(payloads_path) as f:
        payloads = json.load(f)
    try:
        configure_devices(devices, device_type)
    except Exception as e:  # noqa: BLE001 - reported per payload
        for k in range(len(payloads)):
            print(_PREFIX + json.dumps([k, {"status": "failed", "error": f"{type(e).__name__}: {e}"}]), flush=True)
        return 0
    fn = _resolve(func)
    for k, payload in enumerate(payloads):
        try:
            res = fn(payload)
            res.setdefault("status", "ok")
        except Exception as e:  # noqa: BLE001 - recorded, then the (possibly poisoned) worker exits
            res = {"status": "failed", "error": f"{type(e).__name__}: {str(e)[:600]}",
                   "traceback": traceback.format_exc()[-2000:]}
            print(_PREFIX + json.dumps([k, res], default=str), flush=True)
            return 0
        print(_PREFIX + json.dumps([k, res], default=str), flush=True)
    return 0


def main(argv: Optional[Iterable[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsgd.harness.isolate")
    p.add_argument("--func", required=True)
    p.add_argument("--payloads", required=True)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--device-type", default="CPU")
    a = p.parse_args(list(argv) if argv is not None else None)
    return _worker(a.func, a.payloads, a.devices, a.device_type)


if __name__ == "__main__":
    sys.exit(main())
