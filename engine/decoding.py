"""``attention_with_kvcache``: attention of new query tokens against a KV cache (decoding).

Validate (everything, before any write) -> pick a backend -> the backend writes the new keys and
values into the cache in place and attends.
"""

from __future__ import annotations

from .dispatch import select
from .plan.decode import decode_key, remember, run_cached
from .problems.decode import validate_decode_args
from .problems.sinks import run_with_sinks

__all__ = ["attention_with_kvcache"]


def attention_with_kvcache(
    query,
    k_cache,
    v_cache,
    key=None,
    value=None,
    *,
    cache_seqlens,
    page_table=None,
    is_causal=True,
    scale=None,
    window=None,
    score_mod=None,
    mask_mod=None,
    mod_args=(),
    return_lse=False,
    num_splits=None,
    backend="auto",
    cu_seqlens_q=None,
    sinks=None,
):
    """Attention of new query tokens against a KV cache, after writing the new keys and values into it.

    The semantics of FlashAttention's ``flash_attn_with_kvcache`` in the engine's head-major layout:

    * ``query`` ``(B, Hq, L, D)``: L >= 1 new query tokens per sequence (1 when decoding; more for
      chunked prefill or speculative tokens). float32 or float64; float16/bfloat16 queries are
      computed in float32.
    * ``k_cache``/``v_cache``: ``(B, Hkv, S_max, D)``/``(B, Hkv, S_max, Dv)``, or paged
      ``(num_pages, Hkv, page_size, D/Dv)`` with ``page_table`` int32 ``(B, max_pages)`` (token t
      of sequence b lives in page ``page_table[b, t // page_size]``, slot ``t % page_size``), as
      vLLM and FlashAttention lay them out. C-contiguous; of the compute dtype (float32, float64
      for float64 queries) or float16/bfloat16 (ml_dtypes): 16-bit entries are widened in
      registers and computed in float32. Hkv divides Hq (GQA/MQA: query head h reads cache head
      ``h // (Hq // Hkv)``).
    * ``key``/``value`` ``(B, Hkv, L_new, D/Dv)``, optional: written **in place** into the caches at
      positions ``cache_seqlens[b] ... cache_seqlens[b] + L_new - 1`` (converted to the cache dtype,
      rounded to nearest even) before attending.
    * Host arrays (NumPy, torch CPU tensors), or device arrays (torch CUDA, CuPy, Numba: the
      ``cuda`` backend) for ``query``, the caches and ``key``/``value``, all of one kind; device
      caches are written in place on the GPU and the result stays there.
    * ``cache_seqlens``: int or integer host array ``(B,)`` (int32): the entries already in each
      sequence's cache (ragged). Sequence b attends its first ``S_b = cache_seqlens[b] + L_new``
      keys. The caller advances ``cache_seqlens`` (this function never changes it).
    * ``is_causal`` (default True): aligned at the **bottom right**: query row i of sequence b is the
      token at position ``S_b - L + i`` (``cache_seqlens[b] + i`` when ``L_new = L``) and sees keys
      ``j <= S_b - L + i``. ``window=(left, right)``: it also sees only keys with
      ``S_b - L + i - left <= j <= S_b - L + i + right`` (-1 or None: unbounded on that side), as
      FlashAttention's ``window_size``. Rows with no visible key give zeros and ``lse = -inf``.
    * ``score_mod(score, b, h, q_idx, kv_idx, *mod_args)``/``mask_mod(b, h, q_idx, kv_idx,
      *mod_args)`` as in ``scaled_dot_product_attention``, with ``q_idx = S_b - L + i`` and
      ``kv_idx`` the key's position in its sequence (absolute positions), ``h`` the query head.
    * ``num_splits``: None picks how many chunks each sequence's keys are split into (split-KV:
      parallel partial results merged through ``engine.merge_attention``'s log-sum-exp merge) when
      batch x heads is small against the core count; an int >= 1 forces it.

    * ``cu_seqlens_q``: int32 ``(B + 1,)`` host array, FlashAttention's cumulative offsets, to mix
      decoding and prefill in one call: ``query`` is then packed ``(total, Hq, D)`` and
      ``key``/``value`` ``(total, Hkv, D/Dv)`` (or None), sequence b owning rows
      ``cu_seqlens_q[b] ... cu_seqlens_q[b + 1] - 1``: ``n_b`` new tokens (0, 1 for a decode step, a
      chunk of a prompt), written at ``cache_seqlens[b] ... + n_b - 1`` and attended bottom-right
      causal as above (``L = n_b``, ``S_b = cache_seqlens[b] + n_b``). The result is packed too:
      ``(total, Hq, Dv)`` and ``lse`` ``(total, Hq)``. The ``cpu`` and ``reference`` backends
      take it (``cuda`` refuses it by name).
    * ``sinks``: float ``(Hq,)`` attention sinks (gpt-oss): a logit per query head, in the units of
      the scaled scores, that joins each row's softmax and carries no value; ``lse`` includes it,
      and a row with no visible key gives zeros and ``lse = sinks[h]``. Applied once after the
      split-KV merge. Host arrays only. See ``docs/serving.md``.

    :param query: ``(B, Hq, L, D)``, the new query tokens (above).
    :type query: array
    :param k_cache: ``(B, Hkv, S_max, D)`` or paged ``(num_pages, Hkv, page_size, D)``, written in
        place (above).
    :type k_cache: array
    :param v_cache: ``(B, Hkv, S_max, Dv)`` or paged, like ``k_cache``.
    :type v_cache: array
    :param key: ``(B, Hkv, L_new, D)``: new keys written into ``k_cache`` before attending, or None.
    :type key: array | None
    :param value: ``(B, Hkv, L_new, Dv)``: new values, with ``key``.
    :type value: array | None
    :param cache_seqlens: the entries already in each sequence's cache (above): an int or an integer
        host array ``(B,)``.
    :type cache_seqlens: int | ndarray | torch.Tensor
    :param page_table: int32 ``(B, max_pages)`` for paged caches, else None.
    :type page_table: ndarray | torch.Tensor | None
    :param is_causal: bottom-right causal (above).
    :type is_causal: bool
    :param scale: defaults to ``1/sqrt(D)``.
    :type scale: float | None
    :param window: ``(left, right)``, -1 or None for unbounded (above).
    :type window: tuple[int | None, int | None] | None
    :param score_mod: as in ``scaled_dot_product_attention``, at absolute positions (above).
    :type score_mod: Callable | None
    :param mask_mod: likewise.
    :type mask_mod: Callable | None
    :param mod_args: the mods' extra arguments.
    :type mod_args: tuple
    :param return_lse: also return the natural-log log-sum-exp of the scaled, masked scores (B, Hq, L).
    :type return_lse: bool
    :param num_splits: split-KV chunks per sequence: None picks, an int >= 1 forces (above).
    :type num_splits: int | None
    :param backend: ``"auto"`` or a backend name whose capabilities include decoding.
    :type backend: str
    :param cu_seqlens_q: int32 ``(B + 1,)`` cumulative new-token offsets of a packed mixed
        decode/prefill call (above), or None.
    :type cu_seqlens_q: ndarray | None
    :param sinks: float ``(Hq,)`` attention sinks (above), or None.
    :type sinks: ndarray | None
    :return: ``out`` ``(B, Hq, L, Dv)`` in the query's dtype, or ``(out, lse)``.
    :raises ValueError: a bad shape or value, named with the values involved: a write that would
        overflow a cache, a negative seqlen, a page index out of range, two sequences writing one
        slot, a write into a slot a sequence reads as its history (a shared page), a read-only
        cache. Raised before anything is written.
    :raises TypeError: a wrong kind of argument (a non-float array, a non-integer seqlen array,
        host and device arrays mixed, ``cache_seqlens``/``page_table`` on the device).
    :raises engine.NotSupportedError: the backend cannot run the call (a ValueError).
    """
    # packed queries and sinks take the full path every call
    plan_key = (
        None
        if cu_seqlens_q is not None or sinks is not None
        else decode_key(
            query,
            k_cache,
            v_cache,
            key,
            value,
            cache_seqlens,
            page_table,
            is_causal,
            window,
            score_mod,
            mask_mod,
            mod_args,
            return_lse,
            num_splits,
            backend,
        )
    )
    if plan_key is not None:  # a call with this signature has run before: the checks values need
        result = run_cached(plan_key, query, k_cache, v_cache, key, value, cache_seqlens, page_table, scale, mod_args)
        if result is not None:
            return result if return_lse else result[0]
    problem = validate_decode_args(
        query,
        k_cache,
        v_cache,
        key,
        value,
        cache_seqlens=cache_seqlens,
        page_table=page_table,
        is_causal=is_causal,
        scale=scale,
        window=window,
        score_mod=score_mod,
        mask_mod=mask_mod,
        mod_args=mod_args,
        return_lse=return_lse,
        num_splits=num_splits,
        cu_seqlens_q=cu_seqlens_q,
        sinks=sinks,
    )
    chosen, op = select(backend, problem)
    out, lse = run_with_sinks(problem, op.run, -1 if problem.packed else -2)
    remember(plan_key, problem, chosen, op, (query, k_cache, v_cache, key, value, page_table))
    return (out, lse) if return_lse else out
