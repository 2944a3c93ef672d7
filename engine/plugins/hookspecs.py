"""The hooks a plugin of attention-engine may implement.

A plugin is any module or object with functions marked ``@engine.hookimpl`` and named after the
specs below. The engine registers its built-in variant modules first, then every entry point in
the group ``attention_engine``, then any plugin passed to ``engine.register_plugin``.
"""

import pluggy

PROJECT = "attention_engine"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def attention_variants():
    """Contribute attention variants.

    :return: a list of ``engine.Variant`` subclasses (classes, not instances). Each declares the
        class attributes ``name`` (the unique name users select it by, e.g. ``"multi-head"``) and
        ``description`` (one line, shown by ``attention-engine list``). ``engine.get_variant(name,
        **params)`` instantiates the class with ``params``. A name offered by two plugins is an
        error naming both.
    """


@hookspec
def attention_backends():
    """Contribute compute backends (forward, backward, decoding, ...: one op per capability).

    :return: a list of ``engine.backends.Backend`` subclasses (classes, not instances). Each
        declares ``name``, ``description``, a ``priority`` used by ``backend="auto"`` (highest
        first among those whose ``not_supported_reasons`` is empty) and ``ops``: one
        ``engine.backends.Op`` subclass per capability it has, each naming its ``problem_type``
        and declaring what it supports (``dtypes``, ``supports_mods``...). A backend without an op
        for a problem type refuses those problems by name. The built-in ``reference``, ``cpu`` and
        ``cuda`` backends come through this hook (see ``docs/architecture.md``).
    """
