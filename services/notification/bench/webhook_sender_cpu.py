"""Micro-benchmark (not a test): CPU per webhook delivery of `WebhookSender.send`.

Posts N deliveries (CONCURRENCY at a time, like a dispatcher's lanes) through one WebhookSender to a local
receiver running in a separate process (so that its CPU is not counted), and prints this process's
`time.process_time()` per delivery. Timing on a shared machine is noisy: run it a few times.

    .venv/bin/python services/notification/bench/webhook_sender_cpu.py [N] [CONCURRENCY]
"""

from __future__ import annotations

import asyncio
import multiprocessing
import socket
import sys
import time
import uuid

from notification_service.adapters.secret_box import DEV_KEY, SecretBox, new_signing_secret
from notification_service.adapters.webhooks import WebhookSender
from notification_service.domain.delivery import WebhookDelivery
from notification_service.domain.urls import UrlPolicy

BOX = SecretBox(DEV_KEY)
PAYLOAD = b'{"type":"order.submitted.v1","data":{"order_id":"' + b"x" * 36 + b'","coi":"V2V00-26-000042-K"}}'
ANSWER = b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n"


def receiver(sock: socket.socket) -> None:
    """A minimal keep-alive HTTP/1.1 receiver answering 204 to every request."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                if length:
                    await reader.readexactly(length)
                writer.write(ANSWER)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, sock=sock)
        await server.serve_forever()

    asyncio.run(main())


def delivery(url: str, sid: uuid.UUID, sealed: bytes) -> WebhookDelivery:
    return WebhookDelivery(
        event_id=uuid.uuid4(),
        event_type="order.submitted.v1",
        order_id=uuid.uuid4(),
        coi="V2V00-26-000042-K",
        treatment_center_id="TC-DE-BE-001",
        delivery_id=uuid.uuid4(),
        attempts=0,
        subscription_id=sid,
        url=url,
        sealed_secrets=(sealed,),
        payload=PAYLOAD,
    )


async def run(port: int, n: int, concurrency: int) -> None:
    sender = WebhookSender(5.0, BOX, UrlPolicy(allow_loopback=True))
    sid = uuid.uuid4()
    sealed = BOX.seal(new_signing_secret(), sid)
    url = f"http://127.0.0.1:{port}/hook"
    try:
        warm = [delivery(url, sid, sealed) for _ in range(concurrency * 4)]
        await asyncio.gather(*(sender.send(d) for d in warm))  # connections opened, code paths warm
        todo = [delivery(url, sid, sealed) for _ in range(n)]
        queue = iter(todo)
        bad = 0

        async def lane() -> None:
            nonlocal bad
            for d in queue:
                outcome = await sender.send(d)
                bad += outcome.status_code != 204

        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        print(
            f"{n} deliveries, {concurrency} at a time: {cpu / n * 1e6:.0f} µs CPU per delivery "
            f"({wall / n * 1e6:.0f} µs wall), {bad} not 204"
        )
    finally:
        await sender.aclose()


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    concurrency = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    proc = multiprocessing.Process(target=receiver, args=(sock,), daemon=True)
    proc.start()
    try:
        asyncio.run(run(sock.getsockname()[1], n, concurrency))
    finally:
        proc.terminate()
        proc.join()


if __name__ == "__main__":
    main()
