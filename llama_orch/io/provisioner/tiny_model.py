"""The tiny model: a small llama-architecture GGUF made locally, byte for byte the same each run.

No model can be downloaded where llama-orch is tested, yet the tests and the demo run a real
``llama-server``. This writes one: 2 layers, 64-dim embeddings, 4 heads, an SPM vocabulary with
byte fallback (``<0x00>`` .. ``<0xFF>`` typed BYTE, control tokens, ASCII characters and a few
words typed NORMAL), and seeded random F32 weights. The output projection is zero for every
token but the words and characters, and the final norm is scaled up, so that sampling favours
readable tokens over stray bytes: the model streams gibberish, but printable gibberish.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

N_EMBD = 64
N_LAYER = 2
N_HEAD = 4
N_FF = 128
N_CTX_TRAIN = 2048
SEED = 20251130

WORDS = (
    "the", "and", "of", "to", "a", "in", "is", "it", "that", "for", "on", "with", "as", "was", "at", "by",
    "this", "from", "or", "be", "are", "not", "have", "but", "they", "one", "all", "we", "can", "there",
    "llama", "orch", "pool", "token", "stream", "queue", "slot", "engine", "model", "GPU", "cloud", "task",
    "fast", "ready", "hello", "world", "data", "node", "time", "work",
)


def _vocabulary() -> tuple[list[bytes], list[float], list[int]]:
    from gguf import TokenType

    tokens: list[bytes] = [b"<unk>", b"<s>", b"</s>"]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>".encode())
        types.append(TokenType.BYTE)
    pieces = ["\u2581"] + [chr(c) for c in range(33, 127)] + ["\u2581" + w for w in WORDS]
    for piece in pieces:
        tokens.append(piece.encode())
        types.append(TokenType.NORMAL)
    scores = [0.0] * 3 + [0.0] * 256 + [-float(len(p)) for p in pieces]
    return tokens, scores, [int(t) for t in types]


def write_tiny_model(path: str | os.PathLike[str], *, layers: int = N_LAYER, embd: int = N_EMBD) -> Path:
    """Write the tiny GGUF model to ``path`` atomically; return the path. ``layers`` and ``embd``
    (a multiple of the 4 heads) make a larger, slower one of the same kind: the multi-host lab
    wants streams that last long enough to be cut mid-way."""
    if layers < 1 or embd < N_HEAD or embd % N_HEAD:
        raise ValueError(f"layers must be >= 1 and embd a positive multiple of {N_HEAD}, got {layers}, {embd}")
    n_ff = N_FF * embd // N_EMBD
    import logging

    import numpy as np
    from gguf import GGUFWriter, TokenType

    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer narrates every file at INFO

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens, scores, types = _vocabulary()
    n_vocab = len(tokens)
    rng = np.random.RandomState(SEED)

    def weights(*shape: int, scale: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer = GGUFWriter(tmp, "llama")
        writer.add_name("llama-orch tiny" if (layers, embd) == (N_LAYER, N_EMBD) else f"llama-orch small {layers}x{embd}")
        writer.add_context_length(N_CTX_TRAIN)
        writer.add_embedding_length(embd)
        writer.add_block_count(layers)
        writer.add_feed_forward_length(n_ff)
        writer.add_head_count(N_HEAD)
        writer.add_head_count_kv(N_HEAD)
        writer.add_rope_dimension_count(embd // N_HEAD)
        writer.add_rope_freq_base(10000.0)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_file_type(0)  # all F32
        writer.add_vocab_size(n_vocab)
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)

        writer.add_tensor("token_embd.weight", weights(n_vocab, embd, scale=1.0))
        for i in range(layers):
            writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(embd, dtype=np.float32))
            for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
                writer.add_tensor(f"blk.{i}.{name}.weight", weights(embd, embd))
            writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(embd, dtype=np.float32))
            writer.add_tensor(f"blk.{i}.ffn_gate.weight", weights(n_ff, embd))
            writer.add_tensor(f"blk.{i}.ffn_up.weight", weights(n_ff, embd))
            writer.add_tensor(f"blk.{i}.ffn_down.weight", weights(embd, n_ff))
        writer.add_tensor("output_norm.weight", np.full(embd, 4.0, dtype=np.float32))
        output = weights(n_vocab, embd, scale=1.0)
        readable = np.array([t == TokenType.NORMAL for t in types])
        output[~readable] = 0.0  # bytes and control tokens score 0: below most readable tokens
        writer.add_tensor("output.weight", output)

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
