"""Prune an ultralytics YOLO model with channelcut and ship it with
ultralytics' own tools: save, load, predict, export to ONNX.

No module is replaced by hand: channelcut exports the model as ultralytics
built it (C2f/C3k2 blocks, attention, the detection head), and rewrites the
width attributes that only ultralytics' export path reads (``C2f.c``).

    pip install ultralytics onnx onnxruntime
    python examples/prune_yolo.py                      # yolov8n from its yaml (random weights)
    python examples/prune_yolo.py --model yolo11n-seg.yaml --amount 0.4
    python examples/prune_yolo.py --model my_trained.pt --imgsz 640

Then fine-tune the pruned model as usual (``YOLO(out).train(...)``) to
recover accuracy.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

os.environ.setdefault("YOLO_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="yolov8n.yaml", help="a yaml (random weights) or a trained .pt")
    ap.add_argument("--amount", type=float, default=0.3, help="fraction of every layer's input channels to remove")
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--out", default="pruned_yolo.pt")
    args = ap.parse_args()

    from ultralytics import YOLO

    from channelcut import MaskingManager, PruningManager

    yolo = YOLO(args.model)
    net = yolo.model.float().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    x = torch.rand(1, 3, args.imgsz, args.imgsz)
    before = sum(p.numel() for p in net.parameters())

    # 1. choose channels: L1 magnitude per layer (the heads' outputs stay)
    MaskingManager(net, [x]).mask(amount=args.amount)
    # 2. export: removes the zeroed channels, verified against the masked model
    report = PruningManager(net).compute([x])
    report.prune()
    after = sum(p.numel() for p in net.parameters())
    print(f"parameters: {before:,} -> {after:,} ({after / before:.0%})")
    if report.spec.inferred_attributes:
        print("width attributes rewritten:", ", ".join(f"{m}.{a}" for m, a in report.spec.inferred_attributes[:6]), "...")

    # 3. ultralytics' own workflow on what channelcut hands back
    yolo.save(args.out)
    back = YOLO(args.out)
    image = np.random.default_rng(0).integers(0, 255, (args.imgsz, args.imgsz, 3), dtype=np.uint8)
    result = back.predict(image, imgsz=args.imgsz, verbose=False)[0]
    print(f"predict: {type(result).__name__} with {len(result.boxes) if result.boxes is not None else 0} boxes")
    onnx_path = back.export(format="onnx", imgsz=args.imgsz, simplify=False)
    try:
        import onnxruntime as ort
    except ImportError:
        print(f"wrote {onnx_path} (install onnxruntime to check it)")
        return
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = YOLO(args.out).model.float().eval()(x)
    while isinstance(want, (list, tuple)):
        want = want[0]
    err = float(np.abs(got - want.numpy()).max() / max(float(want.abs().max()), 1e-12))
    print(f"wrote {args.out} and {onnx_path}; onnxruntime vs PyTorch: max relative difference {err:.1e}")


if __name__ == "__main__":
    main()
