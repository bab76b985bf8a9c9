"""Keep generated parts of README.md in step with the code (`make docs`)."""

from __future__ import annotations

import re

from deploy.config_doc import table
from deploy.settings import REPO_ROOT

README = REPO_ROOT / "README.md"
_BLOCK = re.compile(r"(<!-- config-table:start -->\n).*?(<!-- config-table:end -->)", re.S)


def rendered(text: str) -> str:
    return _BLOCK.sub(lambda m: m.group(1) + table() + m.group(2), text)


if __name__ == "__main__":
    README.write_text(rendered(README.read_text(encoding="utf-8")), encoding="utf-8")
