from __future__ import annotations

from deploy.config_doc import table
from deploy.docs_sync import CONFIGURATION_DOC, rendered
from deploy.settings import StackSettings
from producers.settings import ProducerSettings


def test_configuration_table_matches_the_settings() -> None:
    text = CONFIGURATION_DOC.read_text(encoding="utf-8")
    assert "<!-- config-table:start -->" in text, "docs/configuration.md lost its table markers"
    assert rendered(text) == text, "run `make docs` to regenerate docs/configuration.md's table"


def test_every_setting_is_documented() -> None:
    doc = table()
    for cls in (StackSettings, ProducerSettings):
        for name in cls.model_fields:
            assert f"`TALLY_{name.upper()}`" in doc
