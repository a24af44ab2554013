"""Prompt templates: a name -> a format string with one field, `{q}`, for the question."""

from __future__ import annotations

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


def apply_template(name: str, question: str) -> str:
  """The prompt for `question` under the template `name`."""
  if name not in TEMPLATES:
    raise ValueError(f"Unknown template {name!r}; choose one of {sorted(TEMPLATES)}")
  # The question is a format argument, never parsed, so braces in it are kept as they are.
  return TEMPLATES[name].format(q=question)
