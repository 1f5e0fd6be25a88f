"""The prompt's prefix signature: equal prefixes give equal chains, whole blocks only, bounded,
the same in every process, and chat messages in one canonical form."""

import subprocess
import sys

from llama_orch.io.orchestratord.prefix import CHARS_PER_TOKEN, MAX_BLOCKS, prefix_chain, prompt_text

BLOCK = 16 * CHARS_PER_TOKEN  # 16 tokens of 4 characters


def test_equal_prefixes_share_their_chain_and_a_block_covers_all_before_it():
    a = prefix_chain("x" * BLOCK * 3 + "tail a", 16)
    b = prefix_chain("x" * BLOCK * 2 + "y" * BLOCK, 16)
    assert len(a) == 3 and a[:2] == b[:2] and a[2] != b[2]
    # the same third block after a different start is a different hash: it names the whole prefix
    c = prefix_chain("z" * BLOCK + "x" * BLOCK * 2, 16)
    assert c[1] != a[1] and c[2] != a[2]


def test_only_whole_blocks_count_and_the_chain_is_bounded():
    assert prefix_chain("x" * (BLOCK - 1), 16) == ()
    assert len(prefix_chain("x" * BLOCK * (MAX_BLOCKS + 5), 16)) == MAX_BLOCKS


def test_the_chain_is_the_same_in_another_process():
    text = "the system prompt, " * 40
    here = prefix_chain(text, 16)
    code = ("from llama_orch.io.orchestratord.prefix import prefix_chain; "
            f"print(list(prefix_chain({text!r}, 16)))")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout
    assert list(here) == eval(there)  # noqa: S307 (our own output)


def test_chat_messages_in_one_canonical_form_and_a_growing_conversation_keeps_its_prefix():
    system = {"role": "system", "content": "You are terse. " * 30}
    turn1 = [system, {"role": "user", "content": "hello " * 20}]
    turn2 = [*turn1, {"content": "hi", "role": "assistant"}, {"role": "user", "content": "more " * 20}]
    one = prefix_chain(prompt_text(None, tuple(turn1)), 16)
    two = prefix_chain(prompt_text(None, tuple(turn2)), 16)
    assert len(two) > len(one) >= 2 and two[:len(one) - 1] == one[:-1]
    reordered = [{"content": m["content"], "role": m["role"]} for m in turn1]
    assert prefix_chain(prompt_text(None, tuple(reordered)), 16) == one
    assert prompt_text("plain", None) == "plain" and prompt_text(None, None) == ""
