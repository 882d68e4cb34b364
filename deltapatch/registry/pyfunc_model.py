"""MLflow "models from code" definition of a deltapatch model (no pickled Python objects).

Two kinds, chosen by the version's ``model_config``:

* ``kind: base`` — artifacts ``weights`` (+ ``sidecar`` JSON): the frozen base itself
  (registered once as ``deltapatch-base``).
* ``kind: patch`` — artifacts ``patch`` (the folder with ``patch.safetensors`` + ``patch.json``) only;
  the base is referred to by ``base_model``/``base_version``/``base_fingerprint`` and loaded from
  the registry, never copied. A base whose fingerprint differs is refused.

``predict`` takes images as a uint8 array (N, H, W, 3) and returns a DataFrame with one row per image:
``task``, ``class``, ``class_index``, ``score`` and ``scores`` (a JSON object class → probability).
Images go through the one image pipeline (deltapatch/data/images.py): arrays of another size are
resized with its filter, and encoded image files (bytes, e.g. a DataFrame column ``image``) are
decoded by it, exactly as ``serve`` and the training data loader do.

``predict``'s type hint (``np.ndarray``) is one MLflow accepts without inferring a signature from
it: the explicit tensor signature given at logging stays in force, and MLflow does not warn about
missing type hints when the model is loaded (``deltapatch predict`` prints only its answer).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel, PythonModelContext

from deltapatch.data.images import load_pixels, resize_array
from deltapatch.errors import FingerprintMismatch
from deltapatch.registry.runtime import Predictor, load_base_files
from deltapatch.train import resolve_device


class DeltaPatchModel(PythonModel):
    def load_context(self, context: PythonModelContext) -> None:
        config = dict(context.model_config or {})
        self.kind = config.get("kind", "patch")
        expected = config.get("base_fingerprint", "")
        if self.kind == "base":
            base = load_base_files(Path(context.artifacts["weights"]), resolve_device("auto"))
            self.predictor = Predictor(base)
            self.task = "base"
        else:
            uri = f"models:/{config['base_model']}/{config['base_version']}"
            # The base's weights are in memory once loaded: its downloaded copy (~43 MB for
            # ResNet-18) goes, instead of staying in a temporary folder per load.
            with tempfile.TemporaryDirectory(prefix="deltapatch-base-") as tmp:
                base_model = mlflow.pyfunc.load_model(uri, dst_path=tmp).unwrap_python_model()
            self.predictor = base_model.predictor
            self.task = config["task"]
        if expected and self.predictor.fingerprint != expected:
            raise FingerprintMismatch(
                f"{self.kind} model expects base {expected[:19]}…, but the loaded base is "
                f"{self.predictor.fingerprint[:19]}…; refused"
            )
        if self.kind != "base":
            # The task this version is registered for: a patch.json naming another task is refused.
            self.predictor.add_patch(Path(context.artifacts["patch"]), version=str(config.get("version", "")),
                                     task=self.task)

    def predict(self, context: PythonModelContext, model_input: np.ndarray,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        images = _as_images(model_input, self.predictor.input_size)
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


def _as_images(model_input: Any, size: int) -> np.ndarray:
    """uint8 (N, H, W, 3) at the model's size from an array, {"images": array}, or a DataFrame whose
    column ``image`` holds arrays or encoded image files (bytes)."""
    if isinstance(model_input, dict) and "images" in model_input:
        model_input = model_input["images"]
    if isinstance(model_input, pd.DataFrame):
        if "image" in model_input.columns:
            return np.stack([load_pixels(bytes(v), size) if isinstance(v, bytes | bytearray)
                             else resize_array(np.asarray(v, dtype=np.uint8)[None], size)[0]
                             for v in model_input["image"]])
        model_input = model_input.to_numpy()
    return resize_array(np.asarray(model_input), size)


mlflow.models.set_model(DeltaPatchModel())
