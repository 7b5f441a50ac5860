"""Chat prompts: a tokenizer's Jinja chat template (carried by bundles imported from Hugging
Face) rendered as `transformers`' `apply_chat_template` renders it — a sandboxed Jinja
environment with `trim_blocks` and `lstrip_blocks`, the `tojson` filter, `raise_exception` and
`strftime_now`, the tokenizer's `*_token` strings — so a chat prompt is the same text, hence the
same tokens. jinja2 is imported only when a template is used."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from ferry.errors import FerryError

ROLES = ("system", "user", "assistant", "tool", "developer")


def checked_messages(messages: Any) -> list[dict[str, str]]:
    """`messages` as a list of {"role", "content"} strings; anything else is one error."""
    if not isinstance(messages, list) or not messages:
        raise FerryError("messages must be a non-empty list of {\"role\", \"content\"} objects")
    for i, message in enumerate(messages):
        if (not isinstance(message, dict) or not isinstance(message.get("role"), str)
                or not isinstance(message.get("content"), str)):
            raise FerryError(f"messages[{i}] must be an object with string role and content, "
                             f"got {message!r:.80}")
        if message["role"] not in ROLES:
            raise FerryError(f"messages[{i}].role must be one of {list(ROLES)}, got "
                             f"{message['role']!r}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


class ChatTemplate:
    """A chat template and the special-token strings it is rendered with."""

    def __init__(self, template: str, special_tokens: dict[str, str]) -> None:
        try:
            import jinja2
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as exc:
            raise FerryError("chat prompts need jinja2: pip install jinja2") from exc
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                    extensions=[loopcontrols])
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise_exception
        environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = environment.from_string(template)
        except jinja2.TemplateError as exc:
            raise FerryError(f"the bundle's chat template does not parse ({exc})") from exc
        self.special_tokens = dict(special_tokens)

    def render(self, messages: list[dict[str, str]], *,
               add_generation_prompt: bool = True) -> str:
        """The prompt text of `messages`; with `add_generation_prompt`, ending where the
        assistant's answer begins."""
        import jinja2

        try:
            return self.template.render(messages=checked_messages(messages), tools=None,
                                        documents=None,
                                        add_generation_prompt=add_generation_prompt,
                                        **self.special_tokens)
        except jinja2.TemplateError as exc:
            raise FerryError(f"the chat template refused the messages ({exc})") from exc


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_exception(message: str):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)
