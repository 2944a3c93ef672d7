"""Hand-made mutants of the Numba kernels, each of which the test suite must kill.

mutmut cannot mutate the kernels (its trampolines are Python code that Numba cannot compile), so
the realistic kernel bugs live here as (file, original text, mutated text, tests that must fail).
Each mutant is applied to a throw-away copy of the working tree, with a fresh Numba cache (a
kernel cached from the original code would hide the mutant), and its tests run there; the working
tree is never touched.

    python tests/mutants/kernel_mutants.py            # every mutant (about 10 to 20 minutes on 2 cores)
    python tests/mutants/kernel_mutants.py rescale    # the mutants whose id contains "rescale"

Exit status 0 when every mutant is killed, 1 when one survives, 2 when a mutant no longer applies
(its original text is not found exactly once: update the list with the code).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (id, file, original, mutated, pytest arguments that must fail)
MUTANTS = [
    (
        "rescale-skipped-for-small-moves",
        "engine/kernels/cpu/flash_fwd.py",
        "rescale |= a != 1.0",
        "rescale |= a < 0.999",
        ["tests/kernels/test_cpu_kernel.py", "-k", "running_max"],
    ),
    (
        "exp-degree-4-polynomial",
        "engine/kernels/fastexp.py",
        "    p = np.float32(1.0 / 720)\n    p = p * r + np.float32(1.0 / 120)\n    p = p * r + np.float32(1.0 / 24)",
        "    p = np.float32(1.0 / 24)",
        ["tests/kernels/test_cpu_kernel.py"],
    ),
    (
        "tile-full-when-all-but-one",
        "engine/kernels/block_sparsity.py",
        "TILE_FULL if allowed == (i1 - i0) * (j1 - j0) else TILE_PARTIAL",
        "TILE_FULL if allowed >= (i1 - i0) * (j1 - j0) - 1 else TILE_PARTIAL",
        ["tests/mods/test_tile_maps.py"],
    ),
    (
        "tile-empty-when-exactly-one",
        "engine/kernels/block_sparsity.py",
        "TILE_EMPTY if allowed == 0 else",
        "TILE_EMPTY if allowed <= 1 else",
        ["tests/mods/test_tile_maps.py"],
    ),
    (
        "causal-diagonal-off-by-one",
        "engine/kernels/cpu/flash_fwd.py",
        "first = min(j0 + c - i0 - causal_offset, nq)  # rows r < first cannot see key j0 + c",
        "first = min(j0 + c - i0 - causal_offset + 1, nq)  # rows r < first cannot see key j0 + c",
        ["tests/kernels/test_cpu_kernel.py", "-k", "causal"],
    ),
    (
        "float-mask-ignores-its-batch",
        "engine/kernels/cpu/flash_fwd.py",
        "mv = fmask[mb, h, i0 + r, j0 + c]",
        "mv = fmask[0, h, i0 + r, j0 + c]",
        ["tests/kernels/test_cpu_kernel.py", "-k", "mask"],
    ),
    (
        "lse-without-log-sum",
        "engine/kernels/cpu/flash_fwd.py",
        "lse[b, h, t0 + r] = m[r] + np.log(total)",
        "lse[b, h, t0 + r] = m[r]",
        ["tests/kernels/test_cpu_kernel.py"],
    ),
    (
        "gqa-heads-interleaved",
        "engine/kernels/cpu/flash_fwd.py",
        "hk = h // group",
        "hk = h % k.shape[1]",
        ["tests/kernels/test_cpu_kernel.py", "-k", "gqa"],
    ),
    (
        "mask-validation-loosened",
        "engine/problems/attention.py",
        "m in (1, t) for m, t in zip(mshape[::-1], target[::-1]))",
        "m in (1, t, t + 1) for m, t in zip(mshape[::-1], target[::-1]))",
        ["tests/errors/test_mask_shapes.py"],
    ),
]

_SKIP = shutil.ignore_patterns(
    ".git", ".venv", "__pycache__", "mutants", "site", ".hypothesis", ".benchmarks", "*.egg-info"
)


def run_mutant(mutant) -> str:
    """'killed', 'survived' or 'stale' (the original text is not found exactly once)."""
    ident, path, original, mutated, tests = mutant
    with tempfile.TemporaryDirectory(prefix=f"mutant-{ident}-") as tmp:
        copy = os.path.join(tmp, "tree")
        shutil.copytree(ROOT, copy, ignore=_SKIP)
        target = os.path.join(copy, path)
        with open(target) as f:
            text = f.read()
        if text.count(original) != 1:
            return "stale"
        with open(target, "w") as f:
            f.write(text.replace(original, mutated))
        env = dict(
            os.environ, PYTHONPATH=copy, NUMBA_CACHE_DIR=os.path.join(tmp, "numba-cache"), PYTHONDONTWRITEBYTECODE="1"
        )
        res = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
            cwd=copy,
            env=env,
            capture_output=True,
            text=True,
        )
        return "killed" if res.returncode != 0 else "survived"


def main(argv) -> int:
    chosen = [m for m in MUTANTS if not argv or any(a in m[0] for a in argv)]
    results = {}
    for mutant in chosen:
        t0 = time.perf_counter()
        results[mutant[0]] = run_mutant(mutant)
        print(f"{results[mutant[0]]:8}  {mutant[0]}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    killed = sum(r == "killed" for r in results.values())
    print(f"{killed} of {len(results)} kernel mutants killed")
    if any(r == "stale" for r in results.values()):
        return 2
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
