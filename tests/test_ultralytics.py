"""Ultralytics YOLO end to end, with no module replaced (issue 16): choose
channels with MaskingManager, export with PruningManager, then the family's
own workflow on what we hand back: ``YOLO.save`` -> ``YOLO(path)`` ->
``predict`` -> ``export(format="onnx")``, the ONNX model checked in
onnxruntime against the pruned PyTorch model.

Random-initialised models built from ultralytics' yaml files (no download).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytest.importorskip("ultralytics")
ort = pytest.importorskip("onnxruntime")
os.environ.setdefault("YOLO_OFFLINE", "1")

from ultralytics import YOLO  # noqa: E402

from channelcut import MaskingManager, PruningManager  # noqa: E402
from support.compare import n_params  # noqa: E402

SIZE = 64


def _outputs(y):
    """The prediction tensor of a YOLO forward in eval mode (its first tensor,
    what the ONNX export's first output holds)."""
    while isinstance(y, (list, tuple)):
        y = y[0]
    return y


@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolo11n-seg.yaml", "yolov8n-pose.yaml", "yolo11n-obb.yaml", "yolov8n-cls.yaml", "yolov10n.yaml"])
def test_pruned_yolo_saves_loads_predicts_and_exports_to_onnx(tmp_path, cfg: str) -> None:
    torch.manual_seed(0)
    yolo = YOLO(cfg, verbose=False)
    net = yolo.model.eval()
    x = torch.rand(1, 3, SIZE, SIZE)
    before = n_params(net)
    MaskingManager(net, [x]).mask(amount=0.3)  # L1 over every consumer, the heads' outputs kept
    with torch.no_grad():
        masked = _outputs(net(x)).clone()
    PruningManager(net).compute([x]).prune()  # verified against the masked model itself
    assert n_params(net) < 0.8 * before
    with torch.no_grad():
        pruned = _outputs(net(x))
    torch.testing.assert_close(pruned, masked, rtol=1e-4, atol=1e-4)

    path = str(tmp_path / "pruned.pt")
    yolo.save(path)
    back = YOLO(path)
    assert n_params(back.model) == n_params(net)
    image = np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    results = back.predict(image, imgsz=SIZE, verbose=False)
    assert len(results) == 1

    onnx_path = back.export(format="onnx", imgsz=SIZE, simplify=False)
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x.numpy()}
    got = sess.run(None, feed)[0]
    ref_model = YOLO(path).model.float().eval()
    with torch.no_grad():
        want = _outputs(ref_model(x)).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
