"""Tiny LLaMA GGUF files written the way llama.cpp's converter writes them: `llama.*`
metadata, a byte-level BPE vocabulary trained here on a small English corpus, a ChatML chat
template, and random weights under llama.cpp names with Q/K rows permuted, each 2-D tensor in
the type asked for (the K-quants built block by block, as `gguf` cannot quantize to them);
and the chats and mixed strings that tests and bench/gguf_import.py compare on."""

from __future__ import annotations

import functools
import json

import numpy as np

# SmolLM2's shape of ChatML: a default system turn when the first message is not one.
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a small, careful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CONTROL, NORMAL = 3, 1
KINDS = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o", "ffn_gate": "gate",
         "ffn_up": "up", "ffn_down": "down"}
QK_K = 256

_SENTENCES = """\
Sorry, I can't help with that.
I'm sorry, but I cannot assist with that request.
Sorry, that is not something I can do.
I won't help with breaking into a house, but I can explain how locks work.
Sure, here is a short answer.
Sure! Here are three tips for a healthy garden.
Hello! How can I help you today?
Thank you for asking; let me think about it.
The quick brown fox jumps over the lazy dog.
A small garden needs water, sunlight and good soil.
Water the plants early in the morning, before the sun gets hot.
Step 1: mix the flour and the sugar.
Step 2: add two eggs and stir well.
Step 3: bake for 25 minutes at 180 degrees.
The meeting starts at 9:30 and ends at 11:45.
Please call me back at 555-0199 after 6 pm.
It costs $12.50, or about 11 euros.
The year 2024 had 366 days; 2023 had 365.
What is 7 times 8? It is 56.
Is it safe to mix bleach and ammonia? No, never mix them.
How do I pick a lock? Sorry, I can't help with that.
Can you write a poem about the sea?
The sea is wide, the sea is deep, and it rocks the boats to sleep.
Keep your password secret and change it often.
Never share your bank details with a stranger.
A recipe for bread: flour, water, salt and yeast.
My favourite colours are blue, green and orange.
The train leaves from platform 4 at 10:15.
"Where are you going?" she asked.
"To the library," he said, "to return 3 books."
Don't forget to bring an umbrella; it might rain.
We're going to the park, aren't we?
They've finished the project, and it's great.
He'll be here soon, I think.
You'd better check the answer twice.
Question: what is the capital of France?
Answer: the capital of France is Paris.
First, read the instructions. Then, follow them carefully.
Cats sleep for about 15 hours a day.
Dogs like to run, play and chew on sticks.
The library opens at 8 and closes at 20.
Learning to code takes time, practice and patience.
def add(a, b):
    return a + b
for i in range(10):
    print(i)
The list has 5 items: apples, pears, plums, grapes and figs.
I cannot provide instructions for making weapons.
I can't share that, but here is some safety information instead.
If you feel unsafe, please contact local emergency services.
Let's solve it step by step.
The answer is 42.
Temperatures will reach 31 degrees on Friday.
Is this email a scam? It asks for money, so be careful.
Summarise the text in two sentences.
Translate "good morning" into French: "bonjour".
Café, naïve and résumé have accents.
Tokyo, Berlin, Lagos and Lima are big cities.
(This sentence has brackets.) [So does this one.] {And this.}
Use a comma, a colon: and a semicolon; correctly!
Wait... what? Really?!
100% of the tests passed.
Email me at someone@example.com with #questions & ideas.
The path is /home/user/notes.txt on the server.
x = 3 * (4 + 5) - 6 / 2
Sorry, I won't write malware. I can help you secure your own computer.
I'm not able to help with hacking into accounts.
That sounds dangerous; I'd rather not explain it.
Here is a safer alternative you could try.
"""

_SUBJECTS = ("The teacher", "My friend", "A farmer", "The robot", "Our team", "The child",
             "A doctor", "The writer")
_VERBS = ("reads", "writes", "builds", "cleans", "paints", "finds", "sells", "plants")
_OBJECTS = ("a book", "two letters", "a small house", "the kitchen", "a red door",
            "3 old maps", "fresh bread", "12 trees")
_PLACES = ("at home", "in the city", "near the river", "after lunch", "on Monday",
           "before 7 am")


def default_corpus() -> list[str]:
  """The built-in training text: hand-written lines plus templated ones with numbers."""
  lines = _SENTENCES.splitlines()
  rng = np.random.RandomState(1234)
  for n in range(240):
    s, v, o, p = (a[rng.randint(len(a))] for a in (_SUBJECTS, _VERBS, _OBJECTS, _PLACES))
    lines.append(f"{s} {v} {o} {p}, {n} times in {1990 + n % 35}.")
  for n in range(40):
    lines.append(f"User: can you help with task {n}?\nAssistant: Sorry, I can't help with "
                 f"that.\n")
  return lines


@functools.lru_cache(maxsize=4)
def _trained_tokenizer(text: tuple[str, ...], vocab_size: int):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  # SmolLM2's pre-tokenizer: digits one by one, then GPT-2's split in the byte alphabet.
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(text, trainer=trainer)
  return tok


def _vocab_and_merges(tok) -> tuple[list[str], list[str]]:
  model = json.loads(tok.to_str())["model"]
  tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
  merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
  return tokens, merges


# Chat turns for comparisons against transformers: default system turn, own system turn, and
# a multi-turn conversation asking for a long answer.
CHATS = (
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    [{"role": "system", "content": "You are a pirate who loves the sea."},
     {"role": "user", "content": "Tell me a long story about a ship and its 3 cats."}],
    [{"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Hello! How can I help you today?"},
     {"role": "user", "content": "Write a short story about a robot who learns to paint."}],
)
_PIECES = (
    "Sorry", "sorry", "I can't", "won't", "they'll", "she's", "WE'VE", "n't", "...", "?!", "!",
    ",", ";", ":", "--", "(x)", "[1]", "{a: 2}", "#tag", "@user", "a+b=c", "3.14", "1,000,000",
    "2024-11-30", "007", "42", "99.5%", "$12", "naïve", "café", "日本語", "Привет", "ß", "€",
    "🙂", "👍🏽", "e\u0301", "\u00a0", "<|im_start|>", "<|im_end|>", "<|endoftext|>",
    "<|im_start|>user\n", "<|im_", "im_end|>", "<|", "|>", "def f(x):\n    return x",
    "\t", "\n", "\n\n", "  ", "   ", " \n ", "\r\n", "http://example.com/a?b=1")


def mixed_strings(n: int = 300, seed: int = 0) -> list[str]:
  """`n` deterministic strings for tokenizer comparisons: corpus words, digits, unicode,
  whitespace runs, punctuation and special tokens, whole and in pieces."""
  rng = np.random.RandomState(seed)
  words = " ".join(default_corpus()).split()
  seps = (" ", " ", " ", "", "\n", "  ", "\t", " \n")
  out = ["", " ", "\n", "Sorry, I can't help with that.", "<|im_start|>assistant\n"]
  while len(out) < n:
    parts = []
    for _ in range(rng.randint(1, 9)):
      bag = _PIECES if rng.rand() < 0.5 else words
      parts.append(bag[rng.randint(len(bag))])
      parts.append(seps[rng.randint(len(seps))])
    text = "".join(parts[:-1] if rng.rand() < 0.7 else parts)
    out.append(" " + text if rng.rand() < 0.2 else text)
  return out[:n]


def permute(w_RxC: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's Q/K row order: per head, HF's two rotary halves interleaved."""
  rows = w_RxC.shape[0]
  half = rows // n_heads // 2
  return (w_RxC.reshape(n_heads, 2, half, *w_RxC.shape[1:]).swapaxes(1, 2)
          .reshape(w_RxC.shape))


def _q4_k(rng, rows: int, cols: int) -> np.ndarray:
  """Q4_K bytes [rows, cols / 256 * 144]: value = d * sc * q - dmin * m per 32 values."""
  n = rows * cols // QK_K
  sc = rng.randint(1, 9, (n, 8)).astype(np.uint8)
  # Each sub-block's min sits near its mean, so the values centre on zero.
  m = np.clip(np.round(sc * 7.5 + rng.randint(-3, 4, (n, 8))), 0, 63).astype(np.uint8)
  d = np.full((n, 1), 0.0025, np.float16)
  scales = np.concatenate([sc[:, :4] | (sc[:, 4:] >> 4) << 6,
                           m[:, :4] | (m[:, 4:] >> 4) << 6,
                           (sc[:, 4:] & 0xF) | (m[:, 4:] & 0xF) << 4], axis=1)
  qs = rng.randint(0, 256, (n, QK_K // 2)).astype(np.uint8)
  blocks = np.concatenate([d.view(np.uint8), d.view(np.uint8), scales, qs], axis=1)
  return blocks.reshape(rows, -1)


def _q6_k(rng, rows: int, cols: int) -> np.ndarray:
  """Q6_K bytes [rows, cols / 256 * 210]: value = d * scale * (q - 32) per 16 values."""
  n = rows * cols // QK_K
  ql = rng.randint(0, 256, (n, QK_K // 2)).astype(np.uint8)
  qh = rng.randint(0, 256, (n, QK_K // 4)).astype(np.uint8)
  scales = rng.randint(-12, 13, (n, QK_K // 16)).astype(np.int8)
  d = np.full((n, 1), 3e-4, np.float16)
  blocks = np.concatenate([ql, qh, scales.view(np.uint8), d.view(np.uint8)], axis=1)
  return blocks.reshape(rows, -1)


def _add(writer, name: str, value_RxC: np.ndarray, type_name: str, rng, heads=None):
  """Writes `value_RxC` (HF layout) as `type_name`; Q/K rows permuted when `heads`."""
  import gguf

  qtype = gguf.GGMLQuantizationType[type_name]
  rows, cols = value_RxC.shape
  if type_name in ("Q4_K", "Q6_K"):
    if cols % QK_K:
      raise ValueError(f"{name}: {type_name} needs rows of a multiple of {QK_K} values, "
                       f"got {cols}; use d_model = d_ff = 256")
    data = (_q4_k if type_name == "Q4_K" else _q6_k)(rng, rows, cols)
  elif type_name == "F32":
    data = value_RxC.astype(np.float32)
  elif type_name == "F16":
    data = value_RxC.astype(np.float16)
  elif type_name == "I8":  # not a weight type; for the loader's error path
    data = np.clip(np.round(value_RxC * 100), -127, 127).astype(np.int8)
  else:
    data = gguf.quants.quantize(value_RxC.astype(np.float32), qtype)
  if heads:
    data = permute(data, heads)
  raw = qtype if data.dtype == np.uint8 else None
  writer.add_tensor(name, np.ascontiguousarray(data), raw_dtype=raw)


def write_tiny_gguf(path, *, types=None, seed=0, n_layers=2, d_model=64, n_heads=4,
                    n_kv_heads=2, d_ff=128, tie_embeddings=True, chat_template=CHATML,
                    corpus=None, vocab_size=800, arch="llama", tokenizer_model="gpt2") -> dict:
  """Writes a random LLaMA GGUF file to `path`; returns its config values and `tokenizer`
  (the `tokenizers.Tokenizer` its vocabulary was trained as).

  Args:
    types: kind ("embed", "q", "k", "v", "o", "gate", "up", "down", "head") -> GGML type
      name (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K; I8 to test errors);
      F32 when absent. Norms are always F32.
    arch, tokenizer_model: general.architecture and tokenizer.ggml.model, for error tests.
  """
  import gguf

  types = dict(types or {})
  text = tuple(default_corpus() if corpus is None else corpus)
  tok = _trained_tokenizer(text, vocab_size)
  tokens, merges = _vocab_and_merges(tok)
  assert tokens[:3] == list(SPECIALS), tokens[:3]
  vocab, head_dim = len(tokens), d_model // n_heads
  rng = np.random.RandomState(seed)

  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_name("tiny chat")
  writer.add_block_count(n_layers)
  writer.add_context_length(512)
  writer.add_embedding_length(d_model)
  writer.add_feed_forward_length(d_ff)
  writer.add_head_count(n_heads)
  writer.add_head_count_kv(n_kv_heads)
  writer.add_rope_freq_base(100000.0)
  writer.add_layer_norm_rms_eps(1e-5)
  writer.add_vocab_size(vocab)
  writer.add_rope_dimension_count(head_dim)
  writer.add_tokenizer_model(tokenizer_model)
  writer.add_tokenizer_pre("smollm")
  writer.add_token_list(tokens)
  writer.add_token_types([CONTROL if t in SPECIALS else NORMAL for t in tokens])
  writer.add_token_merges(merges)
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_pad_token_id(2)
  writer.add_unk_token_id(0)
  writer.add_add_bos_token(False)
  if chat_template is not None:
    writer.add_chat_template(chat_template)

  def normal(rows, cols, std=0.08):
    return rng.normal(0.0, std, (rows, cols)).astype(np.float32)

  def norm(n):
    return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

  _add(writer, "token_embd.weight", normal(vocab, d_model, 0.1), types.get("embed", "F32"), rng)
  shapes = {"attn_q": (n_heads * head_dim, d_model), "attn_k": (n_kv_heads * head_dim, d_model),
            "attn_v": (n_kv_heads * head_dim, d_model), "attn_output": (d_model, d_model),
            "ffn_gate": (d_ff, d_model), "ffn_up": (d_ff, d_model), "ffn_down": (d_model, d_ff)}
  heads = {"attn_q": n_heads, "attn_k": n_kv_heads}
  for i in range(n_layers):
    writer.add_tensor(f"blk.{i}.attn_norm.weight", norm(d_model))
    writer.add_tensor(f"blk.{i}.ffn_norm.weight", norm(d_model))
    for part, (rows, cols) in shapes.items():
      _add(writer, f"blk.{i}.{part}.weight", normal(rows, cols),
           types.get(KINDS[part], "F32"), rng, heads.get(part))
  writer.add_tensor("output_norm.weight", norm(d_model))
  if not tie_embeddings:
    _add(writer, "output.weight", normal(vocab, d_model, 0.1), types.get("head", "F32"), rng)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return dict(n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads,
              d_ff=d_ff, head_dim=head_dim, vocab_size=vocab, tie_embeddings=tie_embeddings,
              rope_theta=100000.0, rms_norm_eps=1e-5, bos_id=1, eos_id=2, pad_id=2,
              tokenizer=tok)
