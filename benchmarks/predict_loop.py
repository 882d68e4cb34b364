"""Loop `/predict` (every task of the demo + base, 4 random images each) until STOP_FILE exists; count
the answers, the failures and the base versions seen (GET /health). Writes OUT as JSON and prints it.

    python benchmarks/predict_loop.py OUT.json STOP_FILE [--url http://127.0.0.1:8765] [--once]

Used by benchmarks/base_upgrade.sh to show that serving answers throughout a base switch."""

from __future__ import annotations

import argparse
import base64
import io
import json
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

TASKS = ["base", "digits-inverted", "digits-rot90", "digits-parity", "glyphs", "shapes"]


def _images(count: int) -> list[str]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
        out.append(base64.b64encode(buffer.getvalue()).decode())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("stop_file", type=Path)
    parser.add_argument("--url", default="http://127.0.0.1:8765")
    parser.add_argument("--once", action="store_true")
    args = parser.parse_args()
    body = {"items": [{"task": t, "image": image} for t in TASKS for image in _images(4)]}
    ok = failed = 0
    codes: dict[str, int] = {}
    versions: list[tuple[float, object]] = []
    answers = None
    started = time.time()
    while True:
        try:
            reply = httpx.post(args.url + "/predict", json=body, timeout=30)
            codes[str(reply.status_code)] = codes.get(str(reply.status_code), 0) + 1
            if reply.status_code == 200:
                ok, answers = ok + 1, reply.json()
            else:
                failed += 1
            version = httpx.get(args.url + "/health", timeout=10).json().get("base_version")
            if not versions or versions[-1][1] != version:
                versions.append((round(time.time() - started, 1), version))
        except httpx.HTTPError as exc:
            failed += 1
            codes[type(exc).__name__] = codes.get(type(exc).__name__, 0) + 1
        if args.once or args.stop_file.exists():
            break
        time.sleep(0.2)
    result = {"ok": ok, "failed": failed, "codes": codes, "base_versions_seen": versions,
              "seconds": round(time.time() - started, 1), "answers": answers}
    args.out.write_text(json.dumps(result))
    print(json.dumps({k: v for k, v in result.items() if k != "answers"}))


if __name__ == "__main__":
    main()
