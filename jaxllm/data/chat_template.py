"""Chat templates: Jinja2 strings like Hugging Face's `chat_template`, compiled in a sandbox.

Rendered with transformers' settings (trim_blocks, lstrip_blocks, loop controls,
`raise_exception`, `{% generation %}` blocks) and the variables `messages`, `bos_token`,
`eos_token`, `add_generation_prompt`. The built-ins (`chatml`, `tulu`, `llama3`) are Jinja
strings too, so every template goes through one path. `render_spans` also gives the text of the
`{% generation %}` blocks (what TRL's `assistant_only_loss` trains on); `jaxllm.data.chat`
encodes conversations through a template.
"""

from __future__ import annotations

import json
import os
import re
from typing import Sequence

from jinja2 import nodes
from jinja2.ext import Extension

from jaxllm.errors import UserError

# Hugging Face tokenizer folders: the config (special tokens, older templates) and the template
# file current transformers saves.
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"

BUILTIN_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    # open-instruct's tulu template (the last assistant turn gets no trailing newline).
    "tulu": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
        "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{% if not loop.last %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
        "{% else %}{{ '<|assistant|>\n' + message['content'] + eos_token }}{% endif %}"
        "{% endif %}"
        "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
        "{% endfor %}"),
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        " + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
}



class TemplateError(UserError, ValueError):
    """A template that does not compile, or does not render conversation prefixes consistently."""



# ----------------------------------------------------------------------------- templates

# Noncharacters (reserved by Unicode for internal use) around the text of a generation block.
GEN_OPEN, GEN_CLOSE = "\ufdd0", "\ufdd1"
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")  # transformers' test for the blocks


class _GenerationBlocks(Extension):
    """transformers' `{% generation %}...{% endgeneration %}`: renders the block between markers."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller):
        return GEN_OPEN + caller() + GEN_CLOSE


class ChatTemplate:
    """A compiled Jinja2 chat template; `has_generation` when it marks trained text itself."""

    def __init__(self, source: str, name: str = "<template>"):
        from jinja2 import TemplateSyntaxError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(f"{name}: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols, _GenerationBlocks])
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, indent=indent, ensure_ascii=False)
        env.globals["raise_exception"] = raise_exception
        try:
            self._template = env.from_string(source)
        except TemplateSyntaxError as e:
            raise TemplateError(f"{name}: bad Jinja template: {e}") from e
        self.source, self.name = source, name
        self.has_generation = bool(_GENERATION_TAG.search(source))

    def render_spans(self, messages: Sequence[dict], *, bos_token: str = "", eos_token: str = "",
                     add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """(the render, [(start, end)] of its generation blocks' text)."""
        out = self._template.render(messages=list(messages), bos_token=bos_token, eos_token=eos_token,
                                    add_generation_prompt=add_generation_prompt)
        if not self.has_generation:
            return out, []
        parts, spans, pos, opened = [], [], 0, None
        for part in re.split(f"([{GEN_OPEN}{GEN_CLOSE}])", out):
            if part == GEN_OPEN:
                if opened is not None:
                    raise TemplateError(f"{self.name}: nested generation blocks")
                opened = pos
            elif part == GEN_CLOSE:
                spans.append((opened, pos))
                opened = None
            else:
                parts.append(part)
                pos += len(part)
        return "".join(parts), [(a, b) for a, b in spans if b > a]

    def render(self, messages: Sequence[dict], *, bos_token: str = "", eos_token: str = "",
               add_generation_prompt: bool = False) -> str:
        return self.render_spans(messages, bos_token=bos_token, eos_token=eos_token,
                                 add_generation_prompt=add_generation_prompt)[0]

    def __repr__(self) -> str:
        return f"ChatTemplate({self.name})"


def load_template(spec: str | ChatTemplate | None = None, tokenizer=None) -> ChatTemplate:
    """A template from a built-in name, a Jinja string, a `chat_template.jinja` or
    `tokenizer_config.json` path or a tokenizer folder holding one, or (spec None) the
    tokenizer's own chat template."""
    if isinstance(spec, ChatTemplate):
        return spec
    if spec is None:
        source = getattr(tokenizer, "chat_template", None)
        if source is None:
            raise TemplateError("no chat template given and the tokenizer has none")
        return ChatTemplate(_pick_template(source, "tokenizer"), "tokenizer chat_template")
    if spec in BUILTIN_TEMPLATES:
        return ChatTemplate(BUILTIN_TEMPLATES[spec], spec)
    if "{{" in spec or "{%" in spec:
        return ChatTemplate(spec)
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        config_file = os.path.join(path, CONFIG_FILE)
        source = read_chat_template(path, _read_json(config_file) if os.path.isfile(config_file) else {})
        if source is None:
            raise TemplateError(f"{path}: no chat_template.jinja, and no chat_template in {CONFIG_FILE}")
    elif not os.path.isfile(path):
        raise TemplateError(f"{spec}: not a built-in template ({', '.join(BUILTIN_TEMPLATES)}), a Jinja "
                            "string, a chat_template.jinja or tokenizer_config.json, or a folder with one")
    elif path.endswith(".json"):
        source = _read_json(path).get("chat_template")
        if source is None:
            raise TemplateError(f"{path}: no chat_template")
    else:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    return ChatTemplate(_pick_template(source, path), path)


def read_chat_template(folder: str, config: dict):
    """The chat template of a tokenizer folder: chat_template.jinja, else the config's
    `chat_template` (a string or a list of named templates), else None."""
    path = os.path.join(folder, TEMPLATE_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    return config.get("chat_template")


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _pick_template(value, where: str) -> str:
    # Newer configs may hold a list of named templates; SFT wants the default one.
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" not in named:
            raise TemplateError(f"{where}: chat_template list has no 'default' ({', '.join(map(str, named))})")
        value = named["default"]
    if not isinstance(value, str):
        raise TemplateError(f"{where}: chat_template is not a string")
    return value
