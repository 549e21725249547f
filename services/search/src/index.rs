//! The in-memory vector index over one model version's image embeddings.
//!
//! Embeddings are unit length, so the score is the inner product. Small
//! corpora are searched exactly (a scan of n x d floats is faster than a
//! graph walk below a few thousand rows and is always right); larger ones go
//! through HNSW (`usearch`, chosen against `hnsw_rs`, `instant-distance` and
//! faiss in `kalon-bench search`). The graph keeps its copy of the rows
//! in int8 (a quarter of the memory traffic per distance); a search asks it
//! for `OVERFETCH` times the rows wanted and re-scores them exactly from the
//! float rows, so the order and the scores are the same whichever path found
//! a row, and int8's rounding only decides which rows are proposed.

use std::sync::{Condvar, Mutex};

use usearch::ffi::{IndexOptions as UsearchOptions, MetricKind, ScalarKind};

/// Inner product with eight independent sums, so the compiler vectorises it.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut sums = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a8.zip(b8) {
        for i in 0..8 {
            sums[i] += x[i] * y[i];
        }
    }
    sums.iter().sum::<f32>() + tail
}

/// Index parameters.
#[derive(Debug, Clone, Copy)]
pub struct IndexParams {
    /// Corpora with fewer rows are searched exactly.
    pub exact_below: usize,
    /// HNSW links per node (M).
    pub max_connections: usize,
    /// Candidate list while building (efConstruction).
    pub ef_construction: usize,
    /// Candidate list while searching (efSearch); at least k is used.
    pub ef_search: usize,
}

impl Default for IndexParams {
    fn default() -> Self {
        IndexParams {
            exact_below: 5_000,
            max_connections: 16,
            ef_construction: 100,
            ef_search: 256,
        }
    }
}

/// A hit: row number in the index and its inner product with the query.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub row: usize,
    pub score: f32,
}

enum Graph {
    Exact,
    Hnsw(usearch::Index),
}

/// At most `n` holders at once: usearch keeps one search context per
/// reserved thread, so concurrent searches beyond that wait here instead of
/// failing.
struct Gate {
    free: Mutex<usize>,
    freed: Condvar,
}

impl Gate {
    fn new(n: usize) -> Self {
        Gate {
            free: Mutex::new(n),
            freed: Condvar::new(),
        }
    }

    fn run<T>(&self, f: impl FnOnce() -> T) -> T {
        {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            while *free == 0 {
                free = self.freed.wait(free).unwrap_or_else(|e| e.into_inner());
            }
            *free -= 1;
        }
        let out = f();
        *self.free.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.freed.notify_one();
        out
    }
}

/// Search contexts reserved per index (concurrent searches beyond this wait).
const SEARCH_CONTEXTS: usize = 64;

/// How many times `k` rows an HNSW search takes from the int8 graph before
/// the exact re-scoring keeps the best `k`.
pub const OVERFETCH: usize = 4;

/// Unit-length rows and, above the exact threshold, an HNSW graph over them.
pub struct VectorIndex {
    dim: usize,
    data: Vec<f32>,
    graph: Graph,
    gate: Gate,
}

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("embedding data of {len} floats is not a whole number of {dim}-d rows")]
    Ragged { len: usize, dim: usize },
    #[error("row {row} is not unit length (norm {norm}); embeddings must be L2-normalised")]
    NotUnit { row: usize, norm: f32 },
    #[error("query is {got}-d, the index {want}-d")]
    QueryDim { got: usize, want: usize },
    #[error("HNSW index: {0}")]
    Hnsw(String),
}

impl VectorIndex {
    /// Builds the index; HNSW insertion runs on all cores.
    pub fn build(dim: usize, data: Vec<f32>, params: IndexParams) -> Result<Self, IndexError> {
        if dim == 0 || !data.len().is_multiple_of(dim) {
            return Err(IndexError::Ragged {
                len: data.len(),
                dim,
            });
        }
        for (row, v) in data.chunks_exact(dim).enumerate() {
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            if !(0.99..=1.01).contains(&norm) {
                return Err(IndexError::NotUnit { row, norm });
            }
        }
        let n = data.len() / dim;
        let graph = if n < params.exact_below {
            Graph::Exact
        } else {
            Graph::Hnsw(build_hnsw(dim, &data, params)?)
        };
        Ok(VectorIndex {
            dim,
            data,
            graph,
            gate: Gate::new(SEARCH_CONTEXTS),
        })
    }

    pub fn len(&self) -> usize {
        self.data.len() / self.dim
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Changes the HNSW candidate list of searches from now on (no-op for
    /// exact indexes); for recall/speed sweeps.
    pub fn set_ef_search(&self, ef: usize) {
        if let Graph::Hnsw(hnsw) = &self.graph {
            hnsw.change_expansion_search(ef);
        }
    }

    /// Whether searches go through the HNSW graph.
    pub fn is_approximate(&self) -> bool {
        matches!(self.graph, Graph::Hnsw(_))
    }

    pub fn row(&self, row: usize) -> &[f32] {
        &self.data[row * self.dim..(row + 1) * self.dim]
    }

    fn dot(&self, row: usize, query: &[f32]) -> f32 {
        dot(self.row(row), query)
    }

    /// The `k` best rows for a unit-length query, best first.
    pub fn search(&self, query: &[f32], k: usize) -> Result<Vec<Hit>, IndexError> {
        if query.len() != self.dim {
            return Err(IndexError::QueryDim {
                got: query.len(),
                want: self.dim,
            });
        }
        Ok(match &self.graph {
            Graph::Exact => self.exact(query, k),
            Graph::Hnsw(hnsw) => {
                let k = k.min(self.len());
                let wanted = (k * OVERFETCH).min(self.len());
                let found = self
                    .gate
                    .run(|| hnsw.search(query, wanted))
                    .map_err(|e| IndexError::Hnsw(e.to_string()))?;
                let mut hits: Vec<Hit> = found
                    .keys
                    .iter()
                    .map(|&key| {
                        let row = key as usize;
                        Hit {
                            row,
                            score: self.dot(row, query),
                        }
                    })
                    .collect();
                sort_hits(&mut hits);
                hits.truncate(k);
                hits
            }
        })
    }

    /// The `k` best rows by a full scan (the ground truth for recall).
    pub fn exact(&self, query: &[f32], k: usize) -> Vec<Hit> {
        let k = k.min(self.len());
        if k == 0 {
            return Vec::new();
        }
        // a bounded min-heap would save a little; n log k vs a partial sort of
        // n scores is not where the time goes (the dot products are)
        let mut hits: Vec<Hit> = (0..self.len())
            .map(|row| Hit {
                row,
                score: self.dot(row, query),
            })
            .collect();
        hits.select_nth_unstable_by(k - 1, |a, b| b.score.total_cmp(&a.score));
        hits.truncate(k);
        sort_hits(&mut hits);
        hits
    }
}

/// The HNSW graph over the rows (inner product on int8 copies of the unit
/// rows; M, efConstruction and efSearch from `params`), rows inserted from
/// all cores.
fn build_hnsw(dim: usize, data: &[f32], params: IndexParams) -> Result<usearch::Index, IndexError> {
    let error = |e: cxx::Exception| IndexError::Hnsw(e.to_string());
    let n = data.len() / dim;
    let index = usearch::Index::new(&UsearchOptions {
        dimensions: dim,
        metric: MetricKind::IP,
        // unit rows: every component lies in [-1, 1], int8's range
        quantization: ScalarKind::I8,
        connectivity: params.max_connections,
        expansion_add: params.ef_construction,
        expansion_search: params.ef_search,
        multi: false,
    })
    .map_err(error)?;
    let builders = std::thread::available_parallelism().map_or(2, |n| n.get());
    index
        .reserve_capacity_and_threads(n, builders.max(SEARCH_CONTEXTS))
        .map_err(error)?;
    let stripe = n.div_ceil(builders);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..builders)
            .map(|b| {
                let index = &index;
                scope.spawn(move || {
                    for row in (b * stripe)..((b + 1) * stripe).min(n) {
                        index.add(row as u64, &data[row * dim..(row + 1) * dim])?;
                    }
                    Ok::<_, cxx::Exception>(())
                })
            })
            .collect();
        for worker in workers {
            worker
                .join()
                .map_err(|_| IndexError::Hnsw("an insert thread panicked".into()))?
                .map_err(error)?;
        }
        Ok(())
    })?;
    Ok(index)
}

fn sort_hits(hits: &mut [Hit]) {
    hits.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.row.cmp(&b.row)));
}

/// Fraction of the exact top-k rows an approximate answer found.
pub fn recall(exact: &[Hit], found: &[Hit]) -> f64 {
    if exact.is_empty() {
        return 1.0;
    }
    let hit = exact
        .iter()
        .filter(|e| found.iter().any(|f| f.row == e.row))
        .count();
    hit as f64 / exact.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random unit rows (xorshift), no rand dependency.
    fn rows(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut state = seed | 1;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let mut data: Vec<f32> = (0..n * dim).map(|_| next()).collect();
        kalon_encoder::encoder::l2_normalise(&mut data, dim);
        data
    }

    #[test]
    fn exact_search_returns_the_best_rows_in_order() {
        let data = rows(300, 8, 3);
        let index = VectorIndex::build(8, data.clone(), IndexParams::default()).unwrap();
        assert!(!index.is_approximate());
        let query = &data[5 * 8..6 * 8];
        let hits = index.search(query, 10).unwrap();
        assert_eq!(hits.len(), 10);
        assert_eq!(hits[0].row, 5, "a row is its own nearest neighbour");
        assert!((hits[0].score - 1.0).abs() < 1e-5);
        assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
        // nothing outside the answer scores higher than its last hit
        let last = hits[9].score;
        let better = (0..300)
            .filter(|r| index.dot(*r, query) > last)
            .filter(|r| !hits.iter().any(|h| h.row == *r))
            .count();
        assert_eq!(better, 0);
        // k larger than the corpus gives the whole corpus
        assert_eq!(index.search(query, 1000).unwrap().len(), 300);
    }

    #[test]
    fn hnsw_recall_at_10_is_at_least_095_against_exact_search() {
        let dim = 32;
        let data = rows(20_000, dim, 11);
        let params = IndexParams {
            exact_below: 1_000,
            ..IndexParams::default()
        };
        let index = VectorIndex::build(dim, data, params).unwrap();
        assert!(index.is_approximate());
        let queries = rows(200, dim, 99);
        let mut total = 0.0;
        for q in queries.chunks_exact(dim) {
            let exact = index.exact(q, 10);
            let found = index.search(q, 10).unwrap();
            assert_eq!(found.len(), 10);
            // the int8 graph only proposes rows: scores are the float rows'
            // exact inner products, best first
            for hit in &found {
                assert_eq!(hit.score, index.dot(hit.row, q));
            }
            assert!(found.windows(2).all(|w| w[0].score >= w[1].score));
            total += recall(&exact, &found);
        }
        let mean = total / 200.0;
        assert!(mean >= 0.95, "recall@10 {mean}");
        assert!(mean <= 1.0);
    }

    #[test]
    fn the_dot_product_handles_every_length() {
        let odd: Vec<f32> = (0..19).map(|i| i as f32).collect();
        let plain: f32 = odd.iter().map(|x| x * x).sum();
        assert_eq!(dot(&odd, &odd), plain);
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(matches!(
            VectorIndex::build(4, vec![0.5; 6], IndexParams::default()),
            Err(IndexError::Ragged { .. })
        ));
        assert!(matches!(
            VectorIndex::build(2, vec![1.0, 1.0], IndexParams::default()),
            Err(IndexError::NotUnit { row: 0, .. })
        ));
        let index = VectorIndex::build(2, vec![1.0, 0.0], IndexParams::default()).unwrap();
        assert!(matches!(
            index.search(&[1.0, 0.0, 0.0], 1),
            Err(IndexError::QueryDim { got: 3, want: 2 })
        ));
    }
}
