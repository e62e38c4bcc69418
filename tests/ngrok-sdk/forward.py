"""ngrok's Python SDK against a Postern edge, as the tests run it.

`forward.py http`: `ngrok.forward` to the test's HTTP server.
`forward.py tcp`: `ngrok.forward` to a TCP service (bench/bulk.py).
`forward.py tls`: seed 002's Python TLS snippet ("Terminate at Edge"),
unchanged but for its server address and CA (and the names and paths the
test gives it).
Configuration comes from the environment the test sets; the process
prints the URL, then serves until it is killed.
"""

import os
import sys
import threading

import ngrok

# The two options that point the SDK at Postern.
server_addr = os.environ["POSTERN_SERVER_ADDR"]
# (a bytearray: the package refuses bytes)
session_ca_cert = bytearray(open(os.environ["POSTERN_CA"], "rb").read())
port = os.environ["UPSTREAM_PORT"]
domain = os.environ["ENDPOINT_DOMAIN"]


def load_file(name):
    with open(name, "r") as crt:
        return bytearray(crt.read().encode())


if sys.argv[1] == "http":
    listener = ngrok.forward(
        int(port),
        authtoken=os.environ["NGROK_AUTHTOKEN"],
        domain=domain,
        server_addr=server_addr,
        session_ca_cert=session_ca_cert,
    )
elif sys.argv[1] == "tcp":
    listener = ngrok.forward(
        f"127.0.0.1:{port}",
        proto="tcp",
        authtoken=os.environ["NGROK_AUTHTOKEN"],
        server_addr=server_addr,
        session_ca_cert=session_ca_cert,
    )
else:
    listener = ngrok.forward(f"localhost:{port}", authtoken_from_env=True,
                             proto="tls",
                             domain=domain,
                             crt=load_file(os.environ["CRT_PATH"]),
                             key=load_file(os.environ["KEY_PATH"]),
                             server_addr=server_addr,
                             session_ca_cert=session_ca_cert)
print(f"Ingress established at: {listener.url()}", flush=True)
threading.Event().wait()
