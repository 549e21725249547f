"""How much of the world's hidden aesthetics an encoder's image embeddings
carry linearly: ridge regression from the embeddings (through ONNX Runtime,
Kalon's preprocessing) to each hidden property, fitted on the first 8,000
images, R^2 on the rest. A diagnostic for alignment: an adapter on the
embeddings can only use what they carry.

    python3 bench/aesthetic_probe.py WORLD_DIR MODEL_DIR

Needs numpy, pillow and onnxruntime (pip install onnxruntime==1.31.1).
"""

import json
import sys

import numpy as np

from alignment_ceiling import TASTE, embed_images


def main(world, model, train=8000):
    meta = [json.loads(line) for line in open(f"{world}/oracle/images.jsonl")]
    x = embed_images(world, model, meta)
    x = np.hstack([x, np.ones((len(x), 1), np.float32)])
    targets = {k: np.array([m[k] for m in meta]) for k in
               ["harmony", "composition", "blur", "noise", "colourfulness", "exposure", "contrast"]}
    targets["style_taste"] = np.array([TASTE[m["style"]] for m in meta])
    fit, test = slice(0, train), slice(train, len(x))
    report = {}
    for name, y in targets.items():
        a = x[fit]
        w = np.linalg.solve(a.T @ a + 1e-2 * np.eye(a.shape[1]), a.T @ y[fit])
        p = x[test] @ w
        r2 = 1 - ((y[test] - p) ** 2).sum() / ((y[test] - y[test].mean()) ** 2).sum()
        report[name] = round(float(r2), 3)
        print(f"{name:14s} held-out R^2 {r2:.3f}")
    print(json.dumps({"probe": "aesthetics", "images": len(x), "r2": report}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
