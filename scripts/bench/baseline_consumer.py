"""The ingest benchmark's baseline: a minimal consumer on PyPI's
confluent-kafka that prints each payload as one line of COPY text, to be piped
into `psql -c "\\copy baseline_events(payload) FROM STDIN"`.

usage: baseline_consumer.py BROKERS GROUP COUNT TOPIC [TOPIC...]
"""

import sys

from confluent_kafka import Consumer


def main() -> None:
    brokers, group, count, *topics = sys.argv[1:]
    count = int(count)
    consumer = Consumer(
        {
            "bootstrap.servers": brokers,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": True,
        }
    )
    consumer.subscribe(topics)
    out = sys.stdout.buffer
    seen = 0
    while seen < count:
        for message in consumer.consume(num_messages=10000, timeout=1.0):
            if message.error():
                continue
            # COPY text format: a backslash is the escape character. Compact
            # JSON holds no raw tabs or newlines, so nothing else needs escaping.
            out.write(message.value().replace(b"\\", b"\\\\"))
            out.write(b"\n")
            seen += 1
    out.flush()
    consumer.close()


if __name__ == "__main__":
    main()
