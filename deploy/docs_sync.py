"""Keep generated parts of the docs in step with the code (`make docs`).

Today one part: the configuration table of docs/configuration.md, rendered from the
settings classes by deploy/config_doc.py between the `config-table` markers.
"""

from __future__ import annotations

import re

from deploy.config_doc import table
from deploy.settings import REPO_ROOT

CONFIGURATION_DOC = REPO_ROOT / "docs" / "configuration.md"
_BLOCK = re.compile(r"(<!-- config-table:start -->\n).*?(<!-- config-table:end -->)", re.S)


def rendered(text: str) -> str:
    return _BLOCK.sub(lambda m: m.group(1) + table() + m.group(2), text)


if __name__ == "__main__":
    CONFIGURATION_DOC.write_text(
        rendered(CONFIGURATION_DOC.read_text(encoding="utf-8")), encoding="utf-8"
    )
