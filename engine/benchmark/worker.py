"""The benchmark's child process and its protocol: the parent sends one case spec (JSON) per line
on stdin; the child measures it and reports status, rows and notes as marked JSON lines on stdout.
A child that dies (out of memory, ``--timeout``) is replaced for the next case."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading

from .measure import SDPA_CASE, _describe, _measure_length, _peak_probe, _SdpaCase, _VariantCase, predicted_skip

__all__ = ["_Worker", "_worker_main"]

_MARK = "@@attention-engine-bench "


def _emit(stream, **msg) -> None:
    stream.write(_MARK + json.dumps(msg) + "\n")
    stream.flush()


def _register_worker_plugins(plugins) -> list[str]:
    import importlib

    import engine

    problems = []
    for name, target in plugins:
        try:
            module, _, attr = target.partition(":")
            obj = importlib.import_module(module)
            for part in filter(None, attr.split(".")):
                obj = getattr(obj, part)
            engine.register_plugin(obj, name=name)
        except Exception as exc:
            problems.append(f"plugin {name!r} ({target}): {_describe(exc)}")
    return problems


def _run_spec(spec: dict, out, state: dict) -> None:
    """Measure one case in this child, reporting on ``out``."""
    import engine

    if "threads" not in state:  # the first case: settings shared by every case of the run
        for problem in _register_worker_plugins(spec.get("plugins", [])):
            _emit(out, type="warning", message=problem)
        engine.set_num_threads(spec["threads"])
        state["threads"], state["torch_ok"] = spec["threads"], False
        if not spec.get("no_torch"):
            try:
                import torch

                torch.set_num_threads(spec["threads"])
                state["torch_ok"] = True
            except ImportError:
                pass
        state["peak_method"] = _peak_probe()
    torch_ok = state["torch_ok"]
    try:
        case = _SdpaCase(spec, torch_ok) if spec["case"] == SDPA_CASE else _VariantCase(spec["case"], spec, torch_ok)
    except Exception as exc:
        _emit(out, type="case_error", error=_describe(exc))
        return
    if spec["case"] != SDPA_CASE and case.torch_mha is None:
        _emit(out, type="note", message=f"{spec['case']}: no torch baseline ({case.torch_note})")
    too_slow: dict = {}
    lengths = spec["lengths"]
    for n, L in enumerate(lengths):
        rows, note = _measure_length(
            case, L, spec, state["peak_method"], lambda m: _emit(out, type="status", message=m), too_slow
        )
        if note:
            _emit(out, type="note", message=f"{spec['case']}: {note}")
        _emit(out, type="rows", L=L, rows=rows)
        for row in rows:  # a call that would exceed --max-call-s at the next length is not made
            if n + 1 < len(lengths) and row["time_s"] and row["impl"] not in too_slow:
                why = predicted_skip(row["time_s"], L, lengths[n + 1], spec["max_call_s"])
                if why:
                    too_slow[row["impl"]] = why
    info = {"engine_threads": engine.get_num_threads(), "torch_threads": None}
    try:
        import numba

        info["numba_threading_layer"] = numba.threading_layer()
    except (ValueError, ImportError):
        info["numba_threading_layer"] = None
    if torch_ok:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    _emit(out, type="done", info=info)


def _worker_main() -> None:
    """Entry point of the child: reads case specs (JSON, one a line) on stdin, reports on stdout."""
    import signal

    # Ctrl-C in a terminal reaches the whole process group: the parent handles it (it stops this
    # child and reports the rows measured so far), so the child does not die with a traceback first
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything a library prints goes to stderr, not into the report stream
    state: dict = {}
    for line in sys.stdin:
        if line.strip():
            _run_spec(json.loads(line), out, state)


class _Worker:
    """The child process that measures the cases one after the other.

    One process serves the whole run, so its imports (torch's take seconds) are paid once; if it
    dies (out of memory, ``--timeout``), the case it was running gets error rows and a new child
    takes the next case.
    """

    def __init__(self, threads: int):
        self.env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
            self.env[var] = str(threads)
        # the child imports what this process can (plugins registered at run time, from their modules)
        self.env["PYTHONPATH"] = os.pathsep.join(
            dict.fromkeys(
                p for p in sys.path + self.env.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.isdir(p)
            )
        )
        self.err = tempfile.TemporaryFile(mode="w+")
        self.proc = None
        #: set when Ctrl-C stopped a case: the rows measured before it are kept
        self.interrupted = False

    def _start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from engine.benchmark.worker import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.err,
            env=self.env,
            text=True,
        )

    def close(self) -> None:
        if self.proc is not None:
            if self.interrupted:
                self.proc.kill()
            else:
                self.proc.stdin.close()
            self.proc.wait()
            self.proc = None
        self.err.close()

    def run_case(self, spec: dict, progress, timeout: int) -> tuple[list[dict], list[str], dict]:
        """Rows, notes and run info of one case; lengths it never reached get rows with the error."""
        if self.proc is None:
            self._start()
        proc = self.proc
        err_start = self.err.seek(0, os.SEEK_END)
        rows, notes, info, failure = [], [], {}, None
        pending = list(spec["lengths"])
        timed_out = threading.Event()

        def stop():
            timed_out.set()
            proc.kill()

        timer = threading.Timer(timeout, stop)
        timer.start()
        finished = False
        try:
            proc.stdin.write(json.dumps(spec) + "\n")
            proc.stdin.flush()
            for line in proc.stdout:
                if not line.startswith(_MARK):
                    continue
                msg = json.loads(line[len(_MARK) :])
                if msg["type"] == "status":
                    progress.describe(spec["case"], msg["message"])
                elif msg["type"] == "rows":
                    rows.extend(msg["rows"])
                    pending.remove(msg["L"])
                    progress.advance()
                elif msg["type"] in ("note", "warning"):
                    notes.append(msg["message"])
                elif msg["type"] in ("case_error", "done"):
                    failure = msg.get("error")
                    info = msg.get("info", {})
                    finished = True
                    break
        except (BrokenPipeError, OSError):
            pass
        except KeyboardInterrupt:  # Ctrl-C: stop here, keep the lengths already measured
            self.interrupted = True
            proc.kill()
            proc.wait()
            self.proc = None
            notes.append(
                f"interrupted (Ctrl-C) in case {spec['case']!r} before L = {', '.join(map(str, pending))}: "
                "those lengths and the cases after it were not measured"
            )
            return rows, notes, info
        finally:
            timer.cancel()
        if not finished:  # the child died: report why, and start a new one for the next case
            rc = proc.wait()
            self.proc = None
            self.err.seek(err_start)
            tail = " | ".join(self.err.read().strip().splitlines()[-3:])
            how = f"stopped after --timeout {timeout} s" if timed_out.is_set() else f"exit status {rc}"
            failure = f"the benchmark's child process died ({how}){': ' + tail if tail else ''}"
        for L in pending:
            rows.append({"case": spec["case"], "impl": "*", "L": L, "error": failure})
            progress.advance()
        return rows, notes, info
