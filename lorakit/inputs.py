"""Checks of user-supplied text that need no model: regular expressions, prompt
templates and paths. Imports nothing heavy, like the config schema that uses them."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from lorakit.errors import InputError


def _has_branch(parsed, c) -> bool:
    for op, arg in parsed:
        if op == c.BRANCH:
            return True
        nodes = arg if isinstance(arg, (list, tuple)) else ()
        for node in nodes:
            if hasattr(node, "data") or isinstance(node, list):
                if _has_branch(node, c):
                    return True
    return False


def _unbounded_repeats(parsed) -> tuple[int, bool]:
    """(how many unbounded repeats, whether one of them nests a repeat or an alternation)."""
    from re import _constants as c  # the parser's own opcodes

    count, nested = 0, False
    for op, arg in parsed:
        children = []
        if op in (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", None)):
            low, high, sub = arg
            inner, inner_nested = _unbounded_repeats(sub)
            risky = inner > 0 or _has_branch(sub, c)
            if high == c.MAXREPEAT:
                count += 1
                nested = nested or risky or inner_nested
            count, nested = count + inner, nested or inner_nested
            continue
        if op == c.SUBPATTERN:
            children = [arg[-1]]
        elif op == c.BRANCH:
            children = arg[1]
        elif op in (c.ASSERT, c.ASSERT_NOT):
            children = [arg[1]]
        elif op in (c.GROUPREF, c.GROUPREF_EXISTS):
            nested = True  # backreferences can backtrack without bound
        for child in children:
            n, bad = _unbounded_repeats(child)
            count, nested = count + n, nested or bad
    return count, nested


def check_regex(pattern: str) -> str:
    """``pattern`` if it is a valid regex that matches module paths in bounded time.

    Patterns may come from downloaded adapter files, and Python's regex engine can take
    exponential time on nested repeats (``(a+)+``) or backreferences: those, and more
    than three unbounded repeats, are refused.

    Raises:
        ValueError: naming what is wrong with the pattern.
    """
    from re import _parser

    if len(pattern) > 1000:
        raise ValueError(f"regular expression of {len(pattern)} characters: at most 1000")
    try:
        parsed = _parser.parse(pattern)
    except re.error as e:
        raise ValueError(f"{pattern!r} is not a valid regular expression: {e}") from None
    count, nested = _unbounded_repeats(parsed)
    if nested or count > 3:
        raise ValueError(f"{pattern!r}: nested or many unbounded repeats (or backreferences) can make matching "
                         "take practically forever; simplify the regular expression")
    return pattern


def template_fields(template: str) -> list[str]:
    """The row fields a prompt template names, in order.

    Only plain ``{field}`` placeholders are allowed (``{{`` and ``}}`` are literal braces):
    positional ``{0}``, attribute ``{a.b}`` and index ``{a[0]}`` access and conversions
    (``{a!r}``) are refused, so a template can read a row's fields as text and nothing else.

    Raises:
        ValueError: naming the bad placeholder.
    """
    import string

    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"{e} (write {{{{ and }}}} for literal braces)") from None
    names = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name or name.isdigit() or any(c in name for c in ".[]"):
            raise ValueError(f"placeholder {{{name}}} is not a field name: use {{field}} with a column of the data")
        if conversion:  # !r would train Python's repr: quotes and escapes around the text
            raise ValueError(f"placeholder {{{name}!{conversion}}} converts the field; write {{{name}}}")
        if spec and "{" in spec:
            raise ValueError(f"placeholder {{{name}:{spec}}} nests another placeholder")
        names.append(name)
    return names


# Extensions of files lorakit reads; a name with one of them is a path, not a hub id.
_FILE_EXTENSIONS = {".json", ".jsonl", ".csv", ".parquet", ".gguf", ".yaml", ".yml", ".safetensors", ".bin",
                    ".pt", ".txt", ".arrow"}


def looks_local(name: str) -> bool:
    """True when ``name`` can only mean a local path: ``./x``, ``../x``, ``/x``, ``~/x``, a
    name with a file extension, more than one ``/``, or one whose parent directory exists.
    Anything else may be a hub id (``org/name``), for users with a network."""
    path = Path(name).expanduser()
    return (
        name.startswith((".", "/", "~"))
        or path.suffix.lower() in _FILE_EXTENSIONS
        or name.count("/") > 1
        or ("/" in name and path.parent.is_dir() and str(path.parent) not in (".", ""))
    )


def missing_path(name: str) -> str | None:
    """``"no such file or directory: NAME"`` for a local-looking path that does not exist."""
    if name and looks_local(name) and not Path(name).expanduser().exists():
        return f"no such file or directory: {name!r} (from {os.getcwd()})"
    return None


class DuplicateKey(ValueError):
    """A JSON object that gives one key twice (``args[0]`` is the key)."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise DuplicateKey(key)
        seen[key] = value
    return seen


# JSON allows an object to repeat a key and parsers differ on which value counts (Python's
# keeps the last): an input that says two things is refused instead.
_STRICT = json.JSONDecoder(object_pairs_hook=_unique_keys)
# Data rows are text to train on: a number keeps the digits the file wrote (1.10 stays
# "1.10", 1e5 stays "1e5", no float rounding of long decimals).
_STRICT_TEXT = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_float=str, parse_int=str, parse_constant=str)


def strict_json(text: str, numbers_as_text: bool = False) -> object:
    """``json.loads`` that raises ``DuplicateKey`` for an object giving a key twice;
    ``numbers_as_text`` keeps numbers as the text the file wrote them in."""
    try:
        return (_STRICT_TEXT if numbers_as_text else _STRICT).decode(text)
    except RecursionError:  # Python's decoder recurses per level of nesting
        raise json.JSONDecodeError("nested too deeply", text, 0) from None


def strict_json_array(text: str) -> list[tuple[object, int]]:
    """The items of a JSON array of data rows (numbers kept as text, as ``strict_json``
    with ``numbers_as_text``), each with the 1-based line it starts on.

    Raises:
        json.JSONDecodeError: malformed JSON, with its position.
        DuplicateKey: an object giving a key twice, with the line of its item in ``args[1]``.
    """
    ws = re.compile(r"\s*")
    items: list[tuple[object, int]] = []
    at = ws.match(text).end()
    if text[at : at + 1] != "[":
        raise json.JSONDecodeError("expected '['", text, at)
    at = ws.match(text, at + 1).end()
    if text[at : at + 1] == "]":
        at += 1
    while text[at - 1 : at] != "]":
        line = text.count("\n", 0, at) + 1
        try:
            item, at = _STRICT_TEXT.raw_decode(text, at)
        except DuplicateKey as e:
            raise DuplicateKey(e.args[0], line) from None
        except RecursionError:
            raise json.JSONDecodeError("nested too deeply", text, at) from None
        items.append((item, line))
        at = ws.match(text, at).end()
        if text[at : at + 1] not in (",", "]"):
            raise json.JSONDecodeError("expected ',' or ']' after an array item", text, at)
        at = ws.match(text, at + 1).end() if text[at] == "," else at + 1
    if text[ws.match(text, at).end():]:
        raise json.JSONDecodeError("extra data after the array", text, ws.match(text, at).end())
    return items


def check_unicode(value, where: str) -> None:
    """Refuse lone surrogates in ``value``'s text (JSON's ``"\\ud800"``, bytes that are not
    UTF-8 in a command-line argument): they are no character, so no tokenizer reads them.

    Raises:
        InputError: naming ``where`` and the text around the surrogate.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InputError(f"{where}: the text {value[max(0, e.start - 20) : e.end + 20]!r} holds a lone "
                             "surrogate (an escape such as \\ud800 without its pair, or bytes that are not "
                             "UTF-8), which is no character") from None
    elif isinstance(value, dict):
        for key, inner in value.items():
            check_unicode(key, where)
            check_unicode(inner, where)
    elif isinstance(value, list):
        for inner in value:
            check_unicode(inner, where)
