"""`--config` files of the `sfmkern` CLI: a YAML or JSON mapping of option names to values.

Keys are the long option names of a subcommand, with dashes or underscores (`syn-res: 128` or `syn_res: 128`).
A file may also hold one section per subcommand (`stats:`, `distill:`, `eval:`, `demo:`): a key named like a subcommand
whose value is a mapping is a section; the section of the running subcommand is applied over the top-level keys, and
the other sections are ignored. A key named like a subcommand with a plain value is an option (`stats: s.safetensors`
is `--stats` of `distill` and `eval`), never dropped. Values on the command line win over
the file. Unknown keys are an error that names the key and the file, so that a typo never passes silently.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SUBCOMMANDS = ("stats", "distill", "eval", "demo")


def read_config(path: str | os.PathLike) -> dict:
    """Parse a YAML (.yaml/.yml) or JSON (.json; other suffixes: tried as JSON then YAML) file -> dict.

    Raises FileNotFoundError if the file is missing and ValueError (naming the file) if it does not parse or is not
    a mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {str(p)!r} does not exist")
    text = p.read_text(encoding="utf-8")
    suffix = p.suffix.lower()
    data = None
    errors = []
    parsers = {".json": ("json",), ".yaml": ("yaml",), ".yml": ("yaml",)}.get(suffix, ("json", "yaml"))
    for kind in parsers:
        try:
            data = _parse(text, kind)
            break
        except ValueError as exc:
            errors.append(f"{kind}: {exc}")
    else:
        raise ValueError(f"config file {str(p)!r} does not parse ({'; '.join(errors)})")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(p)!r} must hold a mapping of option names to values, "
                         f"got {type(data).__name__}")
    return data


def _parse(text: str, kind: str):
    if kind == "json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(str(exc)) from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(str(exc).replace("\n", " ")) from None


def options_for(data: dict, command: str, path: str | os.PathLike = "<config>") -> dict:
    """Flatten `data` for `command`: top-level keys, then the `command` section over them; keys normalised to
    argparse destinations (dashes -> underscores). Sections of other subcommands are dropped."""
    out: dict = {}
    for key, value in data.items():
        if key in SUBCOMMANDS and isinstance(value, dict):
            continue  # a section: the running command's is applied below, the others are not for this command
        out[_dest(key, path)] = value
    section = data.get(command)
    if isinstance(section, dict):
        for key, value in section.items():
            if key in SUBCOMMANDS and isinstance(value, dict):
                raise ValueError(f"config file {str(path)!r}: section {command!r} holds a nested section {key!r}")
            out[_dest(key, path)] = value
    return out


def _dest(key, path) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError(f"config file {str(path)!r}: option names must be non-empty strings, got {key!r}")
    return key.lstrip("-").replace("-", "_")
