"""Prompt templates: a name -> a format string with one field, `{q}`, for the question.

"chat" is the tokenizer's own chat template (HF `tokenizer_config.json` or GGUF metadata),
rendered once per tokenizer into a `ChatTemplate` (`resolve`): one user turn plus the
generation prompt, and the text that ends the assistant's turn.
"""

from __future__ import annotations

import dataclasses

from derta_jax.data.records import DataError

TEMPLATES: dict[str, str] = {
    # The authors' training prompt (data/train/generate_training_data.py in RobustNLP/DeRTa).
    # The closing tag really is `[\INST]`, with a backslash; responses start with a space.
    "upstream": "[INST] {q} [\\INST]",
    # The authors' generation prompt: `create_prompt` in evaluation.py and evaluation_lora.py
    # of RobustNLP/DeRTa formats "[INST] \n{}\n\n [\INST]" — newlines around the question, a
    # space before the closing tag, unlike training. Those scripts wrap MMLU and GSM8K
    # questions first (that belongs to the eval code) and drop a trailing EOS after tokenizing.
    "upstream_eval": "[INST] \n{q}\n\n [\\INST]",
    # No template: what the authors' `--mode completion_attack` feeds the model.
    "raw": "{q}",
    # LLaMA-3 instruct, without <|begin_of_text|>: the tokenizer adds BOS.
    "llama3_chat": ("<|start_header_id|>user<|end_header_id|>\n\n{q}<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    # LLaMA-2 chat, one user turn without a system prompt; the BOS comes from the tokenizer.
    "llama2_chat": "[INST] {q} [/INST]",
}
CHAT = "chat"
NAMES = (*TEMPLATES, CHAT)
_MARK = "@@DERTA_QUESTION@@"
_ANSWER = "@@DERTA_ANSWER@@"


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """A tokenizer's chat template for one user turn.

  prompt: format string with `{q}`: the rendered turn and generation prompt, without the
    leading BOS text (the pipeline puts BOS first). eos_text: what ends the assistant's
    turn (ChatML: "<|im_end|>"); responses are trained to end with it.
  """

  prompt: str
  eos_text: str
  name: str = CHAT


def _escape(text: str) -> str:
  return text.replace("{", "{{").replace("}", "}}")


def chat_template(tokenizer) -> ChatTemplate:
  """The `ChatTemplate` of `tokenizer` (its `chat_template` and `render_chat`)."""
  if not tokenizer.chat_template:
    raise DataError(f"{tokenizer.path}: the tokenizer has no chat_template; template 'chat' "
                    f"needs one (or choose one of {sorted(TEMPLATES)})")
  prompt = tokenizer.render_chat([{"role": "user", "content": _MARK}], generation_prompt=True)
  turn = tokenizer.render_chat([{"role": "user", "content": _MARK},
                                {"role": "assistant", "content": _ANSWER}],
                               generation_prompt=False)
  if prompt.count(_MARK) != 1 or turn.count(_ANSWER) != 1:
    raise DataError(f"{tokenizer.path}: its chat_template does not place a user message and "
                    "an assistant message once each")
  bos = tokenizer.decode([tokenizer.bos_id])
  if bos and prompt.startswith(bos):
    prompt = prompt[len(bos):]
  head, tail = prompt.split(_MARK)
  eos_text = turn.split(_ANSWER)[1].split("\n")[0].rstrip()
  return ChatTemplate(prompt=_escape(head) + "{q}" + _escape(tail),
                      eos_text=eos_text or tokenizer.decode([tokenizer.eos_id]))


def resolve(template: str | ChatTemplate, tokenizer) -> str | ChatTemplate:
  """`template`, with "chat" rendered from `tokenizer`'s chat template."""
  if template == CHAT:
    return chat_template(tokenizer)
  if not isinstance(template, ChatTemplate) and template not in TEMPLATES:
    raise ValueError(f"Unknown template {template!r}; choose one of {sorted(NAMES)}")
  return template


def separator(template: str | ChatTemplate) -> str:
  """What goes between a prompt and its response: the authors' templates end at a tag that
  their responses follow after a space; a chat template ends with the assistant's header."""
  return "" if isinstance(template, ChatTemplate) else " "


def apply_template(template: str | ChatTemplate, question: str) -> str:
  """The prompt for `question` under `template` (a name of TEMPLATES or a `ChatTemplate`)."""
  if isinstance(template, ChatTemplate):
    return template.prompt.format(q=question)
  if template == CHAT:
    raise ValueError("template 'chat' depends on the tokenizer: resolve(template, tokenizer) "
                     "first")
  if template not in TEMPLATES:
    raise ValueError(f"Unknown template {template!r}; choose one of {sorted(NAMES)}")
  # The question is a format argument, never parsed, so braces in it are kept as they are.
  return TEMPLATES[template].format(q=question)
