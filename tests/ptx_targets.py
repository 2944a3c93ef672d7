"""The compute capabilities the PTX tests (``tests/cuda/test_*ptx.py``) compile every kernel for."""

import os


def _compute_capabilities(text: str) -> list[tuple[int, int]]:
    try:
        ccs = [tuple(int(x) for x in cc.strip().split(".")) for cc in text.split(",") if cc.strip()]
    except ValueError:
        ccs = []
    if not ccs or any(len(cc) != 2 for cc in ccs):
        raise ValueError(f"ATTENTION_ENGINE_PTX_CCS must list compute capabilities such as 8.0,9.0; got {text!r}")
    return sorted(set(ccs))


#: the compute capabilities the PTX tests (tests/cuda/test_*ptx.py) compile every kernel for: 9.0
#: (H100/H200) unless ``ATTENTION_ENGINE_PTX_CCS`` names others, as "8.0,9.0" (A100 too; each one
#: costs minutes of compiling, and typing does not depend on the target)
PTX_CCS = _compute_capabilities(os.environ.get("ATTENTION_ENGINE_PTX_CCS") or "9.0")


def cc_id(cc) -> str:
    return f"sm{cc[0]}{cc[1]}"


def all_pairs(dtypes, kinds, heads):
    """(dtype, kind, heads) cases in which every pair of values of two of the three parameters
    occurs at least once: len(kinds) x len(heads) compiles instead of the full product's
    len(dtypes) x len(kinds) x len(heads). A kernel's source depends on the kind and the head sizes
    (each pair compiled), its types on the dtype (each dtype with every kind and every head size);
    the three-way product repeated those pairs at minutes of compiling in CI."""
    return [(dtypes[(i + j) % len(dtypes)], kind, head) for i, kind in enumerate(kinds) for j, head in enumerate(heads)]
