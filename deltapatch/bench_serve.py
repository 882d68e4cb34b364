"""`deltapatch bench-serve`: the serving app under load and bad input, on loopback (docs/serving.md).

    report = run_bench_serve(params, out_dir=Path("bench-results/serve"))

1. starts `deltapatch serve` (uvicorn, the project's champions) as a child process on a free
   127.0.0.1 port and waits for /health;
2. measures the ceiling in this process: the bare base model's forward throughput at the clients'
   batch size, before and after the load (and, for reference, the patched mixed-task forward);
3. runs `clients` concurrent clients for `seconds` (at most `max_requests` requests): mixed-task
   batches of `batch` images, and a `bad_fraction` share of bad requests (a decompression bomb, too
   many items, a body above the limit, too many pixels, an unknown task, bad base64), each of which
   must get its own 4xx;
4. half-way (in time or in requests), rolls one task's champion back through the registry API and records when the served
   answers switched version (the champion is put back at the end);
5. writes OUT/bench-serve.csv (metric, value, target, met) and OUT/bench-serve.md, and returns them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import torch
from PIL import Image

from deltapatch.bench.mixed_forward import MixedForwardResult, measure_mixed_forward
from deltapatch.config import ConfigError, project_root, section
from deltapatch.data.images import encode_png
from deltapatch.data.sources import base_eval_data
from deltapatch.errors import DeltapatchError
from deltapatch.models.base import base_weights_path, load_base
from deltapatch.registry import registry as R
from deltapatch.registry.runtime import Predictor
from deltapatch.registry.tracking import registry_settings
from deltapatch.serve import ChampionSync, serve_settings, serve_token
from deltapatch.train import Normalizer

BAD_KINDS = ("bomb", "too-many-items", "body-too-large", "too-many-pixels", "unknown-task", "bad-base64")
EXPECTED = {"good": 200, "bomb": 422, "too-many-items": 413, "body-too-large": 413, "too-many-pixels": 422,
            "unknown-task": 404, "bad-base64": 422}
RSS_FACTOR, RSS_EXTRA_MB = 20, 500  # target: peak server RSS below base size × 20 + 500 MB
MANY_ROUTES = 50  # the mixed-forward figure with this many served routes (synthetic copies of a champion)
MIXED_TARGET, MANY_ROUTES_TARGET = 0.8, 0.7  # mixed/bare forward targets: the served routes, MANY_ROUTES
PATCH_RSS_FACTOR = 2.0  # target: resident memory per served patch <= 2 × its patch file


@dataclass
class BenchServeSettings:
    """params.yaml `bench_serve:` section."""

    clients: int = 8                # concurrent clients
    seconds: float = 120.0          # load duration
    batch: int = 16                 # images per good request
    bad_fraction: float = 0.12      # share of bad requests
    max_requests: int = 20000       # hard bound on requests, whatever the duration
    ceiling_repeats: int = 30       # timed forwards for the ceiling (after 3 warm-up ones)
    rollback: bool = True           # roll one champion back half-way (and restore it at the end)
    startup_timeout: float = 180.0  # seconds for the server to answer /health
    # `--hostile` (deltapatch.bench_hostile): attackers beside the clients in its second phase
    slow_senders: int = 8           # connections that trickle a request body one byte per second
    attackers: int = 2              # concurrent senders of each other hostile request kind
    attack_rate: float = 0.0        # requests/s of each attacker; 0 = back to back (a flood)
    health_every: float = 0.2       # seconds between /health probes

    def __post_init__(self) -> None:
        if self.clients < 1 or self.batch < 1 or self.seconds <= 0 or self.max_requests < 1:
            raise ConfigError("params.yaml: bench_serve.clients, batch, seconds and max_requests must be positive")
        if not 0.0 <= self.bad_fraction < 1.0:
            raise ConfigError(f"params.yaml: bench_serve.bad_fraction must be in [0, 1), got {self.bad_fraction}")


@dataclass
class Outcome:
    kind: str
    status: int          # 0: connection error
    start: float
    end: float
    versions: list[str] = field(default_factory=list)  # versions answered for the rollback task


def bench_serve_settings(params: dict[str, Any]) -> BenchServeSettings:
    return section(params, "bench_serve", BenchServeSettings)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """`deltapatch serve` as a child process on 127.0.0.1 (the stack's uvicorn factory)."""

    def __init__(self, params: dict[str, Any], port: int, log_path: Path) -> None:
        env = {**os.environ, "DELTAPATCH_PROJECT": str(project_root(params))}
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "deltapatch.stack:serve_app_factory",
             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout: float, headers: dict[str, str]) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DeltapatchError(f"the server exited with code {self.proc.returncode}; see {self.log.name}")
            try:
                return httpx.get(self.url + "/tasks", headers=headers, timeout=2).raise_for_status().json()
            except httpx.HTTPError:
                time.sleep(0.5)
        raise DeltapatchError(f"the server did not answer within {timeout:.0f} s; see {self.log.name}")

    def peak_rss_mb(self) -> float | None:
        """Peak resident memory of the server process so far (Linux VmHWM), in MB."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the server process so far (Linux /proc), in seconds."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class ForwardCeiling:
    """The ceiling, measured in this process on the clients' batch (`images`, N×H×W×3 uint8): images/s
    of the bare base model's forward at the best of 1 and all torch threads (so a poor thread choice
    cannot lower it), with images per CPU-second; and, for reference, the patched mixed-task forward."""

    def __init__(self, params: dict[str, Any], images: np.ndarray, repeats: int) -> None:
        base = load_base(params, "cpu")
        self.model = base.model.eval()
        norm = Normalizer(base.settings.mean, base.settings.std, torch.device("cpu"))
        self.x = norm(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
        self.images, self.repeats = images, repeats
        self.predictor = Predictor(load_base(params, "cpu"))
        ChampionSync(params, self.predictor).refresh()

    def _rate(self, forward: Any, threads: int) -> tuple[float, float]:
        """(images/s, images per CPU-second) of `forward` at `threads` torch threads."""
        with torch_threads(threads), torch.inference_mode():
            for _ in range(3):
                forward()
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(self.repeats):
                forward()
            n = len(self.images) * self.repeats
            return n / (time.perf_counter() - wall), n / max(1e-9, time.process_time() - cpu)

    def bare(self) -> dict[int, tuple[float, float]]:
        return {t: self._rate(lambda: self.model(self.x), t) for t in sorted({1, os.cpu_count() or 1})}

    def mixed(self, threads: int) -> float:
        names = self.predictor.tasks()
        tasks = [names[i % len(names)] for i in range(len(self.images))]
        return self._rate(lambda: self.predictor.predict(self.images, tasks), threads)[0]

    def mixed_forward(self, threads: int, routes: int) -> MixedForwardResult:
        """The mixed-task forward against the bare one, alternating (deltapatch.bench.mixed_forward)."""
        with torch_threads(threads):
            return measure_mixed_forward(self.predictor, self.model, self.x, routes, repeats=max(1, self.repeats // 3))


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to `threads` inside the block, put back after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _best(rates: dict[int, tuple[float, float]]) -> tuple[int, float]:
    threads = max(rates, key=lambda t: rates[t][0])
    return threads, rates[threads][0]


def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A ~100-byte PNG whose header claims width × height pixels (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def _body(items: list[tuple[str, str]]) -> bytes:
    return json.dumps({"items": [{"task": task, "image": image} for task, image in items]}).encode()


class Payloads:
    """Pre-encoded request bodies (the clients then spend little CPU per request)."""

    def __init__(self, params: dict[str, Any], tasks: list[str], batch: int) -> None:
        limits = serve_settings(params)
        images = base_eval_data(params).test.images.permute(0, 2, 3, 1).numpy()[:64]
        self.batch_images = np.ascontiguousarray(images[:batch]) if len(images) >= batch else np.resize(
            images, (batch, *images.shape[1:]))
        pngs = [base64.b64encode(encode_png(img)).decode() for img in images]
        self.pngs = pngs  # base64 PNGs of real images, for other request bodies (bench_hostile)
        routes = ["base", *tasks]
        self.good = [_body([(routes[(i + j) % len(routes)], pngs[(i * batch + j) % len(pngs)]) for j in range(batch)])
                     for i in range(8)]
        side = math.isqrt(limits.max_image_pixels) + 1  # one pixel row too many, but no bomb
        flat = Image.new("RGB", (side, side), (90, 140, 200))
        b64 = {"bomb": base64.b64encode(bomb_png()).decode(), "big": base64.b64encode(encode_png(flat)).decode()}
        self.bad = {
            "bomb": _body([(tasks[0], pngs[0]), (tasks[0], b64["bomb"])]),
            "too-many-items": _body([("base", pngs[0])] * (limits.max_items + 1)),
            "body-too-large": b'{"items": [], "padding": "' + b"x" * limits.max_body_bytes + b'"}',
            "too-many-pixels": _body([("base", b64["big"])]),
            "unknown-task": _body([("no-such-task", pngs[0])] * 2),
            "bad-base64": _body([(tasks[0], "this is not base64!")]),
        }

    def pick(self, n: int, bad_fraction: float) -> tuple[str, bytes]:
        """The n-th request: bad ones spread evenly at `bad_fraction`, cycling through BAD_KINDS."""
        if bad_fraction > 0 and int((n + 1) * bad_fraction) > int(n * bad_fraction):
            kind = BAD_KINDS[int(n * bad_fraction) % len(BAD_KINDS)]
            return kind, self.bad[kind]
        return "good", self.good[n % len(self.good)]


async def _load(url: str, payloads: Payloads, settings: BenchServeSettings, headers: dict[str, str],
                watch_task: str | None, on_half: Any) -> list[Outcome]:
    """`clients` concurrent clients until `seconds` pass or `max_requests` were sent."""
    outcomes: list[Outcome] = []
    counter = iter(range(settings.max_requests))
    start = time.monotonic()
    end = start + settings.seconds
    half = asyncio.Event()
    limits = httpx.Limits(max_connections=settings.clients, max_keepalive_connections=settings.clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits,
                                 headers={**headers, "content-type": "application/json"}) as client:

        async def one_client() -> None:
            for n in counter:
                now = time.monotonic()
                if now >= end:
                    return
                halfway = now >= start + settings.seconds / 2 or n >= settings.max_requests // 2
                if halfway and not half.is_set():
                    half.set()
                    asyncio.get_running_loop().run_in_executor(None, on_half)
                kind, body = payloads.pick(n, settings.bad_fraction)
                t0 = time.monotonic()
                try:
                    response = await client.post("/predict", content=body)
                    status = response.status_code
                    versions = ([r["version"] for r in response.json()["results"] if r["task"] == watch_task]
                                if status == 200 and watch_task else [])
                except httpx.TransportError:
                    status, versions = 0, []
                outcomes.append(Outcome(kind, status, t0, time.monotonic(), versions))

        await asyncio.gather(*(one_client() for _ in range(settings.clients)))
    return outcomes


def _rollback_target(params: dict[str, Any], tasks: list[str]) -> tuple[str, int] | None:
    """(task, champion version) of a served task that has an older gate-passed version to roll back to."""
    alias = registry_settings(params).champion_alias
    for task in sorted(tasks):
        rows = R.list_patches(params, task)
        champion = next((r["version"] for r in rows if alias in r["aliases"]), None)
        if champion is not None and any(r["version"] < champion and r["gate"] == "passed" for r in rows):
            return task, int(champion)
    return None


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarise(outcomes: list[Outcome], settings: BenchServeSettings, ceiling: dict[str, Any],
              rollback: dict[str, Any], rss_mb: float | None, rss_limit_mb: float, poll_seconds: float) -> pd.DataFrame:
    """The metrics table: metric, value, target, met (None where there is no target)."""
    good = [o for o in outcomes if o.kind == "good"]
    ok = [o for o in good if o.status == 200]
    bad = [o for o in outcomes if o.kind != "good"]
    window = (max(o.end for o in outcomes) - min(o.start for o in outcomes)) if outcomes else float("nan")
    served = len(ok) * settings.batch / window if outcomes else 0.0
    bare_before, bare_after = _best(ceiling["before"])[1], _best(ceiling["after"])[1]
    bare = (bare_before + bare_after) / 2
    bare_cpu = (ceiling["before"][1][1] + ceiling["after"][1][1]) / 2
    per_cpu = len(ok) * settings.batch / ceiling["server_cpu_s"] if ceiling.get("server_cpu_s") else None
    latencies = [1000 * (o.end - o.start) for o in ok]
    # Requests the load could carry at 0.7 of the ceiling over its window: a target per duration and machine.
    wanted = math.ceil(0.7 * bare * window / settings.batch) if outcomes else 0
    rows: list[tuple[str, Any, str, bool | None]] = [
        ("requests", len(outcomes), f">= {wanted} (0.7 × ceiling × window / batch)", len(outcomes) >= wanted),
        ("bad requests share", round(len(bad) / max(1, len(outcomes)), 4), ">= 0.10",
         len(bad) / max(1, len(outcomes)) >= 0.10),
        ("responses 5xx", sum(o.status >= 500 for o in outcomes), "0", not any(o.status >= 500 for o in outcomes)),
        ("connection errors", sum(o.status == 0 for o in outcomes), "0", not any(o.status == 0 for o in outcomes)),
        ("bad requests without their 4xx", sum(o.status != EXPECTED[o.kind] for o in bad), "0",
         all(o.status == EXPECTED[o.kind] for o in bad)),
        ("good requests not answered 200", len(good) - len(ok), "0", len(good) == len(ok)),
        ("load window s", round(window, 2), "", None),
        (f"served images/s (batch {settings.batch}, {settings.clients} clients)", round(served, 1), "", None),
        (f"ceiling: bare base forward images/s (batch {settings.batch}; mean of before {bare_before:.1f} and "
         f"after {bare_after:.1f} the load)", round(bare, 1), "", None),
        ("served / ceiling", round(served / bare, 3), ">= 0.70", served / bare >= 0.7),
        (f"reference: in-process predict() images/s (batch {settings.batch}; normalise, mixed forward, softmax, "
         "answers)", round(ceiling["mixed"], 1), "", None),
        ("served images per server CPU-second", round(per_cpu, 1) if per_cpu else "n/a", "", None),
        ("bare forward images per CPU-second (1 thread, mean before/after)", round(bare_cpu, 1), "", None),
        *forward_rows(ceiling["forwards"], settings.batch),
        ("latency p50 ms", round(percentile(latencies, 50), 1), "", None),
        ("latency p95 ms", round(percentile(latencies, 95), 1), "", None),
        ("latency p99 ms", round(percentile(latencies, 99), 1), "", None),
    ]
    if rollback.get("done") is not None:
        new = str(rollback["to_version"])
        seen = [o.end for o in outcomes if new in o.versions]
        visible = (min(seen) - rollback["done"]) if seen else float("nan")
        lo, hi = rollback["done"] - poll_seconds - 1, (min(seen) if seen else rollback["done"]) + poll_seconds + 1
        around = sum(1 for o in good if o.status != 200 and lo <= o.end <= hi)
        stale = sum(1 for o in outcomes if seen and o.start > min(seen) and str(rollback["from_version"]) in o.versions)
        rows += [
            (f"rollback {rollback['task']} v{rollback['from_version']}→v{new}: visible after s", round(visible, 2),
             f"<= {poll_seconds + 1:g}", bool(seen) and visible <= poll_seconds + 1),
            ("failed requests around the rollback", around, "0", around == 0),
            ("old version answered after the switch", stale, "0", stale == 0),
        ]
    else:
        rows.append(("rollback", rollback.get("skipped", "not run"), "run", False))
    rows.append(("server peak RSS MB", round(rss_mb, 1) if rss_mb is not None else "n/a",
                 f"<= {rss_limit_mb:.0f}", rss_mb is not None and rss_mb <= rss_limit_mb))
    frame = pd.DataFrame(rows, columns=["metric", "value", "target", "met"])
    frame["value"] = pd.Series([r[1] for r in rows], dtype=object)  # counts stay integers
    return frame


def forward_rows(forwards: list[MixedForwardResult], batch: int) -> list[tuple[str, Any, str, bool | None]]:
    """The in-process mixed-task forward against the bare one, per route count, and memory per patch."""
    rows: list[tuple[str, Any, str, bool | None]] = []
    for result in forwards:
        target = MANY_ROUTES_TARGET if result.routes >= MANY_ROUTES else MIXED_TARGET
        rows.append((f"mixed-task forward / bare forward, {result.routes} served routes (batch {batch}, in-process; "
                     f"{result.mixed:.1f} vs {result.bare:.1f} images/s)", round(result.ratio, 3), f">= {target:.2f}",
                     result.ratio >= target))
        if result.rss_per_patch_mb is not None and result.patch_file_mb:
            factor = result.rss_per_patch_mb / result.patch_file_mb
            rows.append((f"resident memory per served patch / its patch file ({result.rss_per_patch_mb:.2f} vs "
                         f"{result.patch_file_mb:.2f} MB)", round(factor, 2), f"<= {PATCH_RSS_FACTOR:g}",
                         factor <= PATCH_RSS_FACTOR))
    return rows


def status_table(outcomes: list[Outcome]) -> pd.DataFrame:
    """Requests by kind and HTTP status (0 = connection error), with the status each kind expects."""
    counts = Counter((o.kind, o.status) for o in outcomes)
    rows = [(kind, EXPECTED[kind], status, n) for (kind, status), n in sorted(counts.items())]
    return pd.DataFrame(rows, columns=["kind", "expected", "status", "requests"])


def markdown_table(frame: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def run_settings(params: dict[str, Any], overrides: dict[str, Any]) -> BenchServeSettings:
    """params.yaml `bench_serve:` with the given overrides (None: keep the file's value)."""
    raw = {**(params.get("bench_serve") or {}), **{k: v for k, v in overrides.items() if v is not None}}
    return section({"bench_serve": raw}, "bench_serve", BenchServeSettings)


def client_headers(params: dict[str, Any]) -> dict[str, str]:
    """The bearer token a client of the served app sends (none when serving without one)."""
    token = serve_token(serve_settings(params))
    return {"Authorization": f"Bearer {token}"} if token else {}


def served_tasks(server: ServerProcess, settings: BenchServeSettings, headers: dict[str, str]) -> list[str]:
    """The patched tasks the started server serves, once it answers; refused when it serves none."""
    listed = server.wait_healthy(settings.startup_timeout, headers)
    tasks = sorted(t for t in listed if t not in ("base", "refused", "unavailable"))
    if not tasks:
        raise DeltapatchError("no champion patch is served; promote one first (deltapatch run PATH) "
                              "so the benchmark can send mixed-task batches")
    return tasks


def run_bench_serve(params: dict[str, Any], out_dir: Path, **overrides: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run the benchmark (module docstring); `overrides` replace bench_serve settings (clients=…).
    Returns (metrics, status counts) and writes OUT/bench-serve.csv, status.csv and bench-serve.md."""
    settings = run_settings(params, overrides)
    headers = client_headers(params)
    poll = float(registry_settings(params).poll_seconds)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rollback: dict[str, Any] = {}
    server = ServerProcess(params, free_port(), out_dir / "server.log")
    try:
        tasks = served_tasks(server, settings, headers)
        payloads = Payloads(params, tasks, settings.batch)
        load_before = os.getloadavg()[0]
        meter = ForwardCeiling(params, payloads.batch_images, settings.ceiling_repeats)
        bare_before = meter.bare()
        threads = _best(bare_before)[0]
        mixed = meter.mixed(threads)
        forwards = [meter.mixed_forward(threads, routes) for routes in (len(tasks) + 1, MANY_ROUTES)]
        target = _rollback_target(params, tasks) if settings.rollback else None
        if target is None:
            rollback["skipped"] = "no served task has an older gate-passed version" if settings.rollback else "off"

        def roll_back() -> None:
            if target is not None:
                try:
                    old, new = R.rollback(params, target[0], reason="bench-serve: rollback under load")
                except DeltapatchError as exc:
                    rollback["skipped"] = f"failed: {exc}"
                    return
                rollback.update(task=target[0], from_version=old, to_version=new, done=time.monotonic())

        cpu_start = server.cpu_seconds()
        outcomes = asyncio.run(_load(server.url, payloads, settings, headers, target[0] if target else None, roll_back))
        cpu_end = server.cpu_seconds()
        time.sleep(0.5)
        rss = server.peak_rss_mb()
        load_after = os.getloadavg()[0]
        bare_after = meter.bare()  # the machine may be busier or quieter than before: both count
        ceiling = {"before": bare_before, "after": bare_after, "mixed": mixed, "forwards": forwards,
                   "server_cpu_s": None if cpu_start is None or cpu_end is None else cpu_end - cpu_start}
    finally:
        server.stop()
        if rollback.get("done") is not None:
            R.promote(params, rollback["task"], rollback["from_version"], reason="bench-serve: restore after rollback")
    weights = base_weights_path(params)
    rss_limit = weights.stat().st_size / 2**20 * RSS_FACTOR + RSS_EXTRA_MB
    metrics = summarise(outcomes, settings, ceiling, rollback, rss, rss_limit, poll)
    statuses = status_table(outcomes)
    metrics.to_csv(out_dir / "bench-serve.csv", index=False)
    statuses.to_csv(out_dir / "status.csv", index=False)
    header = (f"# deltapatch bench-serve\n\n{settings.clients} clients, {settings.seconds:g} s (at most "
              f"{settings.max_requests} requests), {settings.batch} images per good request (32×32 PNG, mixed "
              f"tasks {['base', *tasks]}), bad share {settings.bad_fraction:g}; torch threads "
              f"{torch.get_num_threads()} in this process, {os.cpu_count()} CPUs; base weights {weights.stat().st_size / 2**20:.1f} MB; "
              f"registry.poll_seconds {poll:g}; serve.torch_threads {serve_settings(params).torch_threads} (0 = torch default); "
              f"bare forward images/s by torch threads, before {({k: round(v[0], 1) for k, v in bare_before.items()})}, "
              f"after {({k: round(v[0], 1) for k, v in bare_after.items()})}; "
              f"1-min load average {load_before:.1f} before, {load_after:.1f} after the load.\n\n")
    (out_dir / "bench-serve.md").write_text(header + markdown_table(metrics) + "\n\nRequests by kind and status:\n\n"
                                            + markdown_table(statuses) + "\n")
    return metrics, statuses
