"""The peer of `kalon-bench search`: faiss-cpu HNSW on the same embeddings.

Reads the catalog's unit embeddings and the query embeddings Kalon wrote
(little-endian f32, row-major), takes the exact top-k from IndexFlatIP as
the truth, and builds two faiss HNSW indexes with the same graph parameters
as Kalon's index (M, efConstruction, inner product):
  - `flat`: IndexHNSWFlat, float rows in the graph;
  - `sq8-refine`: IndexHNSWSQ (8-bit scalar quantizer) under
    IndexRefineFlat with k_factor 4: the technique Kalon's index uses (an
    int8 graph proposes 4k rows, the float rows re-score them).
For each it raises efSearch until the recall@k reaches Kalon's (same recall,
then compare speed). `chosen` is the faster of the two at that recall: the
peer Kalon is measured against. Queries run on one thread, as a batch (no
Python overhead per query). Prints one JSON line.
"""

import argparse
import json
import time

import faiss
import numpy as np

EF_GRID = [10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256,
           320, 384, 512]


def sweep(search, truth, k, target):
    """efSearch upwards until the recall reaches `target`: the settings
    tried. `search(ef)` answers every query with that efSearch."""
    tried = []
    for ef in EF_GRID:
        done, started = 0, time.perf_counter()
        while True:
            found = search(max(ef, k))
            done += len(truth)
            if time.perf_counter() - started >= 1.0:
                break
        qps = done / (time.perf_counter() - started)
        recall = float(np.mean([len(set(found[i]) & set(truth[i])) / k for i in range(len(truth))]))
        tried.append({"ef_search": ef, "recall_at_10": round(recall, 4), "qps": round(qps)})
        if recall >= target:
            break
    return {"sweep": tried, "chosen": tried[-1], "reached": tried[-1]["recall_at_10"] >= target}


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

    variants = {}
    started = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(a.dim, a.m, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = a.ef_construction
    hnsw.add(xb)
    build_s = time.perf_counter() - started
    faiss.omp_set_num_threads(1)

    def search_flat(ef):
        hnsw.hnsw.efSearch = ef
        return hnsw.search(xq, a.k)[1]

    variants["flat"] = {"build_s": round(build_s, 2),
                        **sweep(search_flat, truth, a.k, a.target_recall)}
    del hnsw

    faiss.omp_set_num_threads(a.build_threads)
    started = time.perf_counter()
    sq = faiss.IndexHNSWSQ(a.dim, faiss.ScalarQuantizer.QT_8bit, a.m, faiss.METRIC_INNER_PRODUCT)
    sq.hnsw.efConstruction = a.ef_construction
    sq.train(xb)
    refine = faiss.IndexRefineFlat(sq)
    refine.add(xb)
    build_s = time.perf_counter() - started
    faiss.omp_set_num_threads(1)

    def search_sq(ef):
        params = faiss.IndexRefineSearchParameters(
            k_factor=4, base_index_params=faiss.SearchParametersHNSW(efSearch=ef))
        return refine.search(xq, a.k, params=params)[1]

    variants["sq8-refine"] = {"build_s": round(build_s, 2),
                              **sweep(search_sq, truth, a.k, a.target_recall)}

    reaching = [(name, v) for name, v in variants.items() if v["reached"]]
    name, best = max(reaching or variants.items(), key=lambda nv: nv[1]["chosen"]["qps"])
    print(json.dumps({"faiss": faiss.__version__, "variants": variants, "peer": name,
                      "chosen": best["chosen"], "reached": best["reached"]}))


if __name__ == "__main__":
    main()
