"""A prompt's prefix signature for ``prefix-aware`` placement: a chain of block hashes.

The text is what the engine will see, as far as orchestratord can know it: the prompt, or the
chat messages in one canonical serialisation (keys sorted; the engine's template is applied
later, the same way for the same messages, so equal message prefixes give equal prompt
prefixes). Blocks are ``block_tokens`` approximate tokens of 4 characters each (as llm-d's
approximate scorer does); only whole blocks count, and at most ``MAX_BLOCKS`` (a prefix that
long is a whole prompt's worth of reuse already; the bound keeps a huge prompt's cost fixed).
Block ``k``'s hash covers blocks ``0..k``: blake2b of the previous hash and the block, 64 bits,
the same in every process (not Python's salted ``hash``), so replicas agree.
"""

from __future__ import annotations

from hashlib import blake2b

import orjson

CHARS_PER_TOKEN = 4
MAX_BLOCKS = 256


def prefix_chain(text: str, block_tokens: int, max_blocks: int = MAX_BLOCKS) -> tuple[int, ...]:
    size = block_tokens * CHARS_PER_TOKEN
    whole = min(len(text) // size, max_blocks)
    chain = []
    previous = b""
    for k in range(whole):
        digest = blake2b(previous + text[k * size:(k + 1) * size].encode("utf-8", "surrogatepass"),
                         digest_size=8).digest()
        chain.append(int.from_bytes(digest, "little"))
        previous = digest
    return tuple(chain)


def prompt_text(prompt: str | None, messages: tuple[dict, ...] | None) -> str:
    """The text a task's prefix is taken from."""
    if messages is not None:
        return orjson.dumps(list(messages), option=orjson.OPT_SORT_KEYS).decode()
    return prompt or ""
