"""A client process that starts a long stream, says so after its first chunk, then waits to be killed
(``load.kill_clients``): ``python -m specdec.loadtest.killed_client ADDRESS PROMPT MAX_NEW_TOKENS``."""

from __future__ import annotations

import sys

import grpc

from specdec.v1 import specdec_pb2 as pb
from specdec.v1 import specdec_pb2_grpc as pb_grpc


def main(address: str, prompt: str, max_new_tokens: int) -> None:
    with grpc.insecure_channel(address) as ch:
        request = pb.GenerateRequest(text=prompt, max_new_tokens=max_new_tokens, ignore_eos=True)
        for _ in pb_grpc.SpecDecodeStub(ch).GenerateStream(request, timeout=600):
            print("streaming", flush=True)
            sys.stdin.readline()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
