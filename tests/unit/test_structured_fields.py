"""The tests' own RFC 9651 List parser (tests/structured_fields.py) judges as the RFC
does: the RFC's examples parse to what it says, and what it says to fail fails. The
integration tests trust it to check the §7 rate-limit fields, so it is checked here."""

from __future__ import annotations

import pytest

from tests.structured_fields import InnerList, Item, SFError, Token, parse_list


def test_the_contract_example_parses_to_named_policies_with_parameters() -> None:
    policy = parse_list('"minute";q=300;w=60, "streams";q=10;qu="concurrent-requests"')
    assert policy == [
        Item("minute", {"q": 300, "w": 60}),
        Item("streams", {"q": 10, "qu": "concurrent-requests"}),
    ]
    # Names are sf-strings, not tokens.
    assert not any(isinstance(item.value, Token) for item in policy)


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("sugar, tea, rum", [Item(Token("sugar")), Item(Token("tea")), Item(Token("rum"))]),
        ('"foo";a=1;b=2, bar', [Item("foo", {"a": 1, "b": 2}), Item(Token("bar"))]),
        ("abc;a=1;b=2; cde_456", [Item(Token("abc"), {"a": 1, "b": 2, "cde_456": True})]),
        (
            '("foo" "bar"), ("baz"), ("bat" "one"), ()',
            [
                InnerList([Item("foo"), Item("bar")]),
                InnerList([Item("baz")]),
                InnerList([Item("bat"), Item("one")]),
                InnerList([]),
            ],
        ),
        ("-4.5, 0.002, ?0, :cHJldGVuZCB0aGlzIGlzIGJpbmFyeSBjb250ZW50Lg==:", None),
        ('"a\\"b\\\\c"', [Item('a"b\\c')]),
        ("a;x=1;x=2", [Item(Token("a"), {"x": 2})]),
        ("  1 ,\t2  ", [Item(1), Item(2)]),
        ("", []),
    ],
)
def test_rfc_examples_parse(field: str, expected: list[Item | InnerList] | None) -> None:
    parsed = parse_list(field)
    if expected is not None:
        assert parsed == expected
    else:
        assert [item.value for item in parsed if isinstance(item, Item)] == [
            -4.5,
            0.002,
            False,
            b"pretend this is binary content.",
        ]


@pytest.mark.parametrize(
    "field",
    [
        '"minute";q=300,',  # trailing comma
        '"minute";q=300,,"streams"',
        '"minute" "streams"',  # members are separated by commas
        '"minute";Q=300',  # keys are lowercase
        '"minute";q=300 ;w=60',  # no space before a parameter's ';'
        '"minute";q=',  # a value after '='
        '"minute";q=1.2345',  # at most three fractional digits
        '"minute";q=1.',
        '"minute";q=1234567890123456',  # at most 15 integer digits
        '"minute',  # unterminated string
        '"a\\n"',  # only \\" and \\\\ escape
        "'minute'",  # no single-quoted strings
        "minute;q=300\n",
        "(a b",  # unterminated inner list
        "?2",
        ":not base64!:",
        "\u00e9",  # not ASCII
    ],
)
def test_what_the_rfc_rejects_is_rejected(field: str) -> None:
    with pytest.raises(SFError):
        parse_list(field.encode("utf-8"))
