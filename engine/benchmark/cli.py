"""``attention-engine bench``: its options, and the run that ties measurement, report and plot."""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..runtime.machine import machine_info
from .baselines import available_backends
from .measure import SDPA_CASE
from .plot import write_plot
from .report import _add_ratios, _strict_json, format_summary, format_table
from .worker import _Worker

__all__ = ["add_arguments", "run", "DEFAULT_LENGTHS", "FULL_LENGTHS"]

DEFAULT_LENGTHS = (256, 512, 1024)


FULL_LENGTHS = (128, 256, 512, 1024, 2048, 4096)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _lengths(text: str) -> list[int]:
    try:
        values = [int(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"lengths must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"lengths must be positive integers, got {text!r}")
    return sorted(set(values))


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--variants",
        default=None,
        metavar="NAMES",
        help="comma-separated variant names (default: every registered variant; 'none' for none)",
    )
    parser.add_argument(
        "--backends",
        default=None,
        metavar="NAMES",
        help="comma-separated backend names (default: every backend available here)",
    )
    parser.add_argument(
        "--lengths",
        type=_lengths,
        default=None,
        metavar="L1,L2,...",
        help=f"sequence lengths (default {','.join(map(str, DEFAULT_LENGTHS))}; "
        f"with --full {','.join(map(str, FULL_LENGTHS))})",
    )
    parser.add_argument("--full", action="store_true", help="the whole grid of lengths (minutes)")
    parser.add_argument("--batch", type=_positive, default=2, help="batch size N (default 2)")
    parser.add_argument("--embed-dim", type=_positive, default=256, help="embed_dim E (default 256)")
    parser.add_argument("--heads", type=_positive, default=4, help="attention heads (default 4: head_dim 64)")
    parser.add_argument(
        "--threads",
        type=_positive,
        default=None,
        help="threads for the engine, NumPy's BLAS and torch alike (default: all cores)",
    )
    parser.add_argument("--repeat", type=_positive, default=5, help="timing rounds; the median is kept (default 5)")
    parser.add_argument(
        "--no-functional",
        action="store_true",
        help="leave out the functional rows (scaled_dot_product_attention, NumPy, torch SDPA)",
    )
    parser.add_argument(
        "--no-torch", action="store_true", help="do not use torch even if installed (baselines become NumPy)"
    )
    parser.add_argument("--json", metavar="PATH", help="write every row and the machine's description as JSON")
    parser.add_argument(
        "--plot", metavar="PATH", help="write a PNG: the engine's speed and memory against the baseline, per case and L"
    )
    parser.add_argument(
        "--max-call-s",
        type=float,
        default=None,
        metavar="SECONDS",
        help="skip an implementation at the lengths where one call would take longer, "
        "predicted quadratically from the previous length (default 1; 5 with --full; "
        "0 or inf: never skip)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive,
        default=1800,
        help="seconds one case (all its lengths) may take before it is stopped (default 1800)",
    )


def _runtime_plugins() -> tuple[list[tuple[str, str]], list[str]]:
    """Plugins registered with ``engine.register_plugin`` in this process, as importable targets."""
    from importlib.metadata import entry_points

    from ..plugins import hookspecs
    from ..plugins.manager import BUILTIN_PLUGINS, get_plugin_manager

    installed = {ep.name for ep in entry_points(group=hookspecs.PROJECT)} | set(BUILTIN_PLUGINS)
    targets, problems = [], []
    for name, plugin in get_plugin_manager().list_name_plugin():
        if name in installed or plugin is None:
            continue
        if isinstance(plugin, type(sys)):
            target = plugin.__name__
        else:
            module = sys.modules.get(getattr(type(plugin), "__module__", ""))
            attr = next((a for a, v in vars(module).items() if v is plugin), None) if module else None
            if isinstance(plugin, type):
                module, attr = sys.modules.get(plugin.__module__), plugin.__qualname__
            target = f"{module.__name__}:{attr}" if module is not None and attr else None
        if target is None or target.split(":")[0] == "__main__":
            problems.append(
                f"plugin {name!r} was registered at run time from an object the benchmark's "
                "child processes cannot import; its variants are skipped"
            )
            continue
        targets.append((name, target))
    return targets, problems


class _Progress:
    """tqdm when installed, else one line per step on stderr."""

    def __init__(self, total: int):
        try:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                file=sys.stderr,
                dynamic_ncols=True,
                bar_format="{desc:<44.44} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]",
            )
        except ImportError:
            self._bar = None
        self.total, self.n, self.desc = total, 0, ""

    def describe(self, case: str, message: str) -> None:
        self.desc = f"{case}: {message}"
        if self._bar is not None:
            self._bar.set_description_str(self.desc)

    def advance(self) -> None:
        self.n += 1
        if self._bar is not None:
            self._bar.update(1)
        else:
            width = 30
            done = int(width * self.n / max(1, self.total))
            print(
                f"[{'#' * done}{'.' * (width - done)}] {self.n}/{self.total} {self.desc}", file=sys.stderr, flush=True
            )

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def run(args) -> int:
    import engine

    started = time.perf_counter()
    machine_before = machine_info()
    registered = engine.list_variants()
    if args.variants is None:
        variants = registered
    elif args.variants.strip().lower() == "none":
        variants = []
    else:
        variants = _csv(args.variants)
        unknown = [v for v in variants if v not in registered]
        if unknown:
            print(
                f"attention-engine bench: error: unknown variant(s) {', '.join(unknown)}; "
                f"available: {', '.join(registered)}",
                file=sys.stderr,
            )
            return 2
    skipped = []
    if args.backends is None:
        backends = available_backends()
    else:
        backends = []
        for name in _csv(args.backends):
            if name not in engine.list_backends():
                print(
                    f"attention-engine bench: error: unknown backend {name!r}; available: "
                    f"{', '.join(engine.list_backends())}",
                    file=sys.stderr,
                )
                return 2
            why = engine.get_backend(name).unavailable_reason()
            if why:
                skipped.append(f"backend {name!r} skipped: {why}")
            else:
                backends.append(name)
    if args.embed_dim % args.heads:
        print(
            f"attention-engine bench: error: --embed-dim ({args.embed_dim}) must be divisible by "
            f"--heads ({args.heads})",
            file=sys.stderr,
        )
        return 2
    lengths = args.lengths or list(FULL_LENGTHS if args.full else DEFAULT_LENGTHS)
    import numba

    threads = args.threads or numba.config.NUMBA_NUM_THREADS
    plugins, problems = _runtime_plugins()
    skipped += problems
    cases = list(variants) + ([] if args.no_functional else [SDPA_CASE])
    if not cases:
        print("attention-engine bench: error: nothing to run (no variants and --no-functional)", file=sys.stderr)
        return 2
    base = {
        "lengths": lengths,
        "batch": args.batch,
        "embed_dim": args.embed_dim,
        "heads": args.heads,
        "threads": threads,
        "repeat": args.repeat,
        "backends": backends,
        "plugins": plugins,
        "max_call_s": args.max_call_s if args.max_call_s is not None else (5.0 if args.full else 1.0),
        "no_torch": args.no_torch,
    }
    progress = _Progress(len(cases) * len(lengths))
    rows, notes, info = [], [], {}
    worker = _Worker(threads)
    try:
        for case in cases:
            progress.describe(case, "starting")
            case_rows, case_notes, case_info = worker.run_case({**base, "case": case}, progress, args.timeout)
            rows += case_rows
            notes += case_notes
            info = info or case_info
            if worker.interrupted:
                break
    except KeyboardInterrupt:  # between cases: what was measured is reported all the same
        worker.interrupted = True
        notes.append("interrupted (Ctrl-C): the cases after the last one reported were not measured")
    finally:
        worker.close()
        progress.close()
    interrupted = worker.interrupted
    _add_ratios(rows)
    order = {c: i for i, c in enumerate(cases)}
    rows.sort(key=lambda r: (order[r["case"]], r["L"], not r.get("backend"), r.get("baseline", False)))
    elapsed = time.perf_counter() - started
    config = {
        **{k: v for k, v in base.items() if k != "plugins"},
        "variants": variants,
        "functional": not args.no_functional,
        **info,
    }
    machine = {**machine_before, "load_average_after": machine_info()["load_average"]}
    busy = busy_machine_warning(machine, threads)
    print("Summary: the engine's fastest backend against the baseline (torch on the same threads)\n")
    print(format_summary(rows))
    print("\nAll rows:\n")
    print(format_table(rows))
    print(
        f"\nN={args.batch}, E={args.embed_dim}, heads={args.heads} (sdpa: head_dim {args.embed_dim // args.heads}), "
        f"float32, {threads} thread(s) for engine, BLAS and torch; median of {args.repeat} rounds."
    )
    print(
        "t/base: median time / the baseline's in the same case and L (torch-mha for variants, torch-sdpa "
        "for sdpa; NumPy without torch); below 1 is faster. max|diff|: largest difference from the "
        "baseline's output. 1st call: the first call at this L; the first use of a kernel includes its JIT "
        "compilation (or loading Numba's cache)."
    )
    for line in skipped + notes:
        print("note: " + line)
    print(
        f"{machine['cpu']}, {machine['usable_cores']} cores, load average {machine['load_average']} before and "
        f"{machine['load_average_after']} after; ran in {elapsed:.0f} s"
    )
    if busy:
        print("warning: " + busy)
    if interrupted:
        print(f"interrupted (Ctrl-C): the tables above hold the {len(rows)} rows measured before it")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                _strict_json(
                    {
                        "machine": machine,
                        "config": config,
                        "elapsed_s": elapsed,
                        "interrupted": interrupted,
                        "warnings": [busy] if busy else [],
                        "notes": skipped + notes,
                        "rows": rows,
                    }
                ),
                f,
                indent=1,
                allow_nan=False,
            )
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(
            rows,
            args.plot,
            f"attention-engine bench: N={args.batch}, E={args.embed_dim}, "
            f"heads={args.heads}, {threads} threads; {machine['cpu']}; {machine['date'][:10]}",
        )
        print(f"wrote {args.plot}")
    if interrupted:
        return 130  # the shell's status for a command stopped by SIGINT
    return 1 if any(r.get("error") and not (r.get("unsupported") or r.get("skipped")) for r in rows) else 0


#: a machine is called busy when its 1-minute load average exceeds this share of its cores before
#: the run, or, after the run, the benchmark's own threads plus this share
BUSY_LOAD_SHARE = 0.5


def busy_machine_warning(machine: dict, threads: int) -> str | None:
    """A warning when the load averages say other work shared the machine (``None`` when quiet or
    unknown): timings then vary from run to run and should not be quoted."""
    before, after = machine.get("load_average"), machine.get("load_average_after")
    cores = machine.get("usable_cores") or machine.get("cores") or 1
    if not before or not after:
        return None
    if before[0] <= BUSY_LOAD_SHARE * cores and after[0] <= threads + BUSY_LOAD_SHARE * cores:
        return None
    return (
        f"the machine was busy: 1-minute load average {before[0]:g} before the run and {after[0]:g} after, "
        f"on {cores} cores (the benchmark itself keeps about {threads} busy). Timings on a shared machine vary "
        "from run to run: rerun on a quiet machine before quoting them"
    )
