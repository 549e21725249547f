"""A JAX prototype of Kalon's alignment trainer, for asking what training
would reach the alignment target faster than the CPU trainer can answer
(about 5x its steps/s on two cores). NOT the product: the trainer is
crates/kalon-align; this is an analysis tool and reads the world's oracle.

It loads a reference model's candle weights (model.safetensors), builds
D_po from the pretrained model's top-K for each training query (no
rephrasing) with rows ordered by an oracle-like teacher (the TRUE beauty
plus 0.02 noise, as the simulated LMM perceives it), trains the image tower
(and with TEXT=1 the text tower) with the Ranked DPO loss plus alpha x
InfoNCE on caption batches, and scores both models on the world's HPIR
items and held-out captions, as `kalonctl eval align` does.

    python3 bench/align_prototype.py WORLD_DIR MODEL_DIR

Environment: STEPS (600), LR (3e-3), ALPHA (1), BETA (0.5), DPO (1; 0 trains
InfoNCE alone: the control for "is it the preferences or more
pretraining?"), TEXT (0), HEAD (none | beauty: the beauty head of
`--adapter beauty`), QUERIES (600), K U V STRIDE (48 1 12 3), SEED (1),
ITEMS (draw this many HPIR-style items per evaluation query instead of
reading hpir.jsonl), EVAL_EVERY. `offgap`: how far above the other images
a query's own subject scores, in standard deviations of its scores.
Needs jax, optax, safetensors, numpy, pillow, onnxruntime.
"""
import json, os, re, sys, time
import numpy as np, jax, jax.numpy as jnp, optax
from PIL import Image
from safetensors.numpy import load_file
sys.path.insert(0, "/work/main/bench")
from alignment_ceiling import STYLES, quality, beauty_from, relevance_from

E = os.environ.get
world, model = sys.argv[1], sys.argv[2]
cfg = json.load(open(f"{model}/model-config.json"))
W = {k: jnp.asarray(v) for k, v in load_file(f"{model}/model.safetensors").items()}
meta = [json.loads(l) for l in open(f"{world}/oracle/images.jsonl")]
row = {m["id"]: k for k, m in enumerate(meta)}
oq = {q["text"]: q for q in map(json.loads, open(f"{world}/oracle/queries.jsonl"))}
items = [json.loads(l) for l in open(f"{world}/hpir.jsonl")]
if os.environ.get("ITEMS"):
    _r = np.random.default_rng(99); items = []
    for q in [q for q in oq.values() if q["split"] == "eval"]:
        relv = [m for m in meta if m["subject"] == q["subject"]]
        for _ in range(int(os.environ["ITEMS"])):
            rows = [[(relv[_r.integers(len(relv))] if _r.random() < 0.85 else meta[_r.integers(len(meta))]) for _ in range(5)] for _ in range(2)]
            panel = 2 * int(_r.integers(1, 5)) + 1
            def lab(a, b):
                p = 1 / (1 + np.exp(-(a - b) / 0.05)); v = int((_r.random(panel) < p).sum()); w = v * 2 > panel
                return {"choice": "A" if w else "B", "confidence": (v if w else panel - v) / panel}
            ct = lambda m: {k: {m[k]: 1.0} for k in ["subject", "colour", "scene"]}
            rel = lambda r: np.mean([relevance_from(q, ct(m)) for m in r])
            bea = lambda r: np.mean([beauty_from(q, quality(m), np.array([m["style"] == s for s in STYLES], float)) for m in r])
            items.append({"query": q["text"], "row_a": [m["id"] for m in rows[0]], "row_b": [m["id"] for m in rows[1]],
                          "accuracy": lab(rel(rows[0]), rel(rows[1])), "aesthetic": lab(bea(rows[0]), bea(rows[1]))})
print("items", len(items), flush=True)
caps = [json.loads(l) for l in open(f"{world}/captions.jsonl")]
mean = np.array(cfg["mean"], np.float32)[:, None, None]; std = np.array(cfg["std"], np.float32)[:, None, None]
pix = np.stack([(np.asarray(Image.open(f"{world}/images/{m['id']}.png").convert("RGB"), np.float32).transpose(2, 0, 1) / 255 - mean) / std for m in meta])
cap_img = np.array([row[c["image_id"]] for c in caps]); cap_txt = [c["caption"] for c in caps]
held = np.array([i % 10 == 9 for i in range(len(caps))])
train_imgs = cap_img[~held]
words = json.load(open(f"{model}/vocab.json"))["words"]; vid = {w: i + 2 for i, w in enumerate(words)}
L = cfg["max_len"]
def tok(texts):
    ids = np.zeros((len(texts), L), np.int32); mk = np.zeros((len(texts), L), np.float32)
    for r, t in enumerate(texts):
        for c, w in enumerate([w.lower() for w in re.split(r"[^0-9A-Za-z]+", t) if w][:L]):
            ids[r, c] = vid.get(w, 1); mk[r, c] = 1
    return ids, mk
def norm(x): return x / jnp.sqrt((x * x).sum(-1, keepdims=True))
def image_fwd(p, x):
    for i in range(len(cfg["channels"])):
        x = jax.lax.conv_general_dilated(x, p[f"image.conv{i}.weight"], (2, 2), ((1, 1), (1, 1)))
        x = jax.nn.relu(x + p[f"image.conv{i}.bias"][None, :, None, None])
    m = x.mean((2, 3)); f = m
    if cfg.get("pooling") == "mean-std":
        f = jnp.concatenate([m, jnp.sqrt(((x - m[:, :, None, None]) ** 2).mean((2, 3)) + 1e-5)], 1)
    return norm(f @ p["image.proj.weight"].T + p["image.proj.bias"])
def text_fwd(p, ids, mk):
    e = p["text.embedding.weight"][ids]
    m = (e * mk[:, :, None]).sum(1) / jnp.maximum(mk.sum(1, keepdims=True), 1)
    h = jax.nn.relu(m @ p["text.hidden.weight"].T + p["text.hidden.bias"])
    return norm(h @ p["text.proj.weight"].T + p["text.proj.bias"])
emb_img = jax.jit(image_fwd); emb_txt = jax.jit(text_fwd)
def all_images(p): return np.concatenate([np.asarray(emb_img(p, pix[i:i + 1000])) for i in range(0, len(pix), 1000)])
def texts_emb(p, texts):
    ids, mk = tok(texts); return np.asarray(emb_txt(p, ids, mk))
ev_texts = sorted({it["query"] for it in items}); ev_row = {q: k for k, q in enumerate(ev_texts)}
def hpir(score):  # score[q_row, img] -> agreement
    out = {}
    for aspect in ["accuracy", "aesthetic"]:
        num = den = 0.0
        for it in items:
            qi = ev_row[it["query"]]
            a = np.mean([score[qi, row[i]] for i in it["row_a"]]); b = np.mean([score[qi, row[i]] for i in it["row_b"]])
            c = it[aspect]["confidence"]; num += c * (a != b and ("A" if a > b else "B") == it[aspect]["choice"]); den += c
        out[aspect] = round(num / den, 3)
    return out
def recall10(ie, p):
    hc = np.where(held)[0]; te = texts_emb(p, [cap_txt[i] for i in hc]); im = ie[cap_img[hc]]
    s = te @ im.T; rank = (s > np.diag(s)[:, None]).sum(1); return round(float((rank < 10).mean()), 3)
SUBJ = np.array([m["subject"] for m in meta])
def offgap(s):
    g = []
    for q, k in ev_row.items():
        same = SUBJ == oq[q]["subject"]; g.append((s[k][same].mean() - s[k][~same].mean()) / s[k].std())
    return round(float(np.mean(g)), 3)
def evaluate(p, tag):
    ie = all_images(p); te = texts_emb(p, ev_texts); s = te @ ie.T
    r = {**hpir(s), "recall10": recall10(ie, p), "offgap": offgap(s)}; print(tag, r, flush=True); return r
base = evaluate(W, "pretrained")
# teacher
rng = np.random.default_rng(int(E("SEED", "1")))
qual = np.array([quality(m) for m in meta]); onehot = np.array([[m["style"] == s for s in STYLES] for m in meta], float)
def beauty(q, i): return beauty_from(q, qual[i], onehot[i])
trq = [q for q in oq.values() if q["split"] == "train"]
rng.shuffle(trq); trq = trq[:int(E("QUERIES", "600"))]
K, U, V, STRIDE = int(E("K", "48")), int(E("U", "1")), int(E("V", "12")), int(E("STRIDE", "3"))
ie0 = all_images(W); tq0 = texts_emb(W, [q["text"] for q in trq])
pairs = []
for qi, q in enumerate(trq):
    s = ie0[train_imgs] @ tq0[qi]; top = train_imgs[np.argsort(-s)[:K]]
    taken = top[::STRIDE][:U * V]
    for band in range(U):
        cells = taken[band * V:(band + 1) * V]
        b = np.array([beauty(q, i) for i in cells]) + 0.02 * rng.normal(size=len(cells))
        cells = cells[np.argsort(-b)]
        taken[band * V:(band + 1) * V] = cells
    M = taken.reshape(U, V)
    for i1 in range(U):
        for j1 in range(V):
            for i2 in range(i1, U):
                for j2 in range(j1, V):
                    if (i1, j1) != (i2, j2): pairs.append((qi, M[i1, j1], M[i2, j2]))
pairs = np.array(pairs); print("pairs", len(pairs), flush=True)
qids, qmk = tok([q["text"] for q in trq]); cids, cmk = tok(cap_txt)
ref_q = jnp.asarray(tq0)
tau, beta, eps = 0.07, float(E("BETA", "0.5")), 0.1
alpha = float(E("ALPHA", "1.0")); TEXT = E("TEXT", "0") == "1"; HEAD = E("HEAD", "none")
params = dict(W)
mdir = norm(jnp.asarray(tq0).mean(0))
if HEAD == "beauty": params["head.w"] = jnp.zeros(cfg["dim"])
trainable = [k for k in params if k.startswith("image.") or (TEXT and k.startswith("text.")) or k.startswith("head.")]
def apply_head(p, v):
    if HEAD == "beauty":
        b = v @ p["head.w"]; return norm(v + b[:, None] * mdir[None, :])
    return v
def loss_fn(tp, fixed, x, q_ids, q_mk, qref, refw, refl, c_ids, c_mk):
    n = PB
    p = {**fixed, **tp}
    v = apply_head(p, image_fwd(p, x))
    t = text_fwd(p, q_ids, q_mk) if TEXT else qref
    sw = (t * v[:n]).sum(1) / tau; sl = (t * v[n:2 * n]).sum(1) / tau
    h = (sw - refw) - (sl - refl)
    dpo = (-(1 - eps) * jax.nn.log_sigmoid(beta * h) - eps * jax.nn.log_sigmoid(-beta * h)).mean()
    ci = v[2 * n:]; ct = text_fwd(p, c_ids, c_mk) if TEXT else text_fwd(jax.lax.stop_gradient(p), c_ids, c_mk)
    logits = ci @ ct.T / tau; m = logits.shape[0]
    def sce(lg):
        lp = jax.nn.log_softmax(lg, 1); return -(0.9 * jnp.diag(lp).mean() + 0.1 * lp.mean())
    pt = (sce(logits) + sce(logits.T)) / 2
    return float(E('DPO', '1')) * dpo + alpha * pt, (dpo, pt, (sw > sl).mean())
PB, CB = 256, 256
LR = float(E("LR", "3e-3")); STEPS = int(E("STEPS", "600"))
sched = optax.cosine_decay_schedule(LR, STEPS, 0.1) if E("COSINE", "0") == "1" else LR
opt = optax.adamw(sched, weight_decay=0.0)
tp = {k: params[k] for k in trainable}; fixed = {k: v for k, v in params.items() if k not in trainable}
st = opt.init(tp)
@jax.jit
def step(tp, st, *a):
    (l, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(tp, fixed, *a)
    u, st = opt.update(g, st, tp); return optax.apply_updates(tp, u), st, l, aux
tr_caps = np.where(~held)[0]
t0 = time.time()
for k in range(STEPS):
    b = pairs[rng.integers(0, len(pairs), PB)]; c = rng.choice(tr_caps, CB, replace=False)
    x = pix[np.concatenate([b[:, 1], b[:, 2], cap_img[c]])]
    refw = (ie0[b[:, 1]] * tq0[b[:, 0]]).sum(1) / tau; refl = (ie0[b[:, 2]] * tq0[b[:, 0]]).sum(1) / tau
    tp, st, l, aux = step(tp, st, x, qids[b[:, 0]], qmk[b[:, 0]], ref_q[b[:, 0]], refw, refl, cids[c], cmk[c])
    if (k + 1) % 100 == 0:
        print(f"step {k + 1} loss {float(l):.3f} dpo {float(aux[0]):.3f} pt {float(aux[1]):.3f} acc {float(aux[2]):.2f} {time.time()-t0:.0f}s", flush=True)
    if (k + 1) % int(E("EVAL_EVERY", "100000")) == 0 and k + 1 < STEPS and HEAD == "none":
        evaluate({**fixed, **tp}, f"step {k + 1}")
p = {**fixed, **tp}
ie = np.concatenate([np.asarray(jax.jit(lambda p, x: apply_head(p, image_fwd(p, x)))(p, pix[i:i + 1000])) for i in range(0, len(pix), 1000)])
te = texts_emb(p, ev_texts); r = {**hpir(te @ ie.T), "recall10": recall10(ie, p), "offgap": offgap(te @ ie.T)}
print("aligned", r, "delta acc %+.1f aes %+.1f rec %+.1f" % tuple(100 * (r[k] - base[k]) for k in ["accuracy", "aesthetic", "recall10"]), flush=True)
