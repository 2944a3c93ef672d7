"""Draw docs/images/architecture.png: the engine's layers and which may import which.

Run from the repository root: ``python docs/images/architecture.py`` (needs matplotlib).
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

#: (x, y, width, height, title, body, colour): one box per layer, top floor first
BOXES = {
    "public": (
        0.5,
        8.6,
        11.0,
        1.25,
        "public functions (engine/*.py)",
        "functional · backward · decoding · merge · weights · variant: validate -> select -> op.run\n"
        "extras: torch · distributed · models · benchmark · cli",
        "#dbeafe",
    ),
    "dispatch": (
        3.0,
        7.1,
        6.0,
        1.1,
        "dispatch.py",
        "select(name, problem) -> (backend, op)\nevery refusal explained",
        "#e0e7ff",
    ),
    "problems": (
        0.5,
        5.3,
        5.3,
        1.45,
        "problems/  (the contract)",
        "base: Problem, requirements()\nattention · backward · decode · arrays\nmods · masks · causal",
        "#dcfce7",
    ),
    "plugins": (
        6.2,
        5.3,
        5.3,
        1.45,
        "plugins/  +  backends/registry",
        "hookspecs · manager (pluggy) · registry (variants)\nbackends/registry (backends, apart)",
        "#fef9c3",
    ),
    "backends": (
        0.5,
        2.95,
        11.0,
        1.95,
        "backends/  (Backend: name, priority, ops.  Op: one capability, its flags and run)",
        "base · registry · kvcache (host cache writes, split-KV heuristic)\n"
        "reference/  forward · backward · decode · dense\n"
        "cpu/  forward · backward · decode · tiles · operands · blas_pin\n"
        "cuda/  forward · backward · decode · operands",
        "#ffedd5",
    ),
    "kernels": (
        0.5,
        1.35,
        11.0,
        1.2,
        "kernels/  (pure njit / cuda.jit functions over preallocated arrays)",
        "cpu/  flash_fwd · flash_bwd · decode · gemm · tile_ops      cuda/  flash_fwd · flash_bwd · decode\n"
        "shared: kinds · philox · lse_merge · mod_kernels · specialise · block_sparsity · fastexp",
        "#fce7f3",
    ),
    "runtime": (
        0.5,
        0.05,
        11.0,
        0.85,
        "runtime/",
        "config · threads · jit_cache · gemm_providers · machine · errors",
        "#e5e7eb",
    ),
}

#: (from, to): "from may import to"; every arrow points down the stack
ARROWS = [
    ("public", "dispatch"),
    ("dispatch", "problems"),
    ("dispatch", "plugins"),
    ("public", "problems"),
    ("dispatch", "backends"),
    ("backends", "kernels"),
    ("kernels", "runtime"),
]


def _anchor(name, side):
    x, y, w, h = BOXES[name][:4]
    return (x + w / 2, y if side == "bottom" else y + h)


def draw(path: str) -> None:
    fig, ax = plt.subplots(figsize=(11, 8.4), dpi=100)
    ax.set_xlim(0, 12)
    ax.set_ylim(-0.1, 10.6)
    ax.axis("off")
    for x, y, w, h, title, body, colour in BOXES.values():
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.04", fc=colour, ec="#334155", lw=1.2))
        ax.text(x + 0.15, y + h - 0.12, title, ha="left", va="top", fontsize=11, weight="bold", color="#0f172a")
        ax.text(x + 0.15, y + h - 0.48, body, ha="left", va="top", fontsize=9.2, color="#1e293b", linespacing=1.5)
    for a, b in ARROWS:
        start, end = _anchor(a, "bottom"), _anchor(b, "top")
        if a == "public" and b == "problems":
            start, end = (2.0, BOXES["public"][1]), (2.0, BOXES["problems"][1] + BOXES["problems"][3])
        if a == "dispatch" and b == "backends":
            start, end = (6.0, BOXES["dispatch"][1]), (6.0, BOXES["backends"][1] + BOXES["backends"][3])
        if a == "dispatch" and b == "problems":
            start, end = (4.0, BOXES["dispatch"][1]), (3.6, BOXES["problems"][1] + BOXES["problems"][3])
        if a == "dispatch" and b == "plugins":
            start, end = (8.0, BOXES["dispatch"][1]), (8.4, BOXES["plugins"][1] + BOXES["plugins"][3])
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, lw=1.4, color="#475569"))
    ax.text(
        6.0,
        10.55,
        "attention-engine: the layers\n"
        "(an arrow = may import: imports go down only, no cycle, deferred imports included)",
        ha="center",
        va="top",
        fontsize=11.5,
        color="#0f172a",
    )
    ax.text(
        11.45,
        5.1,
        "backends also import problems/ and runtime/",
        ha="right",
        va="center",
        fontsize=8.5,
        color="#475569",
        style="italic",
    )
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    draw(os.path.join(os.path.dirname(os.path.abspath(__file__)), "architecture.png"))
