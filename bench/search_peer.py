"""The peer of `kalonctl bench search`: faiss-cpu HNSW on the same embeddings.

Reads the catalog's unit embeddings and the query embeddings Kalon wrote
(little-endian f32, row-major), builds IndexHNSWFlat with the same graph
parameters as Kalon's index (M, efConstruction, inner product), takes the
exact top-k from IndexFlatIP as the truth, then raises efSearch until the
recall@k reaches Kalon's (same recall, then compare speed). Queries run on
one thread, as a batch (no Python overhead per query). Prints one JSON line.
"""

import argparse
import json
import time

import faiss
import numpy as np


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True)
    p.add_argument("--queries", required=True)
    p.add_argument("--dim", type=int, required=True)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--m", type=int, default=16)
    p.add_argument("--ef-construction", type=int, default=100)
    p.add_argument("--target-recall", type=float, required=True)
    p.add_argument("--build-threads", type=int, default=2)
    a = p.parse_args()

    xb = np.fromfile(a.base, dtype="<f4").reshape(-1, a.dim)
    xq = np.fromfile(a.queries, dtype="<f4").reshape(-1, a.dim)
    faiss.omp_set_num_threads(a.build_threads)
    flat = faiss.IndexFlatIP(a.dim)
    flat.add(xb)
    _, truth = flat.search(xq, a.k)
    index = faiss.IndexHNSWFlat(a.dim, a.m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = a.ef_construction
    started = time.perf_counter()
    index.add(xb)
    build_s = time.perf_counter() - started

    faiss.omp_set_num_threads(1)
    sweep = []
    for ef in [10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 64, 80, 96, 128, 192, 256, 384, 512]:
        index.hnsw.efSearch = max(ef, a.k)
        done, started = 0, time.perf_counter()
        while True:
            _, found = index.search(xq, a.k)
            done += len(xq)
            if time.perf_counter() - started >= 1.0:
                break
        qps = done / (time.perf_counter() - started)
        recall = float(
            np.mean([len(set(found[i]) & set(truth[i])) / a.k for i in range(len(xq))])
        )
        sweep.append({"ef_search": ef, "recall_at_10": round(recall, 4), "qps": round(qps)})
        if recall >= a.target_recall:
            break
    print(json.dumps({"faiss": faiss.__version__, "build_s": round(build_s, 2), "sweep": sweep,
                      "chosen": sweep[-1], "reached": sweep[-1]["recall_at_10"] >= a.target_recall}))


if __name__ == "__main__":
    main()
