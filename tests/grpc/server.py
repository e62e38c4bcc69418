"""A gRPC server for the tests, without generated code: raw-bytes methods
of service echo.Echo. Usage: server.py PORT [CERT KEY] (TLS with ALPN h2
when a certificate is given, else h2c). Prints "listening" when ready."""

import sys
import time
from concurrent import futures

import grpc

BIG = 64 * 1024 * 1024
OPTIONS = [
    ("grpc.max_receive_message_length", BIG),
    ("grpc.max_send_message_length", BIG),
]


def unary(request, context):
    context.set_trailing_metadata((("x-served", "unary"),))
    return b"unary:" + request


def server_stream(request, context):
    for i in range(int(request)):
        yield b"msg-%d" % i


def client_stream(requests, context):
    chunks = list(requests)
    return b"%d:%d" % (len(chunks), sum(len(c) for c in chunks))


def bidi(requests, context):
    for request in requests:
        yield b"echo:" + request


def fail(request, context):
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad thing: " + request.decode())


def slow(request, context):
    time.sleep(5)
    return b"too late"


def big(request, context):
    return request


def main():
    port = int(sys.argv[1])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=OPTIONS)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "echo.Echo",
                {
                    "Unary": grpc.unary_unary_rpc_method_handler(unary),
                    "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
                    "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
                    "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
                    "Fail": grpc.unary_unary_rpc_method_handler(fail),
                    "Slow": grpc.unary_unary_rpc_method_handler(slow),
                    "Big": grpc.unary_unary_rpc_method_handler(big),
                },
            ),
        )
    )
    address = "127.0.0.1:%d" % port
    if len(sys.argv) > 3:
        with open(sys.argv[2], "rb") as c, open(sys.argv[3], "rb") as k:
            credentials = grpc.ssl_server_credentials(((k.read(), c.read()),))
        server.add_secure_port(address, credentials)
    else:
        server.add_insecure_port(address)
    server.start()
    print("listening", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
