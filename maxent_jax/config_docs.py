"""Generate docs/configuration.md from config.py itself, so the field reference cannot drift.

Each `c.section.field = default  # note` line of `get_base_config()` (with any comment lines just
above it) becomes a table row. `python -m maxent_jax.config_docs` rewrites the page; a test fails
when the committed page differs from what this produces.
"""

from __future__ import annotations

import inspect
import pathlib
import re
import sys

from maxent_jax import config as config_lib

_ASSIGN = re.compile(r"^\s*c\.(?P<path>[a-z_][\w.]*)\s*=\s*(?P<value>.*?)\s*(?:#\s*(?P<note>.*))?$")
_COMMENT = re.compile(r"^\s*#\s?(?P<text>.*)$")
PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "configuration.md"

HEADER = """# Configuration reference

Generated from `maxent_jax/config.py` by `python -m maxent_jax.config_docs`; do not edit by hand.

Every run starts from `get_base_config()`; a config file (`--config=configs/X.py`) changes fields,
and `--config.SECTION.FIELD=VALUE` overrides one on the command line. Reference (TRL/maxent-grpo)
field names map by prefix: `maxent_tau` -> `maxent.tau`, `info_seed_num_seeds` ->
`info_seed.num_seeds`, `controller_meta_lr` -> `controller_meta.lr`, `vllm_url` -> `vllm.url`,
`gen_temperature` -> `rollout.temperature`, `init_kl_coeff`/`beta` -> `objective.beta`.
An invalid value stops the run before any compute with one line naming the field (exit code 2).
"""


def _rows() -> list[tuple[str, str, str]]:
    source = inspect.getsource(config_lib.get_base_config).splitlines()
    defaults = config_lib.get_base_config()
    rows, pending = [], []
    for line in source:
        comment = _COMMENT.match(line)
        if comment:
            pending.append(comment.group("text").strip())
            continue
        assign = _ASSIGN.match(line)
        if not assign:
            pending = []
            continue
        path = assign.group("path")
        if assign.group("value") == "ml_collections.ConfigDict()":  # a section header
            pending = []
            continue
        node = defaults
        for part in path.split("."):
            node = node[part]
        if hasattr(node, "keys"):  # a section, or a nested group of fields
            for key in node.keys():
                rows.append((f"{path}.{key}", repr(node[key]), " ".join(pending)))
        else:
            note = " ".join([*pending, assign.group("note") or ""]).strip()
            rows.append((path, repr(node), note))
        pending = []
    return rows


def render() -> str:
    out = [HEADER]
    section = None
    for path, default, note in _rows():
        top = path.split(".")[0] if "." in path else "top level"
        if top != section:
            section = top
            out += ["", f"## `{section}`" if section != "top level" else "## top level", "",
                    "| field | default | notes |", "|---|---|---|"]
        out.append(f"| `{path}` | `{default}` | {note.replace('|', '/')} |")
    return "\n".join(out) + "\n"


def main() -> None:
    PAGE.write_text(render())
    print(f"wrote {PAGE}", file=sys.stderr)


if __name__ == "__main__":
    main()
