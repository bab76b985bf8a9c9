"""A strict parser for RFC 9651 structured-field Lists, written for the tests from
the RFC's parsing algorithms (§4.2), independently of the library Tally serializes
with (http-sf): a header that only that library's own parser would accept fails here.

Only what the §7 rate-limit fields need to be read is public (`parse_list`), but the
whole List grammar is followed, inner lists and every bare-item type included, so a
field is judged as any conforming recipient would judge it. Anything the RFC says
to fail on raises `SFError`.
"""

from __future__ import annotations

import base64
import string
from dataclasses import dataclass, field
from datetime import UTC, datetime

_LCALPHA = string.ascii_lowercase
_DIGIT = string.digits
_ALPHA = string.ascii_letters
# RFC 9110 tchar
_TCHAR = frozenset("!#$%&'*+-.^_`|~" + _DIGIT + _ALPHA)
_KEY_CHARS = frozenset(_LCALPHA + _DIGIT + "_-.*")
_BASE64 = frozenset(string.ascii_letters + _DIGIT + "+/=")
_LOWER_HEX = frozenset("0123456789abcdef")


class SFError(ValueError):
    """The input is not a valid structured field of the asked-for type."""


class Token(str):
    """An sf-token, told apart from an sf-string."""


@dataclass(frozen=True)
class DisplayString:
    value: str


BareItem = int | float | str | Token | bytes | bool | datetime | DisplayString
Params = dict[str, BareItem]


@dataclass(frozen=True)
class Item:
    value: BareItem
    params: Params = field(default_factory=dict)


@dataclass(frozen=True)
class InnerList:
    items: list[Item]
    params: Params = field(default_factory=dict)


class _Input:
    def __init__(self, text: str) -> None:
        self.text = text
        self.at = 0

    def empty(self) -> bool:
        return self.at >= len(self.text)

    def peek(self) -> str:
        return "" if self.empty() else self.text[self.at]

    def take(self) -> str:
        if self.empty():
            raise SFError("unexpected end of input")
        char = self.text[self.at]
        self.at += 1
        return char

    def skip(self, chars: str) -> None:
        while not self.empty() and self.text[self.at] in chars:
            self.at += 1


def parse_list(raw: str | bytes) -> list[Item | InnerList]:
    """RFC 9651 §4.2 for a field of type List (one field line, or lines joined by ", ")."""
    data = raw.encode("latin-1") if isinstance(raw, str) else raw
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise SFError("not ASCII") from None
    src = _Input(text)
    src.skip(" ")
    members = _list(src)
    src.skip(" ")
    if not src.empty():
        raise SFError(f"trailing characters at {src.at}: {text[src.at :]!r}")
    return members


def _list(src: _Input) -> list[Item | InnerList]:  # §4.2.1
    members: list[Item | InnerList] = []
    while not src.empty():
        members.append(_inner_list(src) if src.peek() == "(" else _item(src))
        src.skip(" \t")
        if src.empty():
            return members
        if src.take() != ",":
            raise SFError(f"expected ',' at {src.at - 1}")
        src.skip(" \t")
        if src.empty():
            raise SFError("trailing comma")
    return members


def _inner_list(src: _Input) -> InnerList:  # §4.2.1.2
    src.take()
    items: list[Item] = []
    while not src.empty():
        src.skip(" ")
        if src.peek() == ")":
            src.take()
            return InnerList(items, _params(src))
        items.append(_item(src))
        if src.peek() not in (" ", ")"):
            raise SFError(f"expected ' ' or ')' at {src.at}")
    raise SFError("unterminated inner list")


def _item(src: _Input) -> Item:  # §4.2.3
    return Item(_bare_item(src), _params(src))


def _params(src: _Input) -> Params:  # §4.2.3.2
    params: Params = {}
    while src.peek() == ";":
        src.take()
        src.skip(" ")
        key = _key(src)
        value: BareItem = True
        if src.peek() == "=":
            src.take()
            value = _bare_item(src)
        params[key] = value  # a repeated key keeps its place, takes the last value
    return params


def _key(src: _Input) -> str:  # §4.2.3.3
    if src.peek() == "" or src.peek() not in _LCALPHA + "*":
        raise SFError(f"a key must start with a lowercase letter or '*' at {src.at}")
    key = ""
    while not src.empty() and src.peek() in _KEY_CHARS:
        key += src.take()
    return key


def _bare_item(src: _Input) -> BareItem:  # §4.2.3.1
    first = src.peek()
    if first == "-" or (first != "" and first in _DIGIT):
        return _number(src)
    if first == '"':
        return _string(src)
    if first == "*" or (first != "" and first in _ALPHA):
        return _token(src)
    if first == ":":
        return _bytes(src)
    if first == "?":
        return _boolean(src)
    if first == "@":
        src.take()
        seconds = _number(src)
        if not isinstance(seconds, int):
            raise SFError("a date is an integer")
        return datetime.fromtimestamp(seconds, UTC)
    if first == "%":
        return _display_string(src)
    raise SFError(f"no bare item starts with {first!r} (at {src.at})")


def _number(src: _Input) -> int | float:  # §4.2.4
    sign = 1
    if src.peek() == "-":
        src.take()
        sign = -1
    if src.peek() == "" or src.peek() not in _DIGIT:
        raise SFError(f"expected a digit at {src.at}")
    digits, decimal = "", False
    while not src.empty():
        char = src.peek()
        if char in _DIGIT:
            digits += src.take()
        elif char == "." and not decimal:
            if len(digits) > 12:
                raise SFError("more than 12 integer digits in a decimal")
            digits += src.take()
            decimal = True
        else:
            break
        if not decimal and len(digits) > 15:
            raise SFError("an integer has at most 15 digits")
        if decimal and len(digits) > 16:
            raise SFError("a decimal has at most 16 characters")
    if not decimal:
        return sign * int(digits)
    fraction = digits.split(".")[1]
    if not fraction or len(fraction) > 3:
        raise SFError("a decimal has 1 to 3 fractional digits")
    return sign * float(digits)


def _string(src: _Input) -> str:  # §4.2.5
    src.take()
    out = ""
    while not src.empty():
        char = src.take()
        if char == "\\":
            escaped = src.take()
            if escaped not in ('"', "\\"):
                raise SFError(f"bad escape \\{escaped}")
            out += escaped
        elif char == '"':
            return out
        elif not " " <= char <= "~":
            raise SFError(f"{char!r} is not allowed in a string")
        else:
            out += char
    raise SFError("unterminated string")


def _token(src: _Input) -> Token:  # §4.2.6
    out = src.take()
    while not src.empty() and (src.peek() in _TCHAR or src.peek() in ":/"):
        out += src.take()
    return Token(out)


def _bytes(src: _Input) -> bytes:  # §4.2.7
    src.take()
    encoded = ""
    while True:
        char = src.take()
        if char == ":":
            break
        if char not in _BASE64:
            raise SFError(f"{char!r} is not base64")
        encoded += char
    try:
        return base64.b64decode(encoded, validate=True)
    except ValueError:
        raise SFError("invalid base64") from None


def _boolean(src: _Input) -> bool:  # §4.2.8
    src.take()
    char = src.take()
    if char not in "01":
        raise SFError("a boolean is ?0 or ?1")
    return char == "1"


def _display_string(src: _Input) -> DisplayString:  # §4.2.10
    src.take()
    if src.take() != '"':
        raise SFError('a display string is %"..."')
    out = bytearray()
    while True:
        char = src.take()
        if not " " <= char <= "~":
            raise SFError(f"{char!r} is not allowed in a display string")
        if char == '"':
            try:
                return DisplayString(out.decode("utf-8"))
            except UnicodeDecodeError:
                raise SFError("a display string is UTF-8") from None
        if char == "%":
            octet = src.take() + src.take()
            if not set(octet) <= _LOWER_HEX:
                raise SFError("percent-encoding in a display string is lowercase hex")
            out.append(int(octet, 16))
        else:
            out += char.encode("ascii")
