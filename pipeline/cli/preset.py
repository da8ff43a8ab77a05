"""Apply a preset (a partial params file) to params.yaml, keeping its comments.

    python -m pipeline.cli.preset configs/paper.yaml        # then: dvc repro, or dvc exp run -n paper
    python -m pipeline.cli.preset configs/paper.yaml --dry-run

The mapping sections ``datasets`` and ``runs`` and the lists ``aux_datasets`` and ``synthetic.datasets``
are replaced whole (they define which stages exist); every other section is merged key by key, so a
preset never changes a key it does not name. A section that is empty (null) or not a mapping (a list
for ``aux_datasets``) is refused, naming it. A
preset that replaces ``runs`` must list their auxiliary datasets in ``aux_datasets`` too, or the
validation below refuses it naming the run. The result is
validated with :mod:`pipeline.config` before anything is written, so a bad preset changes nothing.
Undo with ``git checkout params.yaml``.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Any, Mapping

import yaml
from ruamel.yaml import YAML  # round-trip YAML: params.yaml keeps its comments (ruamel comes with dvc)

from pipeline.config import ConfigError, parse, read_yaml

REPLACED = ("datasets", "runs", "aux_datasets")


def merge(base: Any, preset: Mapping[str, Any]) -> Any:
    """``base`` (a round-trip mapping) updated in place by ``preset`` per the rules above."""
    for section, value in preset.items():
        if section in REPLACED or not isinstance(value, Mapping) or section not in base:
            base[section] = value
            continue
        for key, item in value.items():
            base[section][key] = item
    return base


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", type=Path, help="a partial params file, e.g. configs/paper.yaml")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--dry-run", action="store_true", help="print the result instead of writing it")
    args = parser.parse_args(argv)
    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 110
    try:
        read_yaml(args.params, "params file")  # a syntax error as one line naming the file, not a traceback
        preset = read_yaml(args.preset, "preset") or {}
        if not isinstance(preset, Mapping):
            raise ConfigError(f"{args.preset}: expected a mapping of sections at top level")
        for section, value in preset.items():
            # an empty section (`sae:` alone reads as null) would wipe the whole section, comments and all
            want = list if section == "aux_datasets" else Mapping
            if not isinstance(value, want):
                raise ConfigError(f"{args.preset}: section {section!r} is {'empty (null)' if value is None else repr(value)}"
                                  f"; a preset section is a {'list' if want is list else 'mapping of the keys it sets'}")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if "runs" in preset and "aux_datasets" not in preset:
        # the params' aux_datasets name the old runs' datasets, which the preset has just replaced
        aux = list(dict.fromkeys(r.get("aux") for r in (preset["runs"] or {}).values() if isinstance(r, Mapping)))
        print(f"error: {args.preset} replaces runs but sets no aux_datasets; add "
              f"`aux_datasets: [{', '.join(map(str, aux))}]` (every aux of its runs)", file=sys.stderr)
        return 1
    base = rt.load(args.params.read_text())
    merged = merge(base, preset)
    out = io.StringIO()
    rt.dump(merged, out)
    try:
        parse(yaml.safe_load(out.getvalue()))
    except ConfigError as err:
        print(f"error: {args.preset} would make {args.params} invalid: {err}", file=sys.stderr)
        return 1
    if args.dry_run:
        print(out.getvalue(), end="")
    else:
        args.params.write_text(out.getvalue())
        print(f"{args.params}: applied {args.preset} ({', '.join(preset)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
