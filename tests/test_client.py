"""specdec.client: the sync and asyncio clients against a real server."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from server_fixtures import server, wait_until  # noqa: F401 - fixture

from specdec.client import AsyncClient, Client, build_request
from specdec.v1 import specdec_pb2 as pb


def test_build_request_maps_every_option():
    r = build_request("hi", max_new_tokens=5, temperature=0.5, top_k=3, top_p=0.9, min_p=0.1, seed=7, stop=["x"],
                      stop_token_ids=[1], ignore_eos=True, logprobs=True, method="ngram", gamma=2, request_id="r1")  # fmt: skip
    assert r.text == "hi" and r.max_new_tokens == 5 and r.request_id == "r1"
    assert (r.sampling.temperature, r.sampling.top_k, r.sampling.top_p, r.sampling.seed) == (0.5, 3, 0.9, 7)
    assert r.sampling.min_p == pytest.approx(0.1)
    assert list(r.stop) == ["x"] and list(r.stop_token_ids) == [1] and r.ignore_eos and r.logprobs
    assert r.speculation.method == pb.METHOD_NGRAM and r.speculation.gamma == 2
    assert not r.speculation.HasField("gamma_max")
    unset = build_request(token_ids=[1, 2])
    assert list(unset.token_ids.ids) == [1, 2]
    assert not unset.HasField("max_new_tokens") and not unset.sampling.HasField("temperature")
    chat = build_request(messages=[{"role": "user", "content": "x"}])
    assert chat.WhichOneof("prompt") == "messages"
    with pytest.raises(ValueError):
        build_request("a", token_ids=[1])
    with pytest.raises(ValueError):
        build_request("a", method="magic")


def test_sync_client(server):
    with Client(server.address, timeout=30) as c:
        assert c.health() == "SERVING"
        assert c.model_info().vocab_size == 320
        r = c.generate("def add(a, b):", max_new_tokens=10, ignore_eos=True)
        msgs = list(c.stream("def add(a, b):", max_new_tokens=10, ignore_eos=True))
        assert "".join(m.chunk.text for m in msgs if m.HasField("chunk")) == r.text
        assert msgs[-1].summary.usage.completion_tokens == 10
        with pytest.raises(grpc.RpcError) as e:
            c.generate("x", top_p=1.5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_async_client_and_early_stop_frees_the_server(server):
    async def main():
        async with AsyncClient(server.address, timeout=30) as c:
            assert await c.health() == "SERVING"
            r = await c.generate("Café", max_new_tokens=8, ignore_eos=True)
            text = ""
            async for m in c.stream("Café", max_new_tokens=8, ignore_eos=True):
                if m.HasField("chunk"):
                    text += m.chunk.text
            assert text == r.text
            # leaving a long stream early cancels it on the server
            stream = c.stream("Café", max_new_tokens=400, ignore_eos=True)
            async for _ in stream:
                break
            await stream.aclose()
            return r

    r = asyncio.run(main())
    assert r.summary.usage.completion_tokens == 8
    assert wait_until(server.idle, 5)
