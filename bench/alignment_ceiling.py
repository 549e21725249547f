"""What HPIR agreement is reachable at all on a world, and how much of it an
adapter on an encoder's image embeddings can reach: a diagnostic for the
alignment target (+10 aesthetic points, accuracy within 1 point).

It scores the world's HPIR items (rows by mean score, confidence-weighted,
as Kalon's `eval align` does) with:
  - the hidden truth: relevance, beauty, and relevance + lambda * beauty;
  - the encoder: cos(text, image), and cos + lambda * the TRUE beauty (what a
    perfect aesthetic term added to this encoder's scores would give), or
    only its style term (query-dependent) or only its quality term;
  - linear read-outs of the image embeddings fitted on the training images
    with the hidden labels (ridge): beauty (quality + the query's style) and
    relevance (subject, colour, scene), alone and added to the cosine, and
    the style term from the read-out of the style: a yardstick for what an
    adapter, linear on these embeddings, can get.

    python3 bench/alignment_ceiling.py WORLD_DIR MODEL_DIR

The world directory's oracle/ folder is read: this is an analysis tool,
never a model. Needs numpy, pillow and onnxruntime.
"""

import json
import re
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image

# the world's oracle (sim/world/src/oracle.rs), reimplemented
TASTE = {"plain": 0.45, "minimal": 0.7, "vintage": 0.6, "neon": 0.35, "pastel": 0.6, "moody": 0.5}
STYLES = list(TASTE)


def low_level(m):
    sharp = 1 - m["blur"] / 3
    clean = 1 - m["noise"] / 0.15
    exposed = 1 - abs(m["exposure"]) / 1.5
    contrast = 1 - abs(m["contrast"] - 1) / 0.5
    q = 0.3 * sharp + 0.25 * clean + 0.25 * exposed + 0.1 * contrast + 0.1 * m["colourfulness"]
    return min(1.0, max(0.0, q))


def quality(m):
    return 0.45 * low_level(m) + 0.3 * m["harmony"] + 0.25 * m["composition"]


def beauty_from(q, qual, style_share):
    """The oracle's beauty from an image's quality and its style (a one-hot
    or a predicted share per style)."""
    if q["style_intent"]:
        return 0.65 * qual + 0.35 * style_share[STYLES.index(q["style_intent"])]
    return 0.85 * qual + 0.15 * float(style_share @ np.array([TASTE[s] for s in STYLES]))


def relevance_from(q, shares):
    """The world's relevance from an image's content: `shares[key][value]`
    is 1 where the image shows that value (or a predicted share)."""
    named, matched = 1.0, 1.0
    for key in ["colour", "scene"]:
        if q[key]:
            named += 1
            matched += shares[key].get(q[key], 0.0)
    return shares["subject"].get(q["subject"], 0.0) * matched / named


def agreement(items, score):
    out = {}
    for aspect in ["accuracy", "aesthetic"]:
        num = den = 0.0
        for it in items:
            a = np.mean([score(it["query"], i) for i in it["row_a"]])
            b = np.mean([score(it["query"], i) for i in it["row_b"]])
            c = it[aspect]["confidence"]
            num += c * (("A" if a > b else "B") == it[aspect]["choice"])
            den += c
        out[aspect] = round(num / den, 3)
    return out


def unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def embed_images(world, model, meta):
    """Unit image embeddings of `meta`'s images through ONNX Runtime, with
    Kalon's preprocessing (the world's images are already at the model's size)."""
    manifest = json.load(open(f"{model}/kalon-model.json"))
    mean = np.array(manifest["image"]["mean"], np.float32)[:, None, None]
    std = np.array(manifest["image"]["std"], np.float32)[:, None, None]
    session = ort.InferenceSession(f"{model}/{manifest['image']['file']}")
    images = []
    for i in range(0, len(meta), 256):
        batch = np.stack([
            (np.asarray(Image.open(f"{world}/images/{m['id']}.png").convert("RGB"), np.float32)
             .transpose(2, 0, 1) / 255.0 - mean) / std
            for m in meta[i:i + 256]
        ])
        images.append(session.run(["image_embeds"], {"pixel_values": batch})[0])
    return unit(np.concatenate(images))


def embed_texts(model, texts):
    """Unit text embeddings through the model's word tokenizer and text tower."""
    manifest = json.load(open(f"{model}/kalon-model.json"))
    words = json.load(open(f"{model}/{manifest['text']['vocab']}"))["words"]
    ids = {w: i + 2 for i, w in enumerate(words)}  # 0 pad, 1 unknown
    length = manifest["text"]["max_len"]
    input_ids = np.zeros((len(texts), length), np.int64)
    mask = np.zeros((len(texts), length), np.int64)
    for r, text in enumerate(texts):
        for c, w in enumerate([w.lower() for w in re.split(r"[^0-9A-Za-z]+", text) if w][:length]):
            input_ids[r, c], mask[r, c] = ids.get(w, 1), 1
    session = ort.InferenceSession(f"{model}/{manifest['text']['file']}")
    return unit(session.run(["text_embeds"], {"input_ids": input_ids, "attention_mask": mask})[0])


def main(world, model):
    meta = [json.loads(line) for line in open(f"{world}/oracle/images.jsonl")]
    by_id = {m["id"]: m for m in meta}
    row = {m["id"]: k for k, m in enumerate(meta)}
    queries = {q["text"]: q for q in map(json.loads, open(f"{world}/oracle/queries.jsonl"))}
    items = [json.loads(line) for line in open(f"{world}/hpir.jsonl")]
    texts = sorted({it["query"] for it in items})
    x, t = embed_images(world, model, meta), embed_texts(model, texts)
    text_row = {q: k for k, q in enumerate(texts)}
    one_hot = lambda m: np.array([m["style"] == s for s in STYLES], float)
    content = lambda m: {key: {m[key]: 1.0} for key in ["subject", "colour", "scene"]}
    true_rel = lambda q, i: relevance_from(queries[q], content(by_id[i]))
    true_beauty = lambda q, i: beauty_from(queries[q], quality(by_id[i]), one_hot(by_id[i]))
    cos = lambda q, i: float(t[text_row[q]] @ x[row[i]])

    # linear read-outs, fitted on the images no HPIR query is about (the
    # first 90%: the world's training split), ridge with a bias
    fit = slice(0, int(len(meta) * 0.9))
    design = np.hstack([x, np.ones((len(x), 1))])

    def read_out(y):
        a = design[fit]
        return design @ np.linalg.solve(a.T @ a + 1e-2 * np.eye(a.shape[1]), a.T @ y[fit])

    qual_hat = read_out(np.array([quality(m) for m in meta]))
    style_hat = read_out(np.array([one_hot(m) for m in meta]))
    shares = {}
    for key in ["subject", "colour", "scene"]:
        values = sorted({m[key] for m in meta})
        predicted = read_out(np.array([[m[key] == v for v in values] for m in meta], float))
        shares[key] = [dict(zip(values, p)) for p in predicted]
    beauty_hat = lambda q, i: beauty_from(queries[q], qual_hat[row[i]], style_hat[row[i]])
    # the oracle's beauty split into its two terms: the style's (query-
    # dependent) and the quality's (the same for every query)
    style_term = lambda q, i, share: beauty_from(queries[q], 0.0, share)
    true_style = lambda q, i: style_term(q, i, one_hot(by_id[i]))
    true_quality = lambda q, i: true_beauty(q, i) - true_style(q, i)
    style_read = lambda q, i: style_term(q, i, style_hat[row[i]])
    held = slice(fit.stop, len(meta))
    style_accuracy = float(np.mean(
        style_hat[held].argmax(1) == np.array([STYLES.index(m["style"]) for m in meta[held]])))
    rel_hat = lambda q, i: relevance_from(queries[q], {k: s[row[i]] for k, s in shares.items()})

    report = {"items": len(items), "read-out style accuracy (held-out images)": round(style_accuracy, 3)}
    print(f"read-out of the style from the image embeddings: {style_accuracy:.3f} right "
          f"on the last {len(meta) - fit.stop} images (6 styles)")
    lines = [
        ("truth: relevance", true_rel),
        ("truth: beauty", true_beauty),
        ("encoder: cos", cos),
        ("read-out: relevance", rel_hat),
        ("read-out: beauty", beauty_hat),
    ]
    for lam in [0.2, 0.4, 0.6, 1.0]:
        lines.append((f"encoder cos + {lam} x true beauty",
                      lambda q, i, lam=lam: cos(q, i) + lam * true_beauty(q, i)))
    for lam in [0.4, 1.0]:
        lines.append((f"encoder cos + {lam} x true style term",
                      lambda q, i, lam=lam: cos(q, i) + lam * true_style(q, i)))
        lines.append((f"encoder cos + {lam} x true quality term",
                      lambda q, i, lam=lam: cos(q, i) + lam * true_quality(q, i)))
        lines.append((f"encoder cos + {lam} x read-out style term",
                      lambda q, i, lam=lam: cos(q, i) + lam * style_read(q, i)))
    for lam in [0.2, 0.4, 0.6, 1.0]:
        lines.append((f"encoder cos + {lam} x read-out beauty",
                      lambda q, i, lam=lam: cos(q, i) + lam * beauty_hat(q, i)))
    for lam in [0.1, 0.2, 0.4]:
        lines.append((f"read-outs: relevance + {lam} x beauty",
                      lambda q, i, lam=lam: rel_hat(q, i) + lam * beauty_hat(q, i)))
    print(f"{'scores':<42} {'accuracy':>9} {'aesthetic':>10}")
    for name, score in lines:
        a = agreement(items, score)
        report[name] = a
        print(f"{name:<42} {a['accuracy']:>9.3f} {a['aesthetic']:>10.3f}")

    # the target's question, asked of a PERFECT beauty term: the largest
    # aesthetic gain over the cosine at any weight whose accuracy stays
    # within one point of the cosine's
    base = report["encoder: cos"]
    sweep = []
    for lam in np.round(np.arange(0.05, 1.51, 0.05), 2):
        a = agreement(items, lambda q, i, lam=lam: cos(q, i) + lam * true_beauty(q, i))
        sweep.append({"weight": float(lam), **a})
    within = [s for s in sweep if s["accuracy"] >= base["accuracy"] - 0.01]
    best = max(within, key=lambda s: s["aesthetic"], default=None)
    report["cos + w x true beauty, w = 0.05 .. 1.5"] = sweep
    report["best within 1 accuracy point"] = best
    print("cos + w x TRUE beauty, the weight swept (change in points, accuracy / aesthetic):")
    print("  " + ", ".join(f"{s['weight']:.2f}: {100 * (s['accuracy'] - base['accuracy']):+.1f} / "
                           f"{100 * (s['aesthetic'] - base['aesthetic']):+.1f}" for s in sweep))
    if best:
        print(f"largest aesthetic gain with accuracy within 1 point: "
              f"{100 * (best['aesthetic'] - base['aesthetic']):+.1f} at weight {best['weight']:.2f}")
    print(json.dumps({"bench": "alignment_ceiling", **report}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
