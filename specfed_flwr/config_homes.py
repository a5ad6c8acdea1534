"""The configuration's other homes, generated from ``SpecFedConfig``.

The dataclass is the one source of every key (type, default, meaning in its docstring). Four other
files must list the same keys: ``conf/specfed.yaml`` (the defaults ``load_config`` reads), its copy
shipped inside the package, the ``[tool.flwr.app.config]`` table of ``pyproject.toml`` (Flower
accepts ``--run-config`` overrides only for keys listed there, and its values reach the ServerApp
on top of the YAML) and the key table of ``docs/CONFIG.md``. This module writes them::

    python -m specfed_flwr.config_homes --write   # after changing a field
    python -m specfed_flwr.config_homes --check   # exit 1 naming the files that differ

``tests/test_config_keys.py`` runs the check and also names the first key that disagrees.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

from .config import SpecFedConfig

ROOT = Path(__file__).resolve().parent.parent
YAML_HOMES = (ROOT / "conf" / "specfed.yaml", ROOT / "specfed_flwr" / "conf" / "specfed.yaml")
PYPROJECT = ROOT / "pyproject.toml"
CONFIG_MD = ROOT / "docs" / "CONFIG.md"

_TABLE = "[tool.flwr.app.config]"
_MD_HEADER = "| key | default | meaning |\n|---|---|---|\n"

YAML_HEADER = """\
# specfed-flwr defaults (OmegaConf), generated from specfed_flwr/config.py (SpecFedConfig):
# edit the dataclass, then `python -m specfed_flwr.config_homes --write`. Flower run-config keys
# (`flwr run --run-config`) and CLI flags override these; docs/CONFIG.md describes every key.
"""

PYPROJECT_HEADER = """\
# Every key of conf/specfed.yaml, so that `flwr run --run-config "KEY=VALUE"` can override any
# of them (Flower refuses keys not listed here). Generated from SpecFedConfig with the YAML's
# defaults (`python -m specfed_flwr.config_homes --write`; tests/test_config_keys.py checks it).
# A relative `results` path is resolved in the ServerApp's working directory (the SuperLink's).
"""


def kebab(name: str) -> str:
    return name.replace("_", "-")


def field_docs() -> dict[str, str]:
    """Each field's docstring (the string right after it in the class body), whitespace joined."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(SpecFedConfig)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def defaults() -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(SpecFedConfig)}


def _scalar(value: Any) -> str:
    """A default as YAML / TOML both read it (strings double-quoted, bools lowercase)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def md_default(value: Any) -> str:
    """A default as CONFIG.md's table shows it."""
    return "`" + ('""' if value == "" else _scalar(value).strip('"')) + "`"


def render_yaml() -> str:
    docs = field_docs()
    out = [YAML_HEADER]
    for name, value in defaults().items():
        out.append(textwrap.fill(docs[name], width=100, initial_indent="# ", subsequent_indent="# ",
                                 break_long_words=False, break_on_hyphens=False))
        out.append(f"{name}: {_scalar(value)}")
    return "\n".join(out) + "\n"


def render_pyproject(current: str) -> str:
    """``current`` with its ``[tool.flwr.app.config]`` table replaced (up to the next table)."""
    start = current.index(_TABLE)
    end = current.find("\n[", start + len(_TABLE))
    end = len(current) if end < 0 else end + 1
    table = [_TABLE, PYPROJECT_HEADER.rstrip("\n")]
    table += [f"{kebab(name)} = {_scalar(value)}" for name, value in defaults().items()]
    return current[:start] + "\n".join(table) + "\n" + ("\n" if end < len(current) else "") + current[end:]


def render_config_md(current: str) -> str:
    """``current`` with the rows of its key table replaced (the table ends at the first blank line)."""
    start = current.index(_MD_HEADER) + len(_MD_HEADER)
    end = current.index("\n\n", start) + 1
    docs = field_docs()
    rows = [f"| `{kebab(name)}` | {md_default(value)} | {docs[name]} |" for name, value in defaults().items()]
    return current[:start] + "\n".join(rows) + "\n" + current[end:]


def rendered() -> dict[Path, str]:
    """Every generated home: path -> the text it must have."""
    out = {path: render_yaml() for path in YAML_HOMES}
    out[PYPROJECT] = render_pyproject(PYPROJECT.read_text())
    out[CONFIG_MD] = render_config_md(CONFIG_MD.read_text())
    return out


def stale() -> list[Path]:
    """The homes whose text differs from what the dataclass generates."""
    return [path for path, text in rendered().items() if not path.exists() or path.read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m specfed_flwr.config_homes", description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite every home from SpecFedConfig")
    parser.add_argument("--check", action="store_true", help="exit 1 if a home differs (the default)")
    args = parser.parse_args(argv)
    if args.write:
        for path, text in rendered().items():
            if not path.exists() or path.read_text() != text:
                path.write_text(text)
                print(f"wrote {path.relative_to(ROOT)}")
        return 0
    differ = stale()
    for path in differ:
        print(f"{path.relative_to(ROOT)} differs from SpecFedConfig (run with --write)", file=sys.stderr)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
