"""`deltapatch bench-serve --hostile`: the serving app under attack while well-behaved clients keep
sending, on loopback, bounded in count and time (docs/security.md, docs/serving.md).

    metrics, attacks = run_bench_hostile(params, out_dir=Path("bench-results/hostile"))

1. starts `deltapatch serve` as a child process on a free 127.0.0.1 port (bench_serve.ServerProcess);
2. *calm* phase, `seconds` long: `clients` well-behaved clients send mixed-task batches of `batch`
   images, and a prober GETs /health every `health_every` seconds;
3. *hostile* phase, as long, the same clients and prober plus the attackers:
   - `slow_senders` connections that announce a body and trickle it at one byte per second (the
     server must cut them off after serve.read_timeout: 408);
   - `attackers` senders each (back to back, or `attack_rate` requests/s each) of: an item list far above serve.max_items (413, counted
     while the body streams), a pixel flood (solid-colour images each under serve.max_image_pixels,
     together above serve.max_request_pixels: 413 from the headers, nothing decoded), a CSRF-style
     ``text/plain`` POST (415) and a foreign Host header (421);
4. reports for each phase the good clients' throughput, p50/p99 latency and errors and /health's p50/p99,
   the attacks by kind and status, and the targets (0 × 5xx, /health p99 < 1 s, hostile throughput
   ≥ 0.7 × calm); writes OUT/bench-hostile.csv, attacks.csv and bench-hostile.md.
"""

from __future__ import annotations

import asyncio
import base64
import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
from PIL import Image

from deltapatch.bench_serve import (
    BenchServeSettings,
    Payloads,
    ServerProcess,
    client_headers,
    free_port,
    markdown_table,
    percentile,
    run_settings,
    served_tasks,
)
from deltapatch.data.images import encode_png
from deltapatch.serve import ServeSettings, serve_settings

ATTACK_KINDS = ("slow-sender", "too-many-items", "pixel-flood", "csrf-text-plain", "foreign-host")
# What the server must answer each attack; a slow sender may still be trickling when the phase ends
# (status -1: closed by the benchmark) if serve.read_timeout is longer than the phase.
EXPECTED_ATTACK = {"slow-sender": 408, "too-many-items": 413, "pixel-flood": 413, "csrf-text-plain": 415,
                   "foreign-host": 421}
STILL_OPEN = -1
HEALTH_P99_S, THROUGHPUT_RATIO = 1.0, 0.7


@dataclass
class Sample:
    """One request: who sent it, in which phase, its status (0: connection error) and its timing."""

    phase: str
    kind: str
    status: int
    start: float
    end: float


class Attacks:
    """Pre-built hostile request bodies (the attackers then spend little CPU per request)."""

    def __init__(self, limits: ServeSettings, tiny_png_b64: str) -> None:
        many = limits.max_items * 4
        self.too_many_items = ('{"items": [' + ",".join(
            f'{{"task": "base", "image": "{tiny_png_b64}"}}' for _ in range(many)) + "]}").encode()
        side = math.isqrt(limits.max_image_pixels)  # each image within the per-image limit ...
        count = limits.max_request_pixels // (side * side) + 1  # ... together above the per-request one
        flat = base64.b64encode(encode_png(Image.new("RGB", (side, side), (200, 40, 40)))).decode()
        self.pixel_flood = ('{"items": [' + ",".join(
            f'{{"task": "base", "image": "{flat}"}}' for _ in range(count)) + "]}").encode()
        self.csrf = ('{"items": [{"task": "base", "image": "' + tiny_png_b64 + '"}]}').encode()


async def _slow_sender(host: str, port: int, headers: dict[str, str], stop_at: float, out: list[Sample]) -> None:
    """Slow requests one after the other on new connections until the phase ends."""
    while time.monotonic() < stop_at:
        await _slow_request(host, port, headers, stop_at, out)


async def _slow_request(host: str, port: int, headers: dict[str, str], stop_at: float, out: list[Sample]) -> None:
    """Announce a 64 KiB body and send one byte a second until the server answers or the phase ends."""
    start = time.monotonic()
    status = STILL_OPEN
    writer = None
    try:
        reader, writer = await asyncio.open_connection(host, port)
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write((f"POST /predict HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                      f"Content-Length: 65536\r\n{extra}\r\n").encode())
        await writer.drain()
        while time.monotonic() < stop_at:
            try:
                line = await asyncio.wait_for(reader.readline(), timeout=1.0)
            except TimeoutError:
                writer.write(b" ")
                await writer.drain()
                continue
            status = int(line.split()[1]) if line.startswith(b"HTTP/") else 0  # b"": closed without an answer
            break
    except (OSError, ValueError, IndexError):
        status = 0
        await asyncio.sleep(0.5)  # refused at once: do not spin
    finally:
        if writer is not None:
            writer.close()
    out.append(Sample("hostile", "slow-sender", status, start, time.monotonic()))


async def _sender(client: httpx.AsyncClient, phase: str, kind: str, stop_at: float, out: list[Sample],
                  budget: list[int], rate: float = 0.0, **request: Any) -> None:
    """Send `request` until the phase ends or the shared request budget is spent: back to back, or
    at most `rate` per second when it is above 0."""
    while time.monotonic() < stop_at and budget[0] > 0:
        budget[0] -= 1
        start = time.monotonic()
        try:
            status = (await client.request(**request)).status_code
        except httpx.TransportError:
            status = 0
        out.append(Sample(phase, kind, status, start, time.monotonic()))
        if rate > 0:
            await asyncio.sleep(max(0.0, 1.0 / rate - (time.monotonic() - start)))


async def _prober(client: httpx.AsyncClient, phase: str, every: float, stop_at: float, out: list[Sample]) -> None:
    while time.monotonic() < stop_at:
        start = time.monotonic()
        try:
            status = (await client.get("/health")).status_code
        except httpx.TransportError:
            status = 0
        out.append(Sample(phase, "health", status, start, time.monotonic()))
        await asyncio.sleep(max(0.0, every - (time.monotonic() - start)))


async def _phase(url: str, phase: str, settings: BenchServeSettings, headers: dict[str, str], payloads: Payloads,
                 attacks: Attacks | None) -> list[Sample]:
    out: list[Sample] = []
    stop_at = time.monotonic() + settings.seconds
    budget, attack_budget = [settings.max_requests], [settings.max_requests]  # good clients / attackers
    limits = httpx.Limits(max_connections=settings.clients + 8 * settings.attackers + 2)
    json_headers = {**headers, "content-type": "application/json"}
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        jobs = [_prober(client, phase, settings.health_every, stop_at, out)]
        jobs += [_sender(client, phase, "good", stop_at, out, budget, method="POST", url="/predict",
                         content=payloads.good[i % len(payloads.good)], headers=json_headers)
                 for i in range(settings.clients)]
        if attacks is not None:
            host, port = url.removeprefix("http://").rsplit(":", 1)
            jobs += [_slow_sender(host, int(port), headers, stop_at, out) for _ in range(settings.slow_senders)]
            hostile = {
                "too-many-items": {"content": attacks.too_many_items, "headers": json_headers},
                "pixel-flood": {"content": attacks.pixel_flood, "headers": json_headers},
                "csrf-text-plain": {"content": attacks.csrf, "headers": {**headers, "content-type": "text/plain"}},
                "foreign-host": {"content": attacks.csrf, "headers": {**json_headers, "host": "attacker.example"}},
            }
            jobs += [_sender(client, phase, kind, stop_at, out, attack_budget, settings.attack_rate, method="POST",
                             url="/predict", **request)
                     for kind, request in hostile.items() for _ in range(settings.attackers)]
        await asyncio.gather(*jobs)
    return out


def _latencies_ms(samples: list[Sample], kind: str) -> list[float]:
    return [1000 * (s.end - s.start) for s in samples if s.kind == kind and s.status == 200]


def summarise(samples: list[Sample], settings: BenchServeSettings) -> pd.DataFrame:
    """metric, value, target, met (None where there is no target)."""
    rows: list[tuple[str, Any, str, bool | None]] = []
    throughput: dict[str, float] = {}
    # The hostile figures count only what was sent and answered while the floods ran: the attackers'
    # request budget can run out before the phase ends.
    floods = [s for s in samples if s.kind in EXPECTED_ATTACK and s.kind != "slow-sender"]
    flood_window = (min(s.start for s in floods), max(s.end for s in floods)) if floods else (0.0, float("inf"))
    for phase in ("calm", "hostile"):
        measured = [s for s in samples if s.phase == phase and s.kind in ("good", "health")
                    and (phase == "calm" or flood_window[0] <= s.start and s.end <= flood_window[1])]
        good = [s for s in measured if s.kind == "good"]
        ok = [s for s in good if s.status == 200]
        window = (max(s.end for s in good) - min(s.start for s in good)) if good else float("nan")
        throughput[phase] = len(ok) * settings.batch / window if good else 0.0
        health = _latencies_ms(measured, "health")
        failed_probes = sum(1 for s in measured if s.kind == "health" and s.status != 200)
        p99 = percentile(health, 99)
        good_ms = _latencies_ms(good, "good")
        rows += [
            (f"{phase}: good requests" + (" (while the floods ran)" if phase == "hostile" else ""), len(good), "", None),
            (f"{phase}: good requests not answered 200", len(good) - len(ok), "0", len(good) == len(ok)),
            (f"{phase}: good images/s", round(throughput[phase], 1), "", None),
            (f"{phase}: good latency p50 ms", round(percentile(good_ms, 50), 1), "", None),
            (f"{phase}: good latency p99 ms", round(percentile(good_ms, 99), 1), "", None),
            (f"{phase}: /health probes not answered 200", f"{failed_probes} of {len(health) + failed_probes}", "0",
             failed_probes == 0),
            (f"{phase}: /health p50 ms", round(percentile(health, 50), 1), "", None),
            (f"{phase}: /health p99 ms", round(p99, 1), f"< {HEALTH_P99_S * 1000:.0f}", p99 < HEALTH_P99_S * 1000),
        ]
    attacks = [s for s in samples if s.kind in EXPECTED_ATTACK]
    wrong = [s for s in attacks if s.status != EXPECTED_ATTACK[s.kind] and not
             (s.kind == "slow-sender" and s.status == STILL_OPEN)]
    ratio = throughput["hostile"] / throughput["calm"] if throughput["calm"] else float("nan")
    rows += [
        ("hostile: attack requests", len(attacks), "", None),
        ("hostile: seconds the floods ran", round(flood_window[1] - flood_window[0], 1) if floods else 0, "", None),
        ("attacks without their 4xx", len(wrong), "0", not wrong),
        ("responses 5xx (all phases, all senders)", sum(s.status >= 500 for s in samples), "0",
         not any(s.status >= 500 for s in samples)),
        ("connection errors of good clients and probes", sum(s.status == 0 for s in samples if s.kind in ("good", "health")),
         "0", not any(s.status == 0 for s in samples if s.kind in ("good", "health"))),
        ("good throughput hostile / calm", round(ratio, 3), f">= {THROUGHPUT_RATIO}", ratio >= THROUGHPUT_RATIO),
    ]
    frame = pd.DataFrame(rows, columns=["metric", "value", "target", "met"])
    frame["value"] = pd.Series([r[1] for r in rows], dtype=object)
    return frame


def attack_table(samples: list[Sample]) -> pd.DataFrame:
    """Attack requests by kind and status (0: connection error, -1: still open when the phase ended)."""
    counts = Counter((s.kind, s.status) for s in samples if s.kind in EXPECTED_ATTACK)
    rows = [(kind, EXPECTED_ATTACK[kind], status, n) for (kind, status), n in sorted(counts.items())]
    return pd.DataFrame(rows, columns=["kind", "expected", "status", "requests"])


def run_bench_hostile(params: dict[str, Any], out_dir: Path, **overrides: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run the benchmark (module docstring); `overrides` replace bench_serve settings (clients=…).
    Returns (metrics, attacks) and writes OUT/bench-hostile.csv, attacks.csv and bench-hostile.md."""
    settings = run_settings(params, overrides)
    limits = serve_settings(params)
    headers = client_headers(params)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    server = ServerProcess(params, free_port(), out_dir / "server.log")
    try:
        tasks = served_tasks(server, settings, headers)
        payloads = Payloads(params, tasks, settings.batch)
        attacks = Attacks(limits, payloads.pngs[0])
        cpu: dict[str, tuple[float, float]] = {}  # phase → (server CPU s, this process's CPU s)
        samples: list[Sample] = []
        for phase, attacking in (("calm", None), ("hostile", attacks)):
            server_before, own_before = server.cpu_seconds() or 0.0, time.process_time()
            samples += asyncio.run(_phase(server.url, phase, settings, headers, payloads, attacking))
            cpu[phase] = ((server.cpu_seconds() or 0.0) - server_before, time.process_time() - own_before)
        rss = server.peak_rss_mb()
    finally:
        server.stop()
    metrics = summarise(samples, settings)
    cpu_rows = [(f"{phase}: CPU s of the server / of the clients and attackers (this process)",
                 f"{server_s:.1f} / {own_s:.1f}", "", None) for phase, (server_s, own_s) in cpu.items()]
    metrics = pd.concat([metrics, pd.DataFrame(cpu_rows, columns=metrics.columns)], ignore_index=True)
    attacked = attack_table(samples)
    metrics.to_csv(out_dir / "bench-hostile.csv", index=False)
    attacked.to_csv(out_dir / "attacks.csv", index=False)
    header = (f"# deltapatch bench-serve --hostile\n\nTwo phases of {settings.seconds:g} s (at most "
              f"{settings.max_requests} requests each), {settings.clients} good clients × {settings.batch} images "
              f"(mixed tasks {['base', *tasks]}), /health every {settings.health_every:g} s; hostile phase adds "
              f"{settings.slow_senders} slow senders and {settings.attackers} sender(s) of each other attack "
              f"({'back to back' if settings.attack_rate <= 0 else f'{settings.attack_rate:g} requests/s each'}), "
              f"from this process, on the same CPUs as the server. "
              f"Server limits: serve.read_timeout {limits.read_timeout:g} s, max_items {limits.max_items}, "
              f"max_request_pixels {limits.max_request_pixels}, max_inflight {limits.max_inflight}, "
              f"limit_concurrency {limits.limit_concurrency}; {os.cpu_count()} CPUs; server peak RSS "
              f"{rss if rss is None else round(rss)} MB.\n\n")
    (out_dir / "bench-hostile.md").write_text(header + markdown_table(metrics) + "\n\nAttacks by kind and status:\n\n"
                                              + markdown_table(attacked) + "\n")
    return metrics, attacked
