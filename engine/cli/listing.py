"""``attention-engine list``: what is installed, in the spirit of ``datasette plugins``."""

from __future__ import annotations

import json

from ..dispatch import get_backend, list_backends
from ..plugins.registry import variant_info


def collect() -> dict:
    """Variants (name, description, plugin, distribution), conflicts, and backend capabilities."""
    variants, conflicts = variant_info()
    return {
        "variants": [
            {"name": v.name, "description": v.description, "plugin": v.plugin, "distribution": v.distribution}
            for v in sorted(variants.values(), key=lambda v: v.name)
        ],
        "conflicts": {
            name: [{"plugin": i.plugin, "distribution": i.distribution} for i in infos]
            for name, infos in conflicts.items()
        },
        "backends": [get_backend(n).capabilities() for n in list_backends()],
    }


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def run(args) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print("Variants")
    rows = [(v["name"], v["plugin"], v["distribution"], v["description"]) for v in info["variants"]]
    _table(("name", "plugin", "distribution", "description"), rows)
    for name, infos in info["conflicts"].items():
        who = ", ".join(f"{i['plugin']} ({i['distribution']})" for i in infos)
        print(f"  CONFLICT: {name!r} offered by {who}; not selectable")
    print("\nBackends")
    rows = [
        (
            b["name"],
            "yes" if b["available"] else f"no: {b['unavailable_reason']}",
            ", ".join(b["dtypes"]),
            "host" + (", device" if b["device_arrays"] else ""),
            "yes" if b["backward"] else "no",
            "yes" if b["dropout"] else "no",
            str(b["priority"]),
            b["description"],
        )
        for b in info["backends"]
    ]
    _table(("name", "available", "dtypes", "arrays", "backward", "dropout", "priority", "description"), rows)
    for b in info["backends"]:
        for note in b.get("notes", ()):
            print(f"  {b['name']}: {note}")
    return 0


def _table(header, rows) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in (header, *rows):
        print("  " + "  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())
