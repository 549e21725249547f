"""How much of the world's hidden beauty an image tower of a given shape can
learn from pixels when taught it directly: a diagnostic for the alignment
target. Trains a small conv tower (JAX) on the world's training images to
predict each image's quality (regression) and style (6-way softmax) from the
hidden labels, then scores the HPIR items with the predicted beauty alone and
added to an encoder's cosine, as bench/alignment_ceiling.py does for linear
read-outs. If a shape learns beauty well when taught directly, what limits
alignment is the teaching signal; if not, the tower.

    python3 bench/beauty_capacity.py WORLD_DIR MODEL_DIR [SHAPE ...]

SHAPE: ref (Kalon's reference: 3x3 stride-2 convs 16/32/64, global average
pooling), wide (32/64/128), grid (ref + a 2x2 grid of average-pooled
features), stats (ref + per-channel standard deviation pooling), deep (four
convs 32/64/128/128 + stats), deepgrid (deep + grid). STEPS (environment,
default 1500) sets the training steps (batch 128). Needs jax,
optax, numpy, pillow, onnxruntime. The oracle is read: an analysis tool.
"""

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from alignment_ceiling import STYLES, agreement, beauty_from, embed_images, embed_texts, quality

SHAPES = {
    "ref": ((16, 32, 64), "gap"),
    "wide": ((32, 64, 128), "gap"),
    "grid": ((16, 32, 64), "grid"),
    "stats": ((16, 32, 64), "stats"),
    "deep": ((32, 64, 128, 128), "stats"),
    "deepgrid": ((32, 64, 128, 128), "gridstats"),
}


def init(key, channels, pooling):
    params, c_in = {}, 3
    for i, c in enumerate(channels):
        key, k = jax.random.split(key)
        bound = 1 / np.sqrt(9 * c_in)
        params[f"conv{i}"] = (jax.random.uniform(k, (c, c_in, 3, 3), minval=-bound, maxval=bound),
                              jnp.zeros(c))
        c_in = c
    width = {"gap": c_in, "grid": 5 * c_in, "stats": 2 * c_in, "gridstats": 6 * c_in}[pooling]
    key, k = jax.random.split(key)
    params["out"] = (jax.random.normal(k, (width, 1 + len(STYLES))) / np.sqrt(width),
                     jnp.zeros(1 + len(STYLES)))
    return params


def forward(params, x, pooling):
    i = 0
    while f"conv{i}" in params:
        w, b = params[f"conv{i}"]
        x = jax.lax.conv_general_dilated(x, w, (2, 2), ((1, 1), (1, 1)))
        x = jax.nn.relu(x + b[None, :, None, None])
        i += 1
    pooled = [x.mean(axis=(2, 3))]
    if pooling in ("grid", "gridstats"):
        h = x.shape[2] // 2
        pooled += [x[:, :, a:a + h, b:b + h].mean(axis=(2, 3)) for a in (0, h) for b in (0, h)]
    if pooling in ("stats", "gridstats"):
        pooled.append(x.std(axis=(2, 3)))
    w, b = params["out"]
    return jnp.concatenate(pooled, axis=1) @ w + b


def train(pixels, qual, style, shape, steps, fit, batch=128, seed=0):
    """Fits a tower of `shape` on the first `fit` rows; predicts every row:
    (quality, style probabilities)."""
    channels, pooling = SHAPES[shape]
    params = init(jax.random.PRNGKey(seed), channels, pooling)
    opt = optax.adam(2e-3)
    state = opt.init(params)

    def loss_fn(p, x, q, s):
        out = forward(p, x, pooling)
        mse = ((out[:, 0] - q) ** 2).mean()
        ce = -(jax.nn.log_softmax(out[:, 1:]) * s).sum(1).mean()
        return 10 * mse + 0.1 * ce

    @jax.jit
    def step(p, st, x, q, s):
        loss, g = jax.value_and_grad(loss_fn)(p, x, q, s)
        updates, st = opt.update(g, st)
        return optax.apply_updates(p, updates), st, loss

    rng = np.random.default_rng(seed)
    for k in range(steps):
        idx = rng.integers(0, fit, batch)
        params, state, loss = step(params, state, pixels[idx], qual[idx], style[idx])
        if (k + 1) % 500 == 0:
            print(f"  {shape} step {k + 1}: loss {float(loss):.4f}", flush=True)
    predict = jax.jit(lambda p, x: forward(p, x, pooling))
    out = np.concatenate([np.asarray(predict(params, pixels[i:i + 512]))
                          for i in range(0, len(pixels), 512)])
    return out[:, 0], np.asarray(jax.nn.softmax(out[:, 1:]))


def main(world, model, shapes, steps):
    meta = [json.loads(line) for line in open(f"{world}/oracle/images.jsonl")]
    row = {m["id"]: k for k, m in enumerate(meta)}
    queries = {q["text"]: q for q in map(json.loads, open(f"{world}/oracle/queries.jsonl"))}
    items = [json.loads(line) for line in open(f"{world}/hpir.jsonl")]
    manifest = json.load(open(f"{model}/kalon-model.json"))
    mean = np.array(manifest["image"]["mean"], np.float32)[:, None, None]
    std = np.array(manifest["image"]["std"], np.float32)[:, None, None]
    pixels = np.stack([
        (np.asarray(Image.open(f"{world}/images/{m['id']}.png").convert("RGB"), np.float32)
         .transpose(2, 0, 1) / 255.0 - mean) / std for m in meta])
    fit = int(len(meta) * 0.9)  # the world's training split: no HPIR query is about these
    qual = np.array([quality(m) for m in meta], np.float32)
    style = np.array([[m["style"] == s for s in STYLES] for m in meta], np.float32)
    texts = sorted({it["query"] for it in items})
    x, t = embed_images(world, model, meta), embed_texts(model, texts)
    text_row = {q: k for k, q in enumerate(texts)}
    cos = lambda q, i: float(t[text_row[q]] @ x[row[i]])
    base = agreement(items, cos)
    print(f"encoder cos: {base}")
    report = {"encoder": base}
    for shape in shapes:
        started = time.time()
        q_hat, s_hat = train(pixels, qual, style, shape, steps, fit)
        held = slice(fit, len(meta))
        r2 = 1 - ((q_hat[held] - qual[held]) ** 2).mean() / qual[held].var()
        style_acc = float((s_hat[held].argmax(1) == style[held].argmax(1)).mean())
        beauty = lambda q, i: beauty_from(queries[q], q_hat[row[i]], s_hat[row[i]])
        lines = {"beauty alone": agreement(items, beauty)}
        for lam in [0.2, 0.4, 0.6, 1.0]:
            lines[f"cos + {lam} x beauty"] = agreement(
                items, lambda q, i, lam=lam: cos(q, i) + lam * beauty(q, i))
        report[shape] = {"quality_r2": round(float(r2), 3), "style_accuracy": round(style_acc, 3),
                         "seconds": round(time.time() - started), **lines}
        print(json.dumps({shape: report[shape]}), flush=True)
    print(json.dumps({"bench": "beauty_capacity", **report}))


if __name__ == "__main__":
    steps = int(os.environ.get("STEPS", "1500"))
    main(sys.argv[1], sys.argv[2], sys.argv[3:] or ["ref"], steps)
