"""Fixtures for the server, client and CLI tests: real servers on 127.0.0.1, ephemeral ports, tiny models.

``ServerThread`` runs a ``SpecDecServer`` on its own asyncio loop in a background thread, so tests talk to it
through real gRPC channels and can still look at its scheduler. ``ControlledEngine`` wraps an engine to make
steps slow, hold them at a gate, or fail them, so that timing-dependent tests (deadline, cancel, queue full,
shutdown) are deterministic.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import grpc
import pytest

from specdec.engine import Engine, EngineConfig
from specdec.serving.server import ServerConfig, SpecDecServer
from specdec.v1 import specdec_pb2_grpc as pb_grpc

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.01) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class ControlledEngine:
    """Delegates to an engine; ``step_batch`` can sleep, wait at a gate, or fail for chosen request ids."""

    def __init__(self, engine: Engine, *, delay: float = 0.0) -> None:
        self._engine = engine
        self.delay = delay
        self.gate = threading.Event()
        self.gate.set()
        self.fail_ids: set[str] = set()
        self.stepped: list = []  # every sequence ever stepped
        self.step_calls = 0

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def step_batch(self, seqs):
        self.step_calls += 1
        if not self.gate.wait(30):
            raise TimeoutError("test gate never opened")
        if self.delay:
            time.sleep(self.delay)
        for s in seqs:
            if s not in self.stepped:
                self.stepped.append(s)
            if s.request.request_id in self.fail_ids:
                raise RuntimeError(f"injected failure for {s.request.request_id}")
        return self._engine.step_batch(seqs)


class ServerThread:
    def __init__(self, config: ServerConfig, engine=None, loader=None) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop", daemon=True)
        self._thread.start()
        self.server: SpecDecServer = self.call(_make(config, engine, loader))
        self.port = self.call(self.server.start())
        self.address = f"127.0.0.1:{self.port}"

    def call(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def wait_ready(self, timeout: float = 60.0) -> bool:
        return self.call(self.server.wait_ready(), timeout)

    @property
    def scheduler(self):
        return self.server.scheduler

    def idle(self) -> bool:
        s = self.scheduler
        return s is not None and s.running == 0 and s.waiting == 0 and not s.busy

    def shutdown(self, grace: float = 5.0) -> None:
        async def go():
            await self.server.shutdown(grace)

        self.call(go(), timeout=grace + 30)

    def begin_shutdown(self, grace: float = 5.0):
        """Start a graceful shutdown without waiting for it; returns a concurrent future."""

        async def go():
            await self.server.shutdown(grace)

        return asyncio.run_coroutine_threadsafe(go(), self.loop)

    def close(self) -> None:
        try:
            if self.server._shutdown_task is None or not self.server._stopped.is_set():
                self.shutdown(1.0)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address)

    def stub(self, channel: grpc.Channel | None = None) -> pb_grpc.SpecDecodeStub:
        return pb_grpc.SpecDecodeStub(channel or self.channel())


async def _make(config, engine, loader) -> SpecDecServer:
    return SpecDecServer(config, engine=engine, loader=loader)


def test_config(**kw) -> ServerConfig:
    kw.setdefault("metrics_port", 0)
    return ServerConfig(host="127.0.0.1", port=0, grace_s=5.0, **kw)


test_config.__test__ = False  # not a test


def load_engine(tiny_dirs, draft: str | None = "draft_other", **config) -> Engine:
    return Engine.load(tiny_dirs["target"], tiny_dirs[draft] if draft else None, dtype="float32",
                       draft_dtype="float32", config=EngineConfig(**config))  # fmt: skip


@pytest.fixture(scope="session")
def chat_target_dir(tiny_dirs, tmp_path_factory) -> str:
    """The tiny target with a chat template added to its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(tmp_path_factory.mktemp("chat")) / "target_chat"
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["target"])
    tok = AutoTokenizer.from_pretrained(tiny_dirs["target"])
    tok.chat_template = CHAT_TEMPLATE
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def reference_engine(tiny_dirs) -> Engine:
    """An engine of its own, for computing expected outputs directly (never shared with a server)."""
    return load_engine(tiny_dirs)


@pytest.fixture(scope="module")
def server(tiny_dirs):
    """A plain server: tiny target + draft_other, fast steps."""
    s = ServerThread(test_config(), engine=load_engine(tiny_dirs))
    yield s
    s.close()


@pytest.fixture
def slow_server(tiny_dirs):
    """A server whose steps each take >= 50 ms (deadline and cancellation tests), max_running 4."""
    engine = ControlledEngine(load_engine(tiny_dirs), delay=0.05)
    s = ServerThread(test_config(max_running=4), engine=engine)
    s.engine = engine
    yield s
    engine.gate.set()
    s.close()
