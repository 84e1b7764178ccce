"""Rows → ``(text, trained)`` segments, per ``data.format``: a prompt template and a
completion, alpaca, plain text, chat messages or preference pairs, optionally wrapped in
the model's chat template. What a segment trains is decided here; tokens come later
(``lorakit.data``).
"""

from __future__ import annotations

import re

from lorakit.config import DataConfig
from lorakit.errors import DataError
from lorakit.inputs import template_fields
from lorakit.rows import field_names, row_field

ALPACA = (
    "Below is an instruction that describes a task{ctx}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input}### Response:\n"
)
CHAT_ROLES = ("system", "user", "assistant", "tool")


def _check_messages(messages, where: str) -> list[dict]:
    """Chat turns as the template needs them: known roles, text content, an assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: format 'chat' needs a non-empty 'messages' list")
    for turn, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise DataError(f"{where}: message {turn} is a {type(message).__name__}, not an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise DataError(f"{where}: message {turn} has role {role!r}; expected one of {', '.join(CHAT_ROLES)}")
        if isinstance(content, list):  # OpenAI's content parts
            raise DataError(f"{where}: message {turn} ({role}) has 'content' as a list of parts; lorakit trains "
                            "text: write the content as one string")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {turn} ({role}) has no text 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, so nothing to train on")
    return messages


def _chat(tokenizer, messages: list[dict], where: str, **kw) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kw)
    except Exception as e:  # noqa: BLE001 — a template may raise anything (jinja's own errors included)
        raise DataError(f"{where}: the model's chat template cannot render these messages: "
                        f"{type(e).__name__}: {e}") from None


def _chat_segments(tokenizer, messages: list[dict], where: str) -> list[tuple[str, bool]]:
    """Chat-template text split so that each assistant turn (with its end token) is trained.

    The split renders growing prefixes of the conversation, which is exact only when the
    template renders earlier turns the same whatever follows them (templates that drop
    earlier reasoning do not): otherwise the row is refused.

    Raises:
        DataError: naming the row and the message where the renderings part.
    """
    if messages[0]["role"] == "assistant":
        raise DataError(f"{where}: message 1 is the assistant's, with no turn before it to answer; start with a "
                        "user (or system) message")
    segments, done = [], ""
    for i, message in enumerate(messages):
        assistant = message["role"] == "assistant"
        renders = [(_chat(tokenizer, messages[:i], where, add_generation_prompt=True), False)] if assistant else []
        renders.append((_chat(tokenizer, messages[: i + 1], where), assistant))
        for text, trained in renders:
            if not text.startswith(done):
                raise DataError(f"{where}: the model's chat template renders the conversation before message {i + 1} "
                                "differently once that message follows, so lorakit cannot split it into context and "
                                "trained turns exactly; give each row one trained assistant turn at the end")
            segments.append((text[len(done):], trained))
            done = text
    at = 0
    for number, message in enumerate(messages, 1):  # templates may trim a turn, but must not drop one
        found = done.find(message["content"].strip(), at)
        if found < 0:
            raise DataError(f"{where}: the model's chat template leaves out message {number} ({message['role']}) "
                            "or rewrites its text, so it would be neither seen nor trained as written")
        at = found + len(message["content"].strip())
    return [s for s in segments if s[0]]


def render(row: dict, cfg: DataConfig, tokenizer, where: str = "data") -> list[tuple[str, bool]]:
    """One row as ``(text, trained)`` segments, per ``cfg.format``.

    Args:
        where: the row's place for messages, e.g. ``train.jsonl, line 3``.

    Raises:
        DataError: naming the row and what is wrong with it.
    """
    eos = tokenizer.eos_token or ""
    if cfg.format == "preference":  # seen as supervised data, a pair is its prompt and chosen answer
        return render_preference(row, cfg, tokenizer, where, "chosen")
    if cfg.format == "text":
        return [(row_field(row, cfg.text_field, where) + eos, True)]
    if cfg.format == "chat":
        return _chat_segments(tokenizer, _check_messages(row.get("messages"), where), where)
    if cfg.format == "alpaca":
        extra = row_field(row, "input", where) if row.get("input") not in (None, "") else ""
        prompt = ALPACA.format(
            ctx=", paired with an input that provides further context" if extra else "",
            instruction=row_field(row, "instruction", where),
            input=f"### Input:\n{extra}\n\n" if extra else "",
        )
        completion = row_field(row, "output", where)
    else:
        names = template_fields(cfg.prompt_template)
        missing = [name for name in names if row.get(name) is None]
        if missing:
            raise DataError(f"{where}: prompt_template uses field {missing[0]!r}, which the row lacks "
                            f"(it has {field_names(row) or 'no fields'})")
        try:
            prompt = cfg.prompt_template.format(**{name: row_field(row, name, where) for name in names})
        except ValueError as e:  # a format spec that does not suit text, e.g. {n:.2f}
            raise DataError(f"{where}: prompt_template cannot be filled from this row: {e}") from None
        completion = row_field(row, cfg.completion_field, where)
    if cfg.chat_template:
        return _chat_segments(tokenizer, [{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": completion}], where)
    return [(prompt, False), (completion + eos, True)]


def _row_texts(row: dict, cfg: DataConfig) -> list[str]:
    """The row's own text that rendering puts into an example (not the templates' text)."""
    def contents(value) -> list[str]:  # text, or chat messages
        if isinstance(value, list):
            return [str(m.get("content", "")) for m in value if isinstance(m, dict)]
        return [] if value is None else [str(value)]

    keys = {"chat": ["messages"], "text": [cfg.text_field], "alpaca": ["instruction", "input", "output"],
            "preference": ["prompt", "chosen", "rejected"]}.get(cfg.format)
    if keys is None:
        keys = [*template_fields(cfg.prompt_template), cfg.completion_field]
    return [text for key in keys for text in contents(row.get(key))]


def blank_answer(row: dict, cfg: DataConfig) -> bool:
    """True when an answer the row trains (completion, output, text, an assistant turn, a
    preference answer) is empty or only whitespace: only the end of text is learnt from it."""
    if cfg.format == "chat":
        answers = [m.get("content") for m in row.get("messages") or () if isinstance(m, dict) and m.get("role") == "assistant"]
    elif cfg.format == "preference":
        answers = [row.get("chosen"), row.get("rejected")]
    else:
        answers = [row.get({"text": cfg.text_field, "alpaca": "output"}.get(cfg.format, cfg.completion_field))]
    return any(isinstance(answer, str) and not answer.strip() for answer in answers)


def special_token_in(row: dict, cfg: DataConfig, specials: re.Pattern | None) -> str | None:
    """The first special token (``specials``, from ``special_tokens``) written inside the
    row's own text: the tokenizer reads it as that token, not as text."""
    found = (specials.search(text) for text in _row_texts(row, cfg)) if specials else ()
    return next((match.group() for match in found if match), None)


def special_tokens(tokenizer) -> re.Pattern | None:
    """One pattern for the texts the tokenizer reads as special tokens (EOS, chat markers;
    thousands in some vocabularies), or None when it has none."""
    added = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    texts = sorted(added | set(tokenizer.all_special_tokens), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, texts))) if texts else None


def preference_response(row: dict, key: str, where: str) -> str:
    """The ``chosen`` or ``rejected`` answer of a preference row: text, or one assistant
    message (TRL's conversational form)."""
    value = row.get(key)
    if isinstance(value, list):
        message = value[0] if len(value) == 1 and isinstance(value[0], dict) else {}
        if message.get("role") != "assistant" or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: field {key!r} must be text or a list of one assistant message")
        return message["content"]
    return row_field(row, key, where)


def render_preference(row: dict, cfg: DataConfig, tokenizer, where: str, key: str) -> list[tuple[str, bool]]:
    """A preference row's prompt with its ``key`` answer (``chosen`` or ``rejected``), rendered
    exactly as a supervised row with that answer would be; only the answer is trained.

    The prompt is text (filled into ``prompt_template``, wrapped as a user turn with
    ``chat_template``) or a list of chat messages (then ``chat_template`` must be on, so
    that ``generate`` renders prompts the same way).
    """
    response = preference_response(row, key, where)
    prompt = row.get("prompt")
    if not isinstance(prompt, list):
        supervised = cfg.model_copy(update={"format": "prompt_completion"})
        return render({**row, cfg.completion_field: response}, supervised, tokenizer, where)
    if not cfg.chat_template:
        raise DataError(f"{where}: the prompt is a list of chat messages; set data.chat_template: true so that "
                        "training, eval and generate all render prompts with the chat template")
    turns = prompt + [{"role": "assistant", "content": response}]
    segments = _chat_segments(tokenizer, _check_messages(turns, where), where)
    last = max(i for i, (_, trained) in enumerate(segments) if trained)
    return [(text, trained and i == last) for i, (text, trained) in enumerate(segments)]  # earlier turns: context
