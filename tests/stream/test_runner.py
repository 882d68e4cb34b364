"""The mini stream end to end: Δ-patching forgets nothing, naive fine-tuning does, storage is files on disk."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from deltapatch.stream.report import COLUMNS
from tests.stream.conftest import ALL

pytestmark = pytest.mark.e2e


def _disk_bytes(folder: Path) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files)


def test_delta_patching_forgets_nothing_bit_for_bit(mini_stream: Any) -> None:
    run = mini_stream.run("delta")
    assert run.bwt == 0.0
    for j in range(len(run.tasks)):  # every column of the accuracy matrix is constant once learned
        assert {a.accuracies[j] for a in run.arrivals[j:]} == {run.arrivals[j].accuracies[j]}
    assert all(a.base_bit_identical and a.base_logits_max_abs_diff == 0 for a in run.arrivals)
    assert run.fwt == 0.0  # a zero Δ with an untrained head is exactly the base with that head


def test_naive_fine_tuning_forgets_on_the_conflicting_task(mini_stream: Any) -> None:
    run = mini_stream.run("naive")
    base_before, base_after_conflict = run.arrivals[0].accuracies[0], run.arrivals[1].accuracies[0]
    assert base_after_conflict < base_before, (base_before, base_after_conflict)
    assert run.bwt < 0
    assert not run.arrivals[1].base_bit_identical


def test_stored_bytes_are_the_files_on_disk(mini_stream: Any) -> None:
    store = mini_stream.out_dir / "store"
    for run in mini_stream.runs:
        assert run.arrivals[-1].stored_bytes == _disk_bytes(store / run.strategy), run.strategy
    base_file = mini_stream.base_bytes
    delta = store / "delta"
    patches = _disk_bytes(delta / "patches")
    assert sorted(p.name for p in (delta / "patches").iterdir()) == ["digits-swapped", "shapes"]
    assert mini_stream.run("delta").arrivals[-1].stored_bytes == base_file + patches
    assert mini_stream.run("delta").arrivals[0].stored_bytes == base_file  # the base task alone: the base file
    # Replay keeps the same network as naive plus its buffer of uint8 images: data, not parameters.
    buffer = _disk_bytes(store / "replay" / "buffer")
    assert buffer > 3 * 32 * 32 * 10  # ≥ 10 images of the base task
    assert mini_stream.run("replay").arrivals[-1].stored_bytes - mini_stream.run("naive").arrivals[-1].stored_bytes == buffer
    # EWC keeps an importance and an anchor per task, each the size of the backbone.
    assert len(list((store / "ewc" / "ewc").iterdir())) == 3
    assert mini_stream.run("ewc").arrivals[-1].stored_bytes > 2.5 * mini_stream.run("naive").arrivals[-1].stored_bytes


def test_every_strategy_fills_the_matrix_and_the_files(mini_stream: Any) -> None:
    assert [r.strategy for r in mini_stream.runs] == ALL
    assert mini_stream.tasks == ["digits", "digits-swapped", "shapes"]
    frame = pd.read_csv(mini_stream.out_dir / "stream.csv")
    assert list(frame.columns) == COLUMNS and len(frame) == len(ALL) * (1 + 2 + 3)
    assert frame["accuracy"].between(0, 1).all() and (frame["stored_bytes"] > 0).all()
    last = frame[frame["after_task"] == "shapes"]
    assert sorted(last.groupby("strategy")["eval_task"].apply(list)["paint"]) == sorted(mini_stream.tasks)
    md = (mini_stream.out_dir / "stream.md").read_text()
    assert "| delta: BWT exactly 0 | PASS | 0 |" in md and "### lora" in md
    assert (mini_stream.out_dir / "stream.png").stat().st_size > 10_000
    assert mini_stream.pristine_base_unchanged
    notes = {r.strategy: r.notes for r in mini_stream.runs}
    assert notes["paint"] and notes["paint"][0].startswith("α after digits-swapped = ")
    assert "BatchNorm running statistics moved" in notes["lora"][0]
    lora = mini_stream.run("lora")
    assert (mini_stream.out_dir / "store" / "lora" / "adapters" / "shapes" / "adapter_model.safetensors").is_file()
    assert not lora.arrivals[-1].base_bit_identical  # PEFT's BatchNorm drift reaches the base route
