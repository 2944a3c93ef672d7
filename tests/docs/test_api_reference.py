"""The API reference page (``docs/api.md``, mkdocstrings) as a reader sees it: every parameter of
every documented function, method and constructor in its table, positional ones included, each
with its type, and no private member listed.

Before, the tables held only the parameters a docstring happened to name with ``:param`` (the
positional ones were missing), the Type column was empty, and ``Variant._params``,
``Variant._placed`` and ``Variant._input`` were listed."""

import html
import importlib
import inspect
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("mkdocs", reason="the docs extra is not installed")
pytest.importorskip("mkdocstrings_handlers.python", reason="the docs extra is not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def api_page(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    res = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return (site / "api" / "index.html").read_text()


def _sections(page: str) -> dict:
    """heading id -> the HTML up to the next heading."""
    heads = list(re.finditer(r'<h\d id="([^"]+)" class="doc doc-heading"', page))
    return {
        m.group(1): page[m.end() : (heads[i + 1].start() if i + 1 < len(heads) else len(page))]
        for i, m in enumerate(heads)
    }


def _parameter_rows(section: str) -> list[tuple[str, str]]:
    """(name, type) of each row of the section's Parameters table (empty without one)."""
    m = re.search(r'doc-section-title">Parameters:</span></p>\s*<table>(.*?)</table>', section, re.S)
    if not m:
        return []
    rows = []
    for row in re.findall(r'<tr class="doc-section-item">(.*?)</tr>', m.group(1), re.S):
        cells = re.findall(r"<td>(.*?)</td>", row, re.S)
        text = [html.unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in cells]
        rows.append((text[0], text[1]))
    return rows


def _resolve(path: str):
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for p in parts[i:]:
            obj = getattr(obj, p)
        return obj
    raise ImportError(path)


def _signature_names(obj) -> list[str] | None:
    """The parameters a reader should find in the table, or None where there is no signature of
    the engine's own to check (an exception inheriting ValueError's, pluggy's marker)."""
    if inspect.isclass(obj):
        if "__init__" not in vars(obj):
            return None
        obj = obj.__init__
    elif not (inspect.isfunction(obj) or inspect.ismethod(obj)):
        return None
    if not getattr(obj, "__module__", "").startswith("engine"):
        return None
    names = [p.name for p in inspect.signature(obj).parameters.values()]
    return [n for n in names if n not in ("self", "cls")]


#: classes users do not construct (their page shows no constructor)
NOT_CONSTRUCTED = {"engine.BlockMask": "made by engine.create_block_mask"}


def test_every_parameter_is_in_its_table_with_a_type(api_page):
    checked, problems = 0, []
    for path, section in _sections(api_page).items():
        if not path.startswith("engine") or path in NOT_CONSTRUCTED:
            continue
        want = _signature_names(_resolve(path))
        if want is None:
            continue
        rows = _parameter_rows(section)
        got = [name.lstrip("*") for name, _ in rows]
        if got != want:
            problems.append(f"{path}: table {got}, signature {want}")
        problems += [f"{path}: {name} has no type" for name, typ in rows if not typ]
        checked += 1
    assert checked >= 40 and not problems, "\n".join(problems)


def test_positional_parameters_are_listed(api_page):
    rows = dict(_parameter_rows(_sections(api_page)["engine.scaled_dot_product_attention"]))
    assert list(rows)[:3] == ["query", "key", "value"] and rows["query"] == "array"
    assert rows["attn_mask"] == "array | CausalBias | None" and rows["is_causal"] == "bool"


def test_no_private_member_is_listed(api_page):
    private = [p for p in _sections(api_page) if any(re.match(r"_[^_]", part) for part in p.split("."))]
    assert not private, private
    assert "engine.Variant.__call__" in _sections(api_page)  # the call's own documentation stays
