"""The peer of `kalon-bench align`: Kalon's adapter, loss and optimiser
in JAX (on its default backend: the CPU, or a GPU where JAX has one), on
data of the same sizes.

Model: v' = normalise(v + v A^T), A (64 x 64) from zero. Loss per step:
confidence-weighted Ranked DPO over 256 sampled pairs (tau 0.07, beta 0.5,
eps 0.1; reference scores from the unadapted embeddings) + alpha (1.0) x
symmetric InfoNCE with label smoothing 0.1 at logit scale 1/tau over 256
sampled caption pairs. Adam, learning rate 3e-3, no weight decay. Indices
are sampled on the host each step, as Kalon does; the step is jit-compiled
(compilation is excluded from the timing, as is Kalon's absent warm-up).
Prints one JSON line.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

IMAGES, TRAIN, DIM, QUERIES, PAIRS = 10_000, 9_000, 64, 600, 28_800
PAIR_BATCH = CAPTION_BATCH = 256
TAU, BETA, EPS, ALPHA, LR, SMOOTH = 0.07, 0.5, 0.1, 1.0, 3e-3, 0.1


def unit(x):
    return x / jnp.linalg.norm(x, axis=1, keepdims=True)


def adapt(a, v):
    return unit(v + v @ a.T)


def smoothed_ce(logits):
    logp = jax.nn.log_softmax(logits, axis=-1)
    n = logits.shape[0]
    nll = -jnp.trace(logp) / n
    return (1 - SMOOTH) * nll + SMOOTH * (-logp.mean())


def loss_fn(a, images, captions, queries, q, w, l, c):
    tq = queries[q]
    vw, vl = images[w], images[l]
    ref_w = (tq * vw).sum(1) / TAU
    ref_l = (tq * vl).sum(1) / TAU
    th_w = (tq * adapt(a, vw)).sum(1) / TAU
    th_l = (tq * adapt(a, vl)).sum(1) / TAU
    h = BETA * ((th_w - ref_w) - (th_l - ref_l))
    dpo = (-(1 - EPS) * jax.nn.log_sigmoid(h) - EPS * jax.nn.log_sigmoid(-h)).mean()
    logits = adapt(a, images[c]) @ captions[c].T / TAU
    pt = 0.5 * (smoothed_ce(logits) + smoothed_ce(logits.T))
    return dpo + ALPHA * pt


@jax.jit
def step(state, images, captions, queries, q, w, l, c):
    a, m, v, t = state
    g = jax.grad(loss_fn)(a, images, captions, queries, q, w, l, c)
    t = t + 1
    m = 0.9 * m + 0.1 * g
    v = 0.999 * v + 0.001 * g * g
    mhat = m / (1 - 0.9**t)
    vhat = v / (1 - 0.999**t)
    a = a - LR * mhat / (jnp.sqrt(vhat) + 1e-8)
    return (a, m, v, t)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(7)
    images = unit(jnp.asarray(rng.uniform(-1, 1, (IMAGES, DIM)), dtype=jnp.float32))
    captions = unit(jnp.asarray(rng.uniform(-1, 1, (IMAGES, DIM)), dtype=jnp.float32))
    queries = unit(jnp.asarray(rng.uniform(-1, 1, (QUERIES, DIM)), dtype=jnp.float32))
    pair_q = rng.integers(0, QUERIES, PAIRS)
    pair_w = rng.integers(0, TRAIN, PAIRS)
    pair_l = rng.integers(0, TRAIN, PAIRS)
    zeros = jnp.zeros((DIM, DIM), jnp.float32)
    state = (zeros, zeros, zeros, jnp.float32(0))

    def sample():
        p = rng.integers(0, PAIRS, PAIR_BATCH)
        c = rng.permutation(TRAIN)[:CAPTION_BATCH]
        return pair_q[p], pair_w[p], pair_l[p], c

    # compile once, outside the timing
    jax.block_until_ready(step(state, images, captions, queries, *sample()))
    started = time.perf_counter()
    for _ in range(args.steps):
        state = step(state, images, captions, queries, *sample())
    jax.block_until_ready(state)
    seconds = time.perf_counter() - started
    print(json.dumps({"peer": "jax", "jax": jax.__version__, "backend": jax.default_backend(),
                      "steps": args.steps,
                      "pairs_per_s": round(args.steps * PAIR_BATCH / seconds)}))


if __name__ == "__main__":
    main()
