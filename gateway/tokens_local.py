"""``tokenizer.mode: local``: the model's own ``tokenizer.json`` and chat template, in-process.

What vLLM does for a chat completion (``apply_chat_template(..., tokenize=False)`` then the
tokenizer with ``add_special_tokens=False``, the template writing the BOS itself) and for a
completion (the tokenizer with ``add_special_tokens=True``), with the ``tokenizers`` package and
a Jinja2 sandbox set up as Hugging Face's ``apply_chat_template`` sets it up (``trim_blocks``,
``lstrip_blocks``, ``raise_exception``, the ``tojson`` filter; ``bos_token`` / ``eos_token`` from
``tokenizer_config.json``). The folder is the model's (``path``): ``tokenizer.json`` and
``chat_template.jinja`` or ``tokenizer_config.json``'s ``chat_template`` — no download ever.
Both packages are optional; a missing one is a ``LocalTokenizerError`` at the first request,
logged once, and the base then routes on the approximate index.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


class LocalTokenizerError(RuntimeError):
    pass


def _special(value: Any) -> str:
    if isinstance(value, Mapping):
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""


class LocalTokenizer:
    def __init__(self, tokenizer: Any, template: Any, specials: dict[str, str]) -> None:
        self._tok = tokenizer
        self._template = template
        self._specials = specials

    @classmethod
    def load(cls, path: str) -> LocalTokenizer:
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
            from tokenizers import Tokenizer
        except ImportError as e:
            raise LocalTokenizerError(f"install the 'tokenizers' and 'jinja2' packages ({e})") from None
        folder = Path(path)
        try:
            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # noqa: BLE001 - the library raises plain Exceptions
            raise LocalTokenizerError(f"cannot read {folder / 'tokenizer.json'}: {e}") from None
        cfg_path = folder / "tokenizer_config.json"
        cfg: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        jinja = folder / "chat_template.jinja"
        source = jinja.read_text() if jinja.is_file() else cfg.get("chat_template")
        if isinstance(source, list):  # named templates: the default one
            source = next((t.get("template") for t in source if t.get("name") == "default"), None)
        if not isinstance(source, str):
            raise LocalTokenizerError(f"no chat template in {folder} (chat_template.jinja or tokenizer_config.json)")

        def raise_exception(message: str) -> None:
            raise ValueError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda v, indent=None: json.dumps(v, indent=indent, ensure_ascii=False)
        specials = {k: _special(cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        return cls(tok, env.from_string(source), specials)

    def render(self, messages: Sequence[Mapping[str, Any]], options: Mapping[str, Any]) -> str:
        kwargs = dict(options.get("chat_template_kwargs") or {})
        if options.get("continue_final_message"):
            add_gen = False
        else:
            add_gen = bool(options.get("add_generation_prompt", True))
        text = self._template.render(messages=list(messages), add_generation_prompt=add_gen,
                                     tools=options.get("tools"), **self._specials, **kwargs)
        if options.get("continue_final_message") and messages:
            last = messages[-1].get("content")
            if isinstance(last, str) and last.strip() and last.strip() in text:
                text = text[: text.rindex(last.strip()) + len(last.strip())]
        return text

    def chat_ids(self, messages: Sequence[Mapping[str, Any]], options: Mapping[str, Any]) -> tuple[int, ...]:
        return tuple(self._tok.encode(self.render(messages, options), add_special_tokens=False).ids)

    def text_ids(self, text: str) -> tuple[int, ...]:
        return tuple(self._tok.encode(text, add_special_tokens=True).ids)
