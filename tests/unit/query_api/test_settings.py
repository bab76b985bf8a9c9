"""TALLY_ADMIN_KEY: a placeholder or a typed pattern stops the API instead of opening it."""

from __future__ import annotations

import random
import string
from pathlib import Path

import pytest
from pydantic import ValidationError

from query_api.settings import ApiSettings, admin_key_problem
from schemas.settings import load

EXAMPLES = Path(__file__).resolve().parents[3] / "deploy"
URLSAFE = string.ascii_letters + string.digits + "-_"


def example_value(path: Path, name: str) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith(f"{name}="):
            return line.split("=", 1)[1]
    raise AssertionError(f"{path} sets no {name}")


def test_the_k8s_example_placeholder_is_refused_with_how_to_generate_one() -> None:
    placeholder = example_value(EXAMPLES / "k8s" / "secrets.env.example", "TALLY_ADMIN_KEY")
    assert placeholder  # an empty value would be refused for its length alone
    with pytest.raises(ValidationError) as refused:
        ApiSettings(admin_key=placeholder)
    assert "placeholder" in str(refused.value)
    assert "secrets.token_urlsafe(32)" in str(refused.value)


@pytest.mark.parametrize(
    ("key", "why"),
    [
        # the 29-character placeholder the example file shipped, accepted until now
        ("CHANGE-ME-openssl-rand-hex-24", "placeholder"),
        ("replace-me-with-a-random-admin-key", "placeholder"),
        ("https://example.com/admin-key-goes-here", "placeholder"),
        ("xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx", "placeholder"),
        ("k" * 40, "distinct"),
        ("abab" * 10, "distinct"),
        ("0123456789abcdefghijklm", "at least 24"),
    ],
)
def test_weak_admin_keys_are_refused(key: str, why: str) -> None:
    problem = admin_key_problem(key)
    assert problem is not None
    assert why in problem
    with pytest.raises(ValidationError):
        ApiSettings(admin_key=key)


def test_random_keys_of_either_recipe_pass() -> None:
    rng = random.Random(20)  # seeded: the same keys every run
    for _ in range(2_000):
        urlsafe = "".join(rng.choices(URLSAFE, k=43))  # secrets.token_urlsafe(32)
        hexed = "".join(rng.choices("0123456789abcdef", k=48))  # openssl rand -hex 24
        assert admin_key_problem(urlsafe) is None, urlsafe
        assert admin_key_problem(hexed) is None, hexed
    assert ApiSettings(admin_key="0123456789abcdef" * 2).admin_key is not None
    assert ApiSettings().admin_key is None  # unset: no admin key at all


def test_a_refused_key_is_not_echoed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    secret_looking = "My-Own-Change-Of-Heart-2026-07"
    monkeypatch.setenv("TALLY_ADMIN_KEY", secret_looking)
    monkeypatch.setenv("TALLY_API_PORT", "99999")
    with pytest.raises(SystemExit):
        load(ApiSettings)
    err = capsys.readouterr().err
    assert "TALLY_ADMIN_KEY: " in err
    assert "token_urlsafe" in err
    assert secret_looking not in err
    assert "(got '99999')" in err or "(got 99999)" in err  # other inputs still shown
