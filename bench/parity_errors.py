"""Largest absolute errors against PyTorch for every parity case of tests/forward/test_torch_parity.py.

    python bench/parity_errors.py

Reuses the tests' case builders, so the figures are of exactly the cases CI checks.
"""

import os
import sys

import numpy as np

_TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests")
sys.path[:0] = [_TESTS, os.path.join(_TESTS, "forward")]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from test_torch_parity import CASES, MHA_VARIANTS, _sdpa_case, _t, _torch_mha  # noqa: E402

import engine  # noqa: E402


def main() -> None:
    backends = [b for b in engine.list_backends() if engine.get_backend(b).unavailable_reason() is None]
    print(f"{'case':<28}{'dtype':<9}" + "".join(f"{b:>12}" for b in backends))
    for dtype in (np.float32, np.float64):
        for case in CASES:
            row = []
            for backend in backends:
                q, k, v, kw = _sdpa_case(np.random.default_rng(1234), dtype, case)
                out = engine.scaled_dot_product_attention(q, k, v, backend=backend, **kw)
                tkw = {key: (_t(val) if isinstance(val, np.ndarray) else val) for key, val in kw.items()}
                expected = F.scaled_dot_product_attention(_t(q), _t(k), _t(v), **tkw).numpy()
                row.append(np.abs(out - expected).max())
            print(f"sdpa/{case:<23}{np.dtype(dtype).name:<9}" + "".join(f"{e:>12.2e}" for e in row))
        for name, params in MHA_VARIANTS:
            row = []
            for backend in backends:
                rng = np.random.default_rng(1234)
                variant = engine.get_variant(name, dtype=dtype, seed=0, **params)
                mha = _torch_mha(variant, dtype, seed=1)
                q = rng.standard_normal((3, 29, 32)).astype(dtype)
                k = v = q
                if name == "cross":
                    k, v = (
                        rng.standard_normal((3, 41, 12)).astype(dtype),
                        rng.standard_normal((3, 41, 20)).astype(dtype),
                    )
                kpm = np.zeros((3, k.shape[1]), bool)
                kpm[0, -5:] = True
                tkw = {"attn_mask": torch.triu(torch.ones(29, 29, dtype=torch.bool), 1)} if name == "masked" else {}
                out, w = variant(
                    q,
                    *((k, v) if name == "cross" else ()),
                    key_padding_mask=kpm,
                    need_weights=True,
                    average_attn_weights=False,
                    backend=backend,
                )
                with torch.no_grad():
                    t_out, t_w = mha(
                        _t(q),
                        _t(k),
                        _t(v),
                        key_padding_mask=_t(kpm),
                        need_weights=True,
                        average_attn_weights=False,
                        **tkw,
                    )
                row.append(max(np.abs(out - t_out.numpy()).max(), np.abs(w - t_w.numpy()).max()))
            print(f"mha/{name:<24}{np.dtype(dtype).name:<9}" + "".join(f"{e:>12.2e}" for e in row))


if __name__ == "__main__":
    main()
