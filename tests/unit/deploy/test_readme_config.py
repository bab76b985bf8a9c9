from __future__ import annotations

from deploy.config_doc import table
from deploy.readme_sync import README, rendered
from deploy.settings import StackSettings
from producers.settings import ProducerSettings


def test_readme_configuration_table_matches_the_settings() -> None:
    text = README.read_text(encoding="utf-8")
    assert rendered(text) == text, "run `make docs` to regenerate the README's table"


def test_every_setting_is_documented() -> None:
    doc = table()
    for cls in (StackSettings, ProducerSettings):
        for name in cls.model_fields:
            assert f"`TALLY_{name.upper()}`" in doc
