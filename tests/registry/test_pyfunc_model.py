"""The registered pyfunc model: typed `predict` (no MLflow type-hint warning), the one image pipeline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from deltapatch.data.images import encode_png, load_pixels
from tests.registry.conftest import TASK, Trained, register


def test_predict_cli_prints_only_its_answer(reg_project: dict[str, Any], trained: Trained, tmp_path: Path) -> None:
    """A fresh process (as a user runs it), so no test-runner warning filter hides MLflow's warnings."""
    from deltapatch.registry import registry as R

    params = reg_project
    R.promote(params, TASK, register(params, trained.results[0]), reason="predict test")
    images = trained.data.test.images[:2].permute(0, 2, 3, 1).numpy()
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"img{i}.png")
        paths[-1].write_bytes(encode_png(image))
    env = {**os.environ, "DELTAPATCH_PROJECT": params["_root"], "MLFLOW_DISABLE_TELEMETRY": "true", "COLUMNS": "300"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([str(Path(sys.executable).with_name("deltapatch")), "predict", "--task", TASK, *map(str, paths)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=params["_root"])
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith(str(p)) for line, p in zip(lines, paths, strict=True)), done.stdout
    assert "type hint" not in done.stderr and "Warning" not in done.stderr, done.stderr


def test_pyfunc_decodes_and_resizes_through_the_pipeline(reg_project: dict[str, Any], trained: Trained) -> None:
    from deltapatch.registry import registry as R

    params = reg_project
    version = register(params, trained.results[0])
    model = mlflow.pyfunc.load_model(R.model_uri(params, TASK, version=version)).unwrap_python_model()
    size = model.predictor.input_size
    large = np.random.default_rng(0).integers(0, 256, (2, 3 * size, 2 * size, 3), dtype=np.uint8)
    files = [encode_png(image) for image in large]
    expected = model.predict(None, np.stack([load_pixels(f, size) for f in files]))
    from_files = model.predict(None, pd.DataFrame({"image": files}))
    from_arrays = model.predict(None, large)
    pd.testing.assert_frame_equal(from_files, expected)
    pd.testing.assert_frame_equal(from_arrays, expected)
