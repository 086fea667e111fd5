import os, signal, threading, time
import httpx
from tests.conftest import fdp_serve
from tests.test_queue import config, gets

def test_scratch_ctrl_c_with_held_request(upstream, tmp_path):
    upstream.fault("archived-a/B04", method="GET", delay=60)
    proxy = fdp_serve(config(upstream.url, tmp_path), tmp_path)
    with proxy.proc:
        t = threading.Thread(target=lambda: httpx.get(f"{proxy.url}/assets/vault/archived-a/B04.tif", timeout=60), daemon=True)
        t.start()
        while not gets(upstream, "archived-a/B04.tif"):
            time.sleep(0.05)
        t0 = time.monotonic()
        os.kill(proxy.proc.pid, signal.SIGINT)
        proxy.proc.proc.wait(30)
        print("TOOK", time.monotonic() - t0)
