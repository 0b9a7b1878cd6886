"""Talk to a server with the stock Triton/KServe v2 client (tritonclient), print JSON results.

Run in its own interpreter by test_kserve_client.py: tritonclient registers the same `inference.*`
protobuf messages as our generated code, and one process's descriptor pool cannot hold both.
Usage: python kserve_probe.py HOST:PORT MODEL
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def main(target: str, model: str) -> None:
    client = grpcclient.InferenceServerClient(url=target)
    out: dict[str, object] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "unknown_model_ready": client.is_model_ready("no-such-model"),
    }
    meta = client.get_model_metadata(model, as_json=True)
    out["metadata"] = {"name": meta["name"], "versions": meta.get("versions", []),
                       "inputs": meta["inputs"], "outputs": meta["outputs"]}
    out["server"] = client.get_server_metadata(as_json=True)["name"]
    x = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput("logits")],
                          parameters={"latency_budget_ms": 500})
    logits = result.as_numpy("logits")
    params = result.get_response(as_json=True).get("parameters", {})
    out["infer"] = {"shape": list(logits.shape), "finite": bool(np.isfinite(logits).all()),
                    "variant": params.get("variant", {}).get("string_param"),
                    "model_version": result.get_response().model_version,
                    "sum": float(logits.sum())}
    pinned = client.infer(model, [inp], model_version="fast")
    out["pinned_variant"] = pinned.get_response().model_version
    try:
        bad = grpcclient.InferInput("input", [1, 3, 28, 28], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 3, 28, 28), np.float32))
        client.infer(model, [bad])
        out["bad_shape"] = None
    except InferenceServerException as exc:
        out["bad_shape"] = {"status": exc.status(), "message": exc.message()}
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
