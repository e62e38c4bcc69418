"""Calls the test server's echo.Echo methods through TARGET (host:port),
over TLS trusting CA_FILE and naming HOST (SNI and :authority), or in
cleartext when CA_FILE is "-". Prints one JSON object of what came back.
With MODE "pingpong" it makes one bidirectional call message by message
instead: it sends "1", prints "first <answer>" once the answer is back,
waits for a line on stdin, sends "2", and prints "done <answers>".
Usage: client.py TARGET HOST CA_FILE [MODE]"""

import json
import queue
import sys

import grpc

BIG = 64 * 1024 * 1024


def main():
    target, host, ca = sys.argv[1:4]
    options = [
        ("grpc.default_authority", host),
        ("grpc.max_receive_message_length", BIG),
        ("grpc.max_send_message_length", BIG),
    ]
    if ca == "-":
        channel = grpc.insecure_channel(target, options=options)
    else:
        with open(ca, "rb") as f:
            credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        options.append(("grpc.ssl_target_name_override", host))
        channel = grpc.secure_channel(target, credentials, options=options)
    if sys.argv[4:] == ["pingpong"]:
        pingpong(channel)
        return
    out = {}
    response, call = channel.unary_unary("/echo.Echo/Unary").with_call(b"hi", timeout=20)
    out["unary"] = response.decode()
    out["unary_trailer"] = dict(call.trailing_metadata()).get("x-served")
    out["server_stream"] = [
        m.decode() for m in channel.unary_stream("/echo.Echo/ServerStream")(b"5", timeout=20)
    ]
    out["client_stream"] = channel.stream_unary("/echo.Echo/ClientStream")(
        iter([b"a", b"bb", b"ccc"]), timeout=20
    ).decode()
    out["bidi"] = [
        m.decode()
        for m in channel.stream_stream("/echo.Echo/Bidi")(iter([b"x", b"y", b"z"]), timeout=20)
    ]
    try:
        channel.unary_unary("/echo.Echo/Fail")(b"nope", timeout=20)
        out["fail"] = "no error"
    except grpc.RpcError as e:
        out["fail"] = [e.code().name, e.details()]
    try:
        channel.unary_unary("/echo.Echo/Slow")(b"", timeout=0.5)
        out["deadline"] = "no error"
    except grpc.RpcError as e:
        out["deadline"] = e.code().name
    payload = bytes(range(256)) * (10 * 1024 * 1024 // 256)
    echoed = channel.unary_unary("/echo.Echo/Big")(payload, timeout=60)
    out["big"] = [len(echoed), echoed == payload]
    print(json.dumps(out), flush=True)


def pingpong(channel):
    """Each message goes only once the previous answer came back, so the
    call finishes only if both directions stream."""
    outbox = queue.Queue()

    def requests():
        while (message := outbox.get()) is not None:
            yield message

    answers = channel.stream_stream("/echo.Echo/Bidi")(requests(), timeout=60)
    outbox.put(b"1")
    print("first " + next(answers).decode(), flush=True)
    sys.stdin.readline()
    outbox.put(b"2")
    second = next(answers).decode()
    outbox.put(None)
    rest = [m.decode() for m in answers]
    print("done " + json.dumps([second] + rest), flush=True)


if __name__ == "__main__":
    main()
