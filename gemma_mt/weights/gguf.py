"""Gemma 3 GGUF (llama.cpp) files: weights and tokenizer, one reader.

The embedded default model ships as a Q4_K_M GGUF (see
shared/notes/gguf-gemma3-270m.md). `params_from_gguf` dequantizes it into the
exact tree of `gemma.gm.nn.Gemma3_*`, so every other module only ever sees
official params; `tokenizer_from_gguf` rebuilds the SentencePiece model from
the same file's metadata. Every problem with a file is a `GGUFError` naming
the file and the field.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from gemma_mt import fs
from gemma_mt.data.tokenizer import GemmaTokenizer
from gemma_mt.models.gemma import TransformerConfig

# GGUF metadata fields (without the `gemma3.` prefix) that fix the dims.
_DIM_FIELDS = ("block_count", "embedding_length", "feed_forward_length",
               "attention.head_count", "attention.head_count_kv",
               "attention.key_length")


def expected_fields(config: TransformerConfig) -> dict[str, int]:
  """The metadata values a GGUF of `config`'s size holds (to reject others)."""
  return dict(zip(_DIM_FIELDS, (
    config.num_layers, config.embed_dim, config.hidden_dim, config.num_heads,
    config.num_kv_heads, config.head_dim)))


# Dequantize big tensors this many rows at a time, so the float32 temporaries
# of `gguf.quants.dequantize` stay small next to the output array.
_ROWS_PER_CHUNK = 16_384

_NORMS = {  # GGUF block tensor -> official layer sub-module (stored as 1 + w).
  "attn_norm": "pre_attention_norm",
  "post_attention_norm": "post_attention_norm",
  "ffn_norm": "pre_ffw_norm",
  "post_ffw_norm": "post_ffw_norm",
}


class GGUFError(ValueError):
  """The GGUF file is not a Gemma 3 checkpoint of the expected shape."""


# A GGUF is one file, so it cannot carry the manifest of a model dir; the
# CRC-32 of its tensor bytes (in file order) goes into its own metadata
# instead, which llama.cpp ignores and `verify_tensors` checks on load.
CHECKSUM_FIELD = "gemma_mt.tensor_crc32"


def tensor_crc(arrays: Iterator[np.ndarray]) -> int:
  """CRC-32 of the arrays' raw bytes, in order."""
  crc = 0
  for a in arrays:
    crc = zlib.crc32(np.ascontiguousarray(a).view(np.uint8).reshape(-1), crc)
  return crc


def verify_tensors(reader: Any, path: str | os.PathLike) -> bool:
  """Checks the tensor bytes against `CHECKSUM_FIELD`; False when the file
  has none (one from another tool). GGUFError naming the file if changed."""
  f = reader.get_field(CHECKSUM_FIELD)
  if f is None:
    return False
  if tensor_crc(t.data for t in reader.tensors) != int(f.contents()):
    raise GGUFError(f"{path}: its tensors changed since it was written "
                    "(checksum mismatch)")
  return True


def open_reader(path: str | os.PathLike) -> Any:
  """A `gguf.GGUFReader` of `path`; GGUFError if it is missing or corrupt."""
  import gguf  # Imported here: only GGUF files need it.

  path = Path(path)
  if not path.is_file():
    raise GGUFError(f"GGUF file not found: {path}")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # gguf raises bare ValueErrors / struct errors.
    raise GGUFError(f"{path}: not a readable GGUF file ({e})") from e


def read_metadata(reader: Any, path: str | os.PathLike) -> dict[str, Any]:
  """Returns the architecture + dims, raising a GGUFError naming the field."""
  def field(name: str) -> Any:
    f = reader.get_field(name)
    if f is None:
      raise GGUFError(f"{path}: GGUF metadata field {name!r} is missing")
    return f.contents()

  arch = field("general.architecture")
  if arch != "gemma3":
    raise GGUFError(
      f"{path}: GGUF metadata field 'general.architecture' is {arch!r}, "
      "expected 'gemma3'"
    )
  meta = {k: int(field(f"gemma3.{k}")) for k in _DIM_FIELDS}
  meta["architecture"] = arch
  return meta


def check_metadata(
  meta: Mapping[str, Any], expect: Mapping[str, int], path: str | os.PathLike
) -> None:
  """Raises a GGUFError naming the first field that differs from `expect`."""
  for key, want in expect.items():
    if meta.get(key) != want:
      raise GGUFError(
        f"{path}: GGUF metadata field 'gemma3.{key}' is "
        f"{meta.get(key)!r}, expected {want!r}"
      )


def params_from_gguf(
  path: str | os.PathLike,
  dtype: Any = np.float32,
  expect: Mapping[str, int] | None = None,
) -> dict:
  """Converts a gemma3 GGUF into the official nested params dict (numpy).

  Tensors are dequantized one at a time (big ones in row chunks) straight
  into `dtype`, so peak memory is about the output size plus one chunk.
  `expect` (`expected_fields(config)`) pins the dims; without it any gemma3
  size is accepted.
  """
  import gguf

  path = Path(path)
  reader = open_reader(path)
  dtype = np.dtype(dtype)
  meta = read_metadata(reader, path)
  if expect:
    check_metadata(meta, expect, path)
  verify_tensors(reader, path)
  tensors = {t.name.removesuffix(".weight"): t for t in reader.tensors}

  n_layers = meta["block_count"]
  d = meta["embedding_length"]
  hidden = meta["feed_forward_length"]
  n_heads = meta["attention.head_count"]
  n_kv = meta["attention.head_count_kv"]
  head_dim = meta["attention.key_length"]

  def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Dequantized tensor `name` in numpy order, checked against shape."""
    t = tensors.get(name)
    if t is None:
      raise GGUFError(f"{path}: tensor {name!r} is missing")
    got = tuple(int(s) for s in reversed(t.shape))
    if got != shape:
      raise GGUFError(
        f"{path}: tensor {name!r} has shape {got}, expected {shape}"
      )
    out = np.empty(shape, dtype)
    rows = out.reshape(-1, shape[-1])
    data = t.data.reshape(rows.shape[0], -1)
    for i in range(0, rows.shape[0], _ROWS_PER_CHUNK):
      chunk = gguf.quants.dequantize(
        data[i : i + _ROWS_PER_CHUNK], t.tensor_type
      )
      rows[i : i + _ROWS_PER_CHUNK] = chunk.reshape(-1, shape[-1])
    return out

  def norm(name: str, size: int) -> dict:
    # llama.cpp stores Gemma's RMSNorm weight as 1 + w; Flax wants w.
    return {"scale": (get(name, (size,)).astype(np.float32) - 1).astype(dtype)}

  vocab = tensors["token_embd"].shape[1] if "token_embd" in tensors else 0
  params: dict = {
    "embedder": {"input_embedding": get("token_embd", (int(vocab), d))},
    "final_norm": norm("output_norm", d),
  }
  for i in range(n_layers):
    b = f"blk.{i}."
    q = get(b + "attn_q", (n_heads * head_dim, d))
    q = q.reshape(n_heads, head_dim, d).transpose(0, 2, 1)
    k, v = (
      get(b + n, (n_kv * head_dim, d))
      .reshape(n_kv, head_dim, d)
      .transpose(0, 2, 1)
      for n in ("attn_k", "attn_v")
    )
    o = get(b + "attn_output", (d, n_heads * head_dim))
    o = o.reshape(d, n_heads, head_dim).transpose(1, 2, 0)
    attn = {
      "attn_vec_einsum": {"w": np.ascontiguousarray(o)},
      "_query_norm": norm(b + "attn_q_norm", head_dim),
      "_key_norm": norm(b + "attn_k_norm", head_dim),
    }
    if n_heads == n_kv:  # The official module fuses q, k, v then.
      attn["qkv_einsum"] = {"w": np.stack([q, k, v])}
    else:
      attn["q_einsum"] = {"w": np.ascontiguousarray(q)}
      attn["kv_einsum"] = {"w": np.stack([k, v])}
    del q, k, v, o
    layer = {
      "attn": attn,
      "mlp": {
        "gating_einsum": np.stack(
          [get(b + "ffn_gate", (hidden, d)), get(b + "ffn_up", (hidden, d))]
        ),
        "linear": np.ascontiguousarray(get(b + "ffn_down", (d, hidden)).T),
      },
    }
    for gguf_name, flax_name in _NORMS.items():
      layer[flax_name] = norm(b + gguf_name, d)
    params[f"layer_{i}"] = layer
  return params


def tokenizer_proto_from_gguf(path: str | os.PathLike) -> bytes:
  """Gemma's SentencePiece ModelProto, rebuilt from GGUF tokenizer metadata."""
  from sentencepiece import sentencepiece_model_pb2 as pb

  reader = open_reader(path)

  def field(name):
    f = reader.fields.get(name)
    if f is None:
      raise GGUFError(f"{path}: GGUF metadata field {name!r} is missing")
    return f

  def scalar(name):
    f = field(name)
    return f.parts[f.data[0]].tolist()[0]

  model = bytes(field("tokenizer.ggml.model").parts[-1]).decode()
  if model != "llama":
    raise GGUFError(
      f"{path}: GGUF metadata field 'tokenizer.ggml.model' is {model!r}, "
      "not SentencePiece ('llama')"
    )
  tokens_f = field("tokenizer.ggml.tokens")
  tokens = [bytes(tokens_f.parts[i]).decode("utf-8") for i in tokens_f.data]
  scores_f = field("tokenizer.ggml.scores")
  scores = np.concatenate([scores_f.parts[i] for i in scores_f.data]).tolist()
  types_f = field("tokenizer.ggml.token_type")
  types = np.concatenate([types_f.parts[i] for i in types_f.data]).tolist()
  bos = scalar("tokenizer.ggml.bos_token_id")
  eos = scalar("tokenizer.ggml.eos_token_id")
  unk = scalar("tokenizer.ggml.unknown_token_id")
  pad = scalar("tokenizer.ggml.padding_token_id")

  proto = pb.ModelProto()
  for i, (piece, score, type_) in enumerate(zip(tokens, scores, types)):
    p = proto.pieces.add()
    p.piece, p.score = piece, score
    # GGUF token types use SentencePiece's enum values (1 normal, 3 control,
    # 4 user-defined, 6 byte); none is marked unknown, but SentencePiece
    # refuses a model without one.
    p.type = pb.ModelProto.SentencePiece.UNKNOWN if i == unk else type_
  ts = proto.trainer_spec
  ts.model_type = pb.TrainerSpec.BPE
  ts.vocab_size = len(tokens)
  ts.byte_fallback = True
  ts.split_digits = True
  # Without the piece names bos_id()/eos_id() return -1.
  ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = unk, bos, eos, pad
  ts.unk_piece, ts.bos_piece = tokens[unk], tokens[bos]
  ts.eos_piece, ts.pad_piece = tokens[eos], tokens[pad]
  ns = proto.normalizer_spec
  ns.name = "identity"
  ns.add_dummy_prefix = False
  ns.remove_extra_whitespaces = False
  ns.escape_whitespaces = True
  return proto.SerializeToString()


def tokenizer_from_gguf(path: str | os.PathLike) -> GemmaTokenizer:
  """The `GemmaTokenizer` stored in a GGUF file's metadata."""
  return GemmaTokenizer.from_serialized(tokenizer_proto_from_gguf(path))


# ------------------------------------------------------------------ writing

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
LOCAL_EVERY = 6  # llama.cpp's gemma3: layers 5, 11, ... are global.


def check_llama_cpp_config(config: TransformerConfig) -> None:
  """GGUFError unless llama.cpp's gemma3 runs `config` as we do: it fixes
  the 5:1 sliding/global pattern, the local RoPE base (10,000) and the query
  scale (27B's by layer count) instead of reading them from the file."""
  kind = config.hf_model_type()  # (Raises for a family we do not export.)
  types = tuple("global" if (i + 1) % LOCAL_EVERY == 0 else "local"
                for i in range(config.num_layers))
  scale = ((config.embed_dim / config.num_heads) ** -0.5
           if config.num_layers == 62 else config.head_dim ** -0.5)
  problems = [
    (kind != "gemma3_text", "not a Gemma 3 model (GGUF export covers "
     "Gemma 3; export Gemma 1/2 to HF and convert with llama.cpp)"),
    (config.attention_types != types, "its layer pattern is not 5 local : 1 "
     "global"),
    (config.local_rope_base != 10_000.0 or config.local_rope_scale != 1.0,
     "its local RoPE is not base 10,000, unscaled"),
    (abs(config.query_pre_attn_scalar - scale) > 1e-9,
     "its query scale is not the one llama.cpp derives"),
  ]
  for bad, why in problems:
    if bad:
      raise GGUFError(f"cannot write a GGUF llama.cpp would run as this "
                      f"model: {why}")


# HF tensor -> GGUF tensor: llama.cpp's converter keeps HF's row layout.
_FROM_HF = {
  "embed_tokens": "token_embd", "norm": "output_norm",
  "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v",
  "o_proj": "attn_output", "q_norm": "attn_q_norm", "k_norm": "attn_k_norm",
  "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
  "input_layernorm": "attn_norm",
  "post_attention_layernorm": "post_attention_norm",
  "pre_feedforward_layernorm": "ffn_norm",
  "post_feedforward_layernorm": "post_ffw_norm",
}


def _gguf_tensors(params: Any, config: TransformerConfig
                  ) -> Iterator[tuple[str, np.ndarray, bool]]:
  """(name, float32 array, is_norm) per tensor, the inverse of
  `params_from_gguf`: HF's tensors renamed, norms as llama.cpp's 1 + w."""
  from gemma_mt.weights import hf

  for name, x in hf.params_to_hf(params, config):
    *layer, module = name.removeprefix("model.").removesuffix(".weight").split(".")
    block = f"blk.{layer[1]}." if layer else ""
    x = np.asarray(x, np.float32)
    yield f"{block}{_FROM_HF[module]}.weight", (1 + x if x.ndim == 1 else x), x.ndim == 1


def write_gguf(
  path: str | os.PathLike,
  config: TransformerConfig,
  params: Any,
  tokenizer: GemmaTokenizer,
  outtype: str = "q8_0",
  *,
  name: str = "gemma_mt",
  chat_template: str | None = None,
  overwrite: bool = False,
  progress: Callable[[Iterator], Iterator] = lambda it: it,
) -> Path:
  """A Gemma 3 GGUF that llama.cpp runs: weights in `outtype` (norms stay
  F32), the SentencePiece vocabulary and `chat_template` in the metadata.
  Written to a temp file and renamed (a killed export leaves nothing)."""
  import gguf

  if outtype not in OUTTYPES:
    raise GGUFError(f"outtype must be one of {OUTTYPES}, got {outtype!r}")
  check_llama_cpp_config(config)
  path = Path(path).expanduser().absolute()
  fs.check_file_output(path, overwrite=overwrite)  # Before the work.
  qt, ft = gguf.GGMLQuantizationType, gguf.LlamaFileType
  qtype = {"f32": qt.F32, "f16": qt.F16, "bf16": qt.BF16, "q8_0": qt.Q8_0}[outtype]
  w = gguf.GGUFWriter(None, "gemma3")
  w.add_name(name)
  w.add_file_type({"f32": ft.ALL_F32, "f16": ft.MOSTLY_F16,
                   "bf16": ft.MOSTLY_BF16, "q8_0": ft.MOSTLY_Q8_0}[outtype])
  w.add_quantization_version(gguf.GGML_QUANT_VERSION)
  w.add_context_length(131_072 if config.global_rope_scale > 1 else 32_768)
  w.add_embedding_length(config.embed_dim)
  w.add_block_count(config.num_layers)
  w.add_feed_forward_length(config.hidden_dim)
  w.add_head_count(config.num_heads)
  w.add_head_count_kv(config.num_kv_heads)
  w.add_key_length(config.head_dim)
  w.add_value_length(config.head_dim)
  w.add_layer_norm_rms_eps(1e-6)
  w.add_rope_freq_base(config.global_rope_base)
  w.add_sliding_window(config.sliding_window_size)
  if config.global_rope_scale != 1.0:
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(config.global_rope_scale)
  _add_tokenizer(w, tokenizer, chat_template)
  stored = []
  for tname, x, is_norm in progress(_gguf_tensors(params, config)):
    if is_norm or qtype == qt.F32:
      stored.append(x)  # float32 already
      w.add_tensor(tname, x)
    elif qtype == qt.F16:
      stored.append(x.astype(np.float16))
      w.add_tensor(tname, stored[-1])
    else:
      stored.append(gguf.quants.quantize(x, qtype))
      w.add_tensor(tname, stored[-1], raw_dtype=qtype)
  w.add_uint32(CHECKSUM_FIELD, tensor_crc(stored))
  with fs.atomic_path(path, overwrite) as tmp:
    w.write_header_to_file(tmp)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
  return path


def _add_tokenizer(w: Any, tokenizer: GemmaTokenizer,
                   chat_template: str | None) -> None:
  """The SentencePiece model as llama.cpp's `llama` tokenizer metadata (what
  `tokenizer_proto_from_gguf` reads back)."""
  from sentencepiece import sentencepiece_model_pb2 as pb

  proto = pb.ModelProto()
  proto.ParseFromString(tokenizer.serialized_model_proto())
  w.add_tokenizer_model("llama")
  w.add_tokenizer_pre("default")
  w.add_token_list([p.piece.encode("utf-8") for p in proto.pieces])
  w.add_token_scores([p.score for p in proto.pieces])
  # SentencePiece's piece types are llama.cpp's token types (2 = unknown).
  w.add_token_types([int(p.type) for p in proto.pieces])
  w.add_bos_token_id(tokenizer.bos_id)
  w.add_eos_token_id(tokenizer.eos_id)
  w.add_unk_token_id(tokenizer.processor.unk_id())
  w.add_pad_token_id(tokenizer.pad_id)
  w.add_add_bos_token(True)
  w.add_add_eos_token(False)
  w.add_add_space_prefix(False)
  eot = tokenizer.processor.PieceToId("<end_of_turn>")
  if eot != tokenizer.processor.unk_id():
    w.add_eot_token_id(eot)
  if chat_template:
    w.add_chat_template(chat_template)
