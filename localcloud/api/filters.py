"""A subset of the Logging query language, evaluated against JSON documents.

Cloud Logging, log-based metrics and the list filters of other Google APIs share this
grammar (https://cloud.google.com/logging/docs/view/logging-query-language):

- comparisons `field OP value` on dotted field paths, with OP one of `=`, `!=`, `<`,
  `<=`, `>`, `>=`, `:` (has), `=~` and `!~` (regular expression);
- values as quoted strings or bare words, `field:*` to test presence, and value lists
  such as `severity = (ERROR OR CRITICAL)`;
- `NOT` (or a leading `-`), `AND`, `OR` and parentheses, with AND implied between terms.
  OR binds tighter than AND, so `a AND b OR c` means `a AND (b OR c)`;
- a bare value (a global restriction) matches any string field that contains it;
- the function `log_id("NAME")`.

String comparisons ignore case, as in Cloud Logging; regular expressions do not.
`severity` compares by level order, and RFC 3339 strings compare as instants.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from localcloud.rpc import invalid_argument

# Cloud Logging rejects queries longer than 20,000 characters.
MAX_FILTER_LENGTH = 20_000

SEVERITY_LEVELS = {
    "DEFAULT": 0,
    "DEBUG": 100,
    "INFO": 200,
    "NOTICE": 300,
    "WARNING": 400,
    "ERROR": 500,
    "CRITICAL": 600,
    "ALERT": 700,
    "EMERGENCY": 800,
}

COMPARISON_OPERATORS = ("=", "!=", "<", "<=", ">", ">=", ":", "=~", "!~")
_SPECIAL_CHARACTERS = set('()"=!<>:~ \t\r\n')
_FRACTION = re.compile(r"(\.\d{6})\d+")

Document = dict[str, Any]
FieldNormalizer = Callable[[list[str]], list[str]]


class FilterSyntaxError(ValueError):
    def __init__(self, text: str, position: int, problem: str) -> None:
        super().__init__(f"{problem} at position {position}")
        self.text = text
        self.position = position
        self.problem = problem


@dataclass(frozen=True)
class Token:
    kind: str  # "word", "string", "op", "(", ")", "AND", "OR", "NOT", "end"
    text: str
    start: int
    end: int


def _tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char.isspace():
            index += 1
            continue
        start = index
        if char in "()":
            tokens.append(Token(char, char, start, start + 1))
            index += 1
        elif char == '"':
            index, value = _read_string(text, index)
            tokens.append(Token("string", value, start, index))
        elif text.startswith(("!=", "<=", ">=", "=~", "!~"), index):
            tokens.append(Token("op", text[index : index + 2], start, start + 2))
            index += 2
        elif char in "=<>:":
            tokens.append(Token("op", char, start, start + 1))
            index += 1
        elif char == "-" and _starts_term(tokens) and index + 1 < len(text):
            # A leading minus negates the term that follows, like NOT.
            tokens.append(Token("NOT", "-", start, start + 1))
            index += 1
        elif char in _SPECIAL_CHARACTERS:
            raise FilterSyntaxError(text, start, f"unexpected character {char!r}")
        else:
            while index < len(text) and text[index] not in _SPECIAL_CHARACTERS:
                index += 1
            word = text[start:index]
            kind = word if word in ("AND", "OR", "NOT") else "word"
            tokens.append(Token(kind, word, start, index))
    tokens.append(Token("end", "", len(text), len(text)))
    return tokens


def _starts_term(tokens: list[Token]) -> bool:
    return not tokens or tokens[-1].kind in (
        "(",
        "AND",
        "OR",
        "NOT",
        "word",
        "string",
        ")",
    )


def _read_string(text: str, index: int) -> tuple[int, str]:
    chars: list[str] = []
    position = index + 1
    while position < len(text):
        char = text[position]
        if char == "\\" and position + 1 < len(text):
            chars.append(text[position + 1])
            position += 2
        elif char == '"':
            return position + 1, "".join(chars)
        else:
            chars.append(char)
            position += 1
    raise FilterSyntaxError(text, index, "unterminated quoted string")


# Expression nodes. Each is a callable taking a document and returning a bool.
Predicate = Callable[[Document], bool]


@dataclass(frozen=True)
class Filter:
    """A parsed filter; an empty filter matches every document."""

    text: str
    predicate: Predicate

    def matches(self, document: Document) -> bool:
        return self.predicate(document)


def parse(text: str, normalize_field: FieldNormalizer | None = None) -> Filter:
    """Parse `text` or raise FilterSyntaxError with the position of the problem."""
    if len(text) > MAX_FILTER_LENGTH:
        raise FilterSyntaxError(
            text,
            MAX_FILTER_LENGTH,
            f"filter longer than {MAX_FILTER_LENGTH} characters",
        )
    if not text.strip():
        return Filter(text, lambda document: True)
    parser = _Parser(text, _tokenize(text), normalize_field or (lambda parts: parts))
    predicate = parser.parse_query()
    return Filter(text, predicate)


def parse_or_reject(
    text: str, field: str = "filter", normalize_field: FieldNormalizer | None = None
) -> Filter:
    """Parse `text` or reject the request with INVALID_ARGUMENT naming the position."""
    try:
        return parse(text, normalize_field)
    except FilterSyntaxError as exc:
        invalid_argument(
            f"{field} {text!r} is invalid: {exc.problem} at position {exc.position}. "
            "Write comparisons as FIELD OPERATOR VALUE, quote values that contain "
            "special characters, and write AND, OR and NOT in capitals."
        )


class _Parser:
    def __init__(
        self, text: str, tokens: list[Token], normalize: FieldNormalizer
    ) -> None:
        self.text = text
        self.tokens = tokens
        self.index = 0
        self.normalize = normalize

    @property
    def token(self) -> Token:
        return self.tokens[self.index]

    def advance(self) -> Token:
        token = self.tokens[self.index]
        self.index += 1
        return token

    def fail(self, problem: str, token: Token | None = None) -> FilterSyntaxError:
        position = (token or self.token).start
        return FilterSyntaxError(self.text, position, problem)

    def parse_query(self) -> Predicate:
        predicate = self.parse_conjunction()
        if self.token.kind != "end":
            raise self.fail(f"unexpected {self.token.text!r}")
        return predicate

    def parse_conjunction(self) -> Predicate:
        terms = [self.parse_disjunction()]
        while self.token.kind not in (")", "end"):
            if self.token.kind == "AND":
                self.advance()
            terms.append(self.parse_disjunction())
        if len(terms) == 1:
            return terms[0]
        return lambda document: all(term(document) for term in terms)

    def parse_disjunction(self) -> Predicate:
        terms = [self.parse_unary()]
        while self.token.kind == "OR":
            self.advance()
            terms.append(self.parse_unary())
        if len(terms) == 1:
            return terms[0]
        return lambda document: any(term(document) for term in terms)

    def parse_unary(self) -> Predicate:
        if self.token.kind == "NOT":
            self.advance()
            operand = self.parse_unary()
            return lambda document: not operand(document)
        return self.parse_primary()

    def parse_primary(self) -> Predicate:
        token = self.token
        if token.kind == "(":
            self.advance()
            inner = self.parse_conjunction()
            self.expect(")")
            return inner
        following = self.tokens[self.index + 1]
        if (
            token.kind == "word"
            and following.kind == "("
            and following.start == token.end
        ):
            # A word directly followed by "(" is a function call such as log_id("x").
            return self.parse_function()
        if token.kind in ("word", "string"):
            self.advance()
            if self.token.kind == "op":
                if token.kind == "string":
                    raise self.fail("a field name must not be quoted", token)
                return self.parse_comparison(token)
            return _global_restriction(token.text)
        raise self.fail(f"expected a comparison or a value, found {_describe(token)}")

    def parse_function(self) -> Predicate:
        name = self.advance()
        self.expect("(")
        argument = self.advance()
        if argument.kind != "string":
            raise self.fail("expected a quoted argument", argument)
        self.expect(")")
        if name.text != "log_id":
            raise self.fail(f"unsupported function {name.text!r}", name)
        suffix = "/logs/" + urllib.parse.quote(argument.text, safe="")
        return lambda document: str(document.get("logName", "")).endswith(suffix)

    def parse_comparison(self, field: Token) -> Predicate:
        operator = self.advance().text
        path = self.normalize(field.text.split("."))
        if any(not part for part in path):
            raise self.fail(f"invalid field path {field.text!r}", field)
        values = self.parse_values(operator)
        return lambda document: values(_resolve(document, path), path, operator)

    def parse_values(self, operator: str) -> Callable[[Any, list[str], str], bool]:
        token = self.token
        if token.kind == "(":
            self.advance()
            combined = self.parse_value_list(operator)
            self.expect(")")
            return combined
        if token.kind in ("word", "string"):
            self.advance()
            literal = token.text
            if literal == "*" and token.kind == "word" and operator != ":":
                raise self.fail("the presence test * works only with ':'", token)
            return lambda value, path, op: _compare(
                value, path, op, literal, token.kind
            )
        raise self.fail(
            f"expected a value after {operator!r}, found {_describe(token)}"
        )

    def parse_value_list(self, operator: str) -> Callable[[Any, list[str], str], bool]:
        alternatives = [self.parse_values(operator)]
        joiner = ""
        while self.token.kind in ("OR", "AND"):
            word = self.advance().kind
            if joiner and word != joiner:
                raise self.fail("mix of AND and OR in a value list; add parentheses")
            joiner = word
            alternatives.append(self.parse_values(operator))
        if joiner == "AND":
            return lambda value, path, op: all(
                alt(value, path, op) for alt in alternatives
            )
        return lambda value, path, op: any(alt(value, path, op) for alt in alternatives)

    def expect(self, kind: str) -> None:
        if self.token.kind != kind:
            raise self.fail(f"expected {kind!r}, found {_describe(self.token)}")
        self.advance()


def _describe(token: Token) -> str:
    return "the end of the filter" if token.kind == "end" else repr(token.text)


_MISSING = object()


def _resolve(document: Any, path: list[str]) -> Any:
    value = document
    for part in path:
        if isinstance(value, dict) and part in value:
            value = value[part]
        else:
            return _MISSING
    return value


def _global_restriction(literal: str) -> Predicate:
    needle = literal.lower()
    return lambda document: _contains_text(document, needle)


def _contains_text(value: Any, needle: str) -> bool:
    if isinstance(value, dict):
        return any(_contains_text(item, needle) for item in value.values())
    if isinstance(value, list):
        return any(_contains_text(item, needle) for item in value)
    return needle in _as_text(value).lower()


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _compare(
    value: Any, path: list[str], operator: str, literal: str, kind: str
) -> bool:
    # NOTE: a missing field fails every comparison, `!=` included; only NOT matches
    # documents that lack the field.
    if value is _MISSING:
        return False
    if operator == ":" and literal == "*" and kind == "word":
        return True
    if isinstance(value, list):
        return any(_compare(item, path, operator, literal, kind) for item in value)
    if operator == ":":
        if isinstance(value, dict):
            return _contains_text(value, literal.lower())
        return literal.lower() in _as_text(value).lower()
    if operator in ("=~", "!~"):
        try:
            found = re.search(literal, _as_text(value)) is not None
        except re.error:
            return False
        return found if operator == "=~" else not found
    if isinstance(value, dict):
        return False
    order = _order(value, literal, path)
    if order is None:
        return operator == "!="
    return {
        "=": order == 0,
        "!=": order != 0,
        "<": order < 0,
        "<=": order <= 0,
        ">": order > 0,
        ">=": order >= 0,
    }[operator]


def _order(value: Any, literal: str, path: list[str]) -> int | None:
    """Return -1, 0 or 1 as `value` sorts before, equal to or after `literal`.

    None means the two cannot be compared (for example a number and a word).
    """
    if path[-1] == "severity" and len(path) == 1:
        left_rank = _severity_rank(_as_text(value))
        right_rank = _severity_rank(literal)
        if left_rank is None or right_rank is None:
            return None
        return _sign(left_rank - right_rank)
    if isinstance(value, bool):
        return 0 if _as_text(value) == literal.lower() else None
    if isinstance(value, int | float):
        try:
            return _sign(float(value) - float(literal))
        except ValueError:
            return None
    text = _as_text(value)
    left_time, right_time = parse_time(text), parse_time(literal)
    if left_time is not None and right_time is not None:
        return _sign((left_time - right_time).total_seconds())
    left, right = text.lower(), literal.lower()
    return (left > right) - (left < right)


def _severity_rank(text: str) -> int | None:
    upper = text.upper()
    if upper in SEVERITY_LEVELS:
        return SEVERITY_LEVELS[upper]
    try:
        return int(text)
    except ValueError:
        return None


def parse_time(text: str) -> datetime | None:
    """Parse an RFC 3339 timestamp with a zone, or return None for any other text."""
    if len(text) < 10 or not text[:4].isdigit() or text[4] != "-":
        return None
    try:
        parsed = datetime.fromisoformat(
            _FRACTION.sub(r"\1", text.replace("Z", "+00:00"))
        )
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def _sign(number: float) -> int:
    return (number > 0) - (number < 0)
