"""The ceiling for Python on uvicorn: a minimal ASGI file server (held fd, os.pread).

Only what the benchmark sends: GET with or without one `bytes=a-b` range. Its figure, in the
same run as nginx, shows how much of the gap to nginx is uvicorn itself and how much is fdp.
Run: FDP_LEAN_FILE=/path/big.bin uvicorn bench.lean_asgi:app
"""

import os

FILE = os.environ["FDP_LEAN_FILE"]
FD = os.open(FILE, os.O_RDONLY)
SIZE = os.fstat(FD).st_size
CHUNK = 1 << 20


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    spec = dict(scope["headers"]).get(b"range")
    if spec:
        a, _, b = spec.decode()[6:].partition("-")
        start, end, status = int(a), int(b) + 1, 206
        extra = [(b"content-range", f"bytes {start}-{end - 1}/{SIZE}".encode())]
    else:
        start, end, status, extra = 0, SIZE, 200, []
    headers = [(b"content-length", str(end - start).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    while start < end:
        chunk = os.pread(FD, min(CHUNK, end - start), start)
        start += len(chunk)
        await send({"type": "http.response.body", "body": chunk, "more_body": start < end})
