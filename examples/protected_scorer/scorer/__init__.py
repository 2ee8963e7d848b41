"""Example protected package: serves predictions from a protected ONNX model.

Sealed as a code artifact (`strongroom artifact seal examples/protected_scorer --kind code
--name scorer ...`) and run only inside the enclave, where `strongroom_enclave` hands it the
decrypted model as bytes in memory.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import strongroom_enclave

MODEL = "demo-model"
_session: Any = None


def _model() -> Any:
    global _session  # noqa: PLW0603 - one session per enclave, created on first use
    if _session is None:
        _session = strongroom_enclave.onnx_session(MODEL)
    return _session


def predict(payload: dict[str, Any]) -> dict[str, Any]:
    """`{"features": [f1, ...]}` -> the predicted class and its probabilities."""
    features = np.asarray(payload["features"], dtype=np.float32).reshape(1, -1)
    (probabilities,) = _model().run(None, {"features": features})
    return {
        "class": int(probabilities.argmax()),
        "probabilities": [round(float(p), 6) for p in probabilities[0]],
    }


def info(_payload: Any = None) -> dict[str, Any]:
    return {"model": MODEL, "inputs": [i.name for i in _model().get_inputs()]}
