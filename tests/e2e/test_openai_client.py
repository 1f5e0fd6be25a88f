"""The official ``openai`` client, unchanged, against a real orchestratord process in front of a
real node: pool-managerd, engine-provisioner and llama-server with the tiny model. Chat goes
through the engine's own ``/apply-template`` (the tiny GGUF has no template; llama-server falls
back to chatml)."""

import aiohttp
import openai
import pytest
from cluster_support import CACHE, TLS, Node, Orchd, client_session, client_ssl

MODEL = f"file:{CACHE / 'models' / 'tiny.gguf'}"


async def test_the_official_openai_client_against_a_real_cluster(llama_server, tmp_path):
    node = Node(tmp_path)
    orchd = Orchd(tmp_path, node)
    try:
        node.provision("--pool-id", "pool-0", "--slots", "2", "--ctx", "1024")
        async with client_session(timeout=aiohttp.ClientTimeout(total=60)) as session:
            await orchd.wait_ready(session, node)
        client = openai.AsyncOpenAI(base_url=f"{orchd.url}/v1", api_key="unused", max_retries=0, timeout=60,
                                    http_client=openai.DefaultAsyncHttpxClient(verify=client_ssl()) if TLS else None)

        assert [m.id for m in (await client.models.list()).data] == [MODEL]

        reply = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "system", "content": "You are terse."},
                                   {"role": "user", "content": "Say hello."}], max_tokens=16, seed=1)
        choice = reply.choices[0]
        assert choice.message.role == "assistant" and choice.message.content.strip()  # real text from the engine
        assert choice.finish_reason in ("stop", "length") and 0 < reply.usage.completion_tokens <= 16
        assert (choice.finish_reason == "length") == (reply.usage.completion_tokens == 16)

        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Count to ten."}], max_tokens=12, seed=2,
            stream=True, stream_options={"include_usage": True})
        parts, reasons, usage = [], [], None
        async for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                reasons.append(chunk.choices[0].finish_reason)
            usage = chunk.usage or usage
        assert "".join(parts) and reasons[-1] in ("stop", "length") and 0 < usage.completion_tokens <= 12

        text = await client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, seed=3)
        assert text.choices[0].text and text.usage.completion_tokens <= 8
        # The same seed on the same replica gives the same text, through either door.
        again = await client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, seed=3)
        assert again.choices[0].text == text.choices[0].text

        with pytest.raises(openai.NotFoundError) as missing:
            await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        assert missing.value.code == "model_not_found"
    finally:
        orchd.close()
        node.close()
