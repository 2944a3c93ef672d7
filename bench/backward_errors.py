"""Largest gradient errors against torch float64 autograd for every case of tests/backward/test_backward.py.

    python bench/backward_errors.py

Reuses the tests' case builders (``tests/grad_cases.py``) with the shipped tile sizes and with the
tests' small tiles (many tiles, causal skipping, splits). For float32 it prints the engine's error
and torch float32's own error against float64, and their ratio (FlashAttention's rule: <= 2).
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import torch  # noqa: E402

import engine  # noqa: E402
import engine.backends.cpu as cpu_backend  # noqa: E402

from grad_cases import CASES, REFERENCE_ONLY, make_case, torch_attention  # noqa: E402


def _torch_grads(q, k, v, do, kw, dtype):
    t = lambda x: torch.tensor(np.asarray(x, dtype=dtype), requires_grad=True)  # noqa: E731
    leaves = [t(q), t(k), t(v)]
    tkw = dict(kw)
    m = kw.get("attn_mask")
    if m is not None:
        tkw["attn_mask"] = torch.from_numpy(m) if m.dtype == bool else t(m)
        if m.dtype != bool:
            leaves.append(tkw["attn_mask"])
    torch_attention(*leaves[:3], **tkw).backward(torch.tensor(np.asarray(do, dtype=dtype)))
    return [x.grad.numpy().astype(np.float64) for x in leaves]


def _errors(case, backend, dtype):
    rng = np.random.default_rng(1234)
    q, k, v, kw = make_case(rng, case, dtype)
    out, lse = engine.scaled_dot_product_attention(q, k, v, backend=backend, return_lse=True, **kw)
    do = rng.standard_normal(out.shape).astype(dtype)
    float_mask = kw.get("attn_mask") is not None and kw["attn_mask"].dtype != bool
    got = engine.scaled_dot_product_attention_backward(
        do, q, k, v, out, lse, backend=backend, return_mask_grad=float_mask, **kw
    )
    truth = _torch_grads(q, k, v, do, kw, np.float64)
    own = _torch_grads(q, k, v, do, kw, np.float32)
    errs = [float(np.abs(g.astype(np.float64) - t).max()) for g, t in zip(got, truth)]
    torch_errs = [float(np.abs(o - t).max()) for o, t in zip(own, truth)]
    return errs, torch_errs


def main() -> None:
    torch.set_num_threads(2)
    backends = [
        b
        for b in engine.list_backends()
        if engine.get_backend(b).supports_backward and engine.get_backend(b).unavailable_reason() is None
    ]
    for tiles in ("shipped", "small"):
        if tiles == "small":
            cpu_backend.CPU_BIG_BLOCK_Q, cpu_backend.CPU_BLOCK_K, cpu_backend.CPU_BWD_BLOCK_Q = 8, 24, 16
        print(f"\n{tiles} cpu tiles; errors = max |grad - torch float64 autograd| over dq, dk, dv (dmask)")
        print(f"{'case':<18}{'backend':<11}{'float64':>10}{'float32':>10}{'torch f32':>11}{'ratio':>7}  worst grad")
        for case in CASES:
            for backend in backends:
                if case in REFERENCE_ONLY and backend != "reference":
                    continue
                e64, _ = _errors(case, backend, np.float64)
                e32, t32 = _errors(case, backend, np.float32)
                ratios = [e / t if t > 0 else float("inf") for e, t in zip(e32, t32)]
                worst = int(np.argmax(ratios))
                name = ("dq", "dk", "dv", "dmask")[worst]
                print(
                    f"{case:<18}{backend:<11}{max(e64):>10.1e}{e32[worst]:>10.1e}{t32[worst]:>11.1e}"
                    f"{ratios[worst]:>7.2f}  {name}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
