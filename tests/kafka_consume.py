#!/usr/bin/env python3
"""The independent consumer of Postern's event tests (confluent-kafka, not
Postern's own code).

Reads every message of the given topics from the beginning up to "now" and
prints each as one JSON line:
  {"topic": ..., "partition": n, "offset": n, "key": str|null, "value": <event JSON>}

"Now" is marked by writing an end marker to every partition before reading:
tansu reports wrong high watermarks, and a marker written after the edge
confirmed its deliveries comes after all of them (and after any duplicate)
in its partition. Exits non-zero if a marker does not arrive in --timeout s.
"""

import argparse
import json
import sys
import time
import uuid

from confluent_kafka import Consumer, Producer, TopicPartition


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--brokers", required=True)
    parser.add_argument("--topic", action="append", required=True)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--tls-ca", help="connect with TLS, trusting this CA (PEM)")
    parser.add_argument("--tls-cert", help="client certificate (PEM), with --tls-key")
    parser.add_argument("--tls-key")
    args = parser.parse_args()

    common = {"bootstrap.servers": args.brokers}
    if args.tls_ca:
        common.update({"security.protocol": "ssl", "ssl.ca.location": args.tls_ca})
    if args.tls_cert:
        common.update({"ssl.certificate.location": args.tls_cert,
                       "ssl.key.location": args.tls_key})
    marker = "end-marker-" + uuid.uuid4().hex
    producer = Producer(dict(common))
    consumer = Consumer({
        **common,
        "group.id": "independent-" + uuid.uuid4().hex,
        "enable.auto.commit": False,
    })
    assignment = []
    open_partitions = set()
    for topic in args.topic:
        metadata = consumer.list_topics(topic, timeout=10)
        partitions = metadata.topics[topic].partitions
        if not partitions:
            sys.exit(f"topic {topic} has no partitions")
        for p in partitions:
            producer.produce(topic, value=marker.encode(), partition=p)
            assignment.append(TopicPartition(topic, p, 0))
            open_partitions.add((topic, p))
    if producer.flush(10) != 0:
        sys.exit("end markers were not delivered")
    consumer.assign(assignment)

    deadline = time.time() + args.timeout
    out = sys.stdout
    while open_partitions:
        if time.time() > deadline:
            sys.exit(f"no end marker from {sorted(open_partitions)}")
        message = consumer.poll(0.2)
        if message is None:
            continue
        if message.error():
            sys.exit(f"consumer error: {message.error()}")
        value = message.value() or b""
        if value == marker.encode():
            open_partitions.discard((message.topic(), message.partition()))
            continue
        if value.startswith(b"end-marker-"):
            continue
        key = message.key()
        out.write(json.dumps({
            "topic": message.topic(),
            "partition": message.partition(),
            "offset": message.offset(),
            "key": key.decode() if key is not None else None,
            "value": json.loads(value),
        }) + "\n")
    out.flush()
    consumer.close()


if __name__ == "__main__":
    main()
