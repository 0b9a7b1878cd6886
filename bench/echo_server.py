"""A bare grpc.aio server: one unary method that answers every call with a canned payload.

The baseline for the overhead benchmark: the same Python gRPC stack, process model and payload
sizes as the inference server, with no work in the handler.
Usage: python bench/echo_server.py RESPONSE_BYTES  (prints "port N" once listening)
"""

from __future__ import annotations

import asyncio
import sys

import grpc

METHOD = "/bench.Echo/Call"


async def main(response_bytes: int) -> None:
    payload = b"\0" * response_bytes

    async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return payload

    handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "Call": grpc.unary_unary_rpc_method_handler(call)})  # bytes in, bytes out
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"port {port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
