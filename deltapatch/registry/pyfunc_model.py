"""MLflow "models from code" definition of a deltapatch model (no pickled Python objects).

Two kinds, chosen by the version's ``model_config``:

* ``kind: base`` — artifacts ``weights`` (+ ``sidecar`` JSON): the frozen base itself
  (registered once as ``deltapatch-base``).
* ``kind: patch`` — artifacts ``patch`` (the folder with ``patch.safetensors`` + ``patch.json``) only;
  the base is referred to by ``base_model``/``base_version``/``base_fingerprint`` and loaded from
  the registry, never copied. A base whose fingerprint differs is refused.

``predict`` takes images as a uint8 array (N, H, W, 3) and returns a DataFrame with one row per image:
``task``, ``class``, ``class_index``, ``score`` and ``scores`` (a JSON object class → probability).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


class DeltaPatchModel(PythonModel):
    def load_context(self, context):
        from deltapatch.errors import FingerprintMismatch
        from deltapatch.registry.runtime import Predictor, load_base_files
        from deltapatch.train import resolve_device

        config = dict(context.model_config or {})
        self.kind = config.get("kind", "patch")
        expected = config.get("base_fingerprint", "")
        if self.kind == "base":
            base = load_base_files(Path(context.artifacts["weights"]), resolve_device("auto"))
            self.predictor = Predictor(base)
            self.task = "base"
        else:
            uri = f"models:/{config['base_model']}/{config['base_version']}"
            base_model = mlflow.pyfunc.load_model(uri).unwrap_python_model()
            self.predictor = base_model.predictor
            self.task = config["task"]
        if expected and self.predictor.fingerprint != expected:
            raise FingerprintMismatch(
                f"{self.kind} model expects base {expected[:19]}…, but the loaded base is "
                f"{self.predictor.fingerprint[:19]}…; refused"
            )
        if self.kind != "base":
            self.predictor.add_patch(Path(context.artifacts["patch"]), version=str(config.get("version", "")))

    def predict(self, context, model_input, params=None):  # no type hints: the signature is explicit
        import numpy as np
        import pandas as pd

        images = _as_images(model_input, np)
        rows = self.predictor.predict(images, self.task)
        return pd.DataFrame(
            {
                "task": [r["task"] for r in rows],
                "class": [r["class"] for r in rows],
                "class_index": np.array([r["class_index"] for r in rows], dtype=np.int64),
                "score": np.array([r["score"] for r in rows], dtype=np.float64),
                "scores": [json.dumps(r["scores"]) for r in rows],
            }
        )


def _as_images(model_input: Any, np: Any) -> Any:
    if isinstance(model_input, dict) and "images" in model_input:
        model_input = model_input["images"]
    if hasattr(model_input, "to_numpy") and not isinstance(model_input, np.ndarray):  # a DataFrame
        frame = model_input
        if "image" in getattr(frame, "columns", []):
            return np.stack([np.asarray(v, dtype=np.uint8) for v in frame["image"]])
        model_input = frame.to_numpy()
    return np.asarray(model_input)


mlflow.models.set_model(DeltaPatchModel())
