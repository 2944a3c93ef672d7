"""Figures the documentation quotes agree with their sources: the docs' front page with the
README's headline figures, the training page with the result file it cites, the benchmarks page
with the plot the code draws.

Before, docs/index.md still showed the 2026-11-22 headline figures (0.97x-1.09x) that the README
had replaced, docs/training.md quoted a corpus of "about 100 KB" that no run gave, and
docs/benchmarks.md described a log-log line plot where the command draws ratio bars."""

import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _read(*parts):
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def _plain(markdown: str) -> str:
    """Markdown as words: links as their text, whitespace collapsed."""
    text = re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", markdown)
    return " ".join(text.split())


def _headline(markdown: str) -> str:
    start = markdown.index("Headline figures")
    end = min(i for i in (markdown.find("\n## ", start), markdown.find("\nTo install", start)) if i > 0)
    return _plain(markdown[start:end])


def test_front_page_headline_figures_are_the_readmes():
    assert _headline(_read("docs", "index.md")) == _headline(_read("README.md"))


def test_training_page_quotes_its_result_file():
    doc = _read("docs", "training.md")
    section = " ".join(doc[re.search(r"The demo \(`attention-engine train[^`]*`", doc).start() :].split())
    path = re.search(r"`(bench/results/training-demo-[^`]+\.json)`", section).group(1)
    result = json.loads(_read(*path.split("/")))
    chars = re.search(r"corpus of ([\d,]+)\s+characters", section).group(1)
    assert int(chars.replace(",", "")) == result["characters"]
    losses = {name: run[-1] if isinstance(run, list) else run for name, run in result["runs"].items()}
    quoted = re.search(
        r"Final losses after (\d+) steps:\s+torch SDPA ([\d.]+), the engine ([\d.]+).*?ALiBi through torch's math "
        r"path ([\d.]+), through the engine's `score_mod`\s+([\d.]+)",
        section,
        re.S,
    )
    assert int(quoted.group(1)) == result["steps"]
    for name, value in zip(
        ("torch SDPA", "engine", "torch math + ALiBi bias tensor", "engine ALiBi score_mod"), quoted.groups()[1:]
    ):
        assert f"{losses[name]:.6f}" == value, (name, losses[name], value)
    if "engine T5 bias score_mod" in losses:  # the learned-bias pair (issue 30)
        t5 = re.search(
            r"T5 bias through torch's dense mask ([\d.]+), through the\s+engine's `score_mod`[^\d]*?([\d.]+)", section
        )
        assert (t5.group(1), t5.group(2)) == tuple(
            f"{losses[n]:.6f}" for n in ("torch math + T5 bias tensor", "engine T5 bias score_mod")
        )
    # the page's description of the corpus is the result's size too (not "about 100 KB")
    described = re.search(r"\(`engine` and `variants`, ([^;)]*)", doc).group(1)
    assert f"{result['characters']:,}" in described, described


def test_benchmarks_page_describes_the_plot_the_command_draws():
    from engine.benchmark import plot

    doc = _read("docs", "benchmarks.md")
    assert "log-log" not in doc
    w, h = re.search(r"\((\d+) x (\d+) for the default run's (\d+)", doc).groups()[:2]
    rows = int(re.search(r"for the default run's (\d+)", doc).group(1))
    assert int(w) == round(plot.WIDTH_IN * plot.DPI)
    assert int(h) == round((plot.HEADER_IN + plot.ROW_IN * rows) * plot.DPI)
    import engine
    from engine.benchmark.cli import DEFAULT_LENGTHS

    assert rows == (len(engine.list_variants()) + 1) * len(DEFAULT_LENGTHS)  # every variant and sdpa
