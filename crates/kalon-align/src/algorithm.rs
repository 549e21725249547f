//! The algorithm, as Kalon defines it (design brief; docs/ALGORITHM.md).
//!
//! Everything here is the definition: the trainer and the evaluation call
//! these functions and nothing else computes the same quantities.
//!
//! - Score: `s(q, x) = cos(t(q), v(x)) / tau`.
//! - Ranked DPO, for a pair `x_w > x_l` for query `q`, reference = the
//!   frozen encoder before fine-tuning:
//!   `h = (s_theta(q,x_w) - s_ref(q,x_w)) - (s_theta(q,x_l) - s_ref(q,x_l))`,
//!   `L_pair = -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)`.
//!   Total loss = confidence-weighted mean of `L_pair` + `alpha * L_pt`.
//! - D_po: every `stride`-th candidate of the top K in order of relevance to
//!   the query until `u * v` are taken; a `u x v` matrix whose row `i` is
//!   semantic band `i`, each row sorted by aesthetic score; cell `(i1,j1)`
//!   beats `(i2,j2)` iff `i1 <= i2`, `j1 <= j2` and the cells differ.
//! - HPIR agreement: `sum(c * agree) / sum(c)` per aspect.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// Hyper-parameters of the Ranked DPO objective.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DpoParams {
    /// Temperature of the score: `s = cos / tau`.
    pub tau: f64,
    /// Sharpness of the preference sigmoid.
    pub beta: f64,
    /// Label smoothing: the share of belief that the pair is the wrong way round.
    pub eps: f64,
    /// Weight of the InfoNCE regulariser on caption batches.
    pub alpha: f64,
}

impl Default for DpoParams {
    fn default() -> Self {
        DpoParams {
            tau: 0.07,
            beta: 0.5,
            eps: 0.1,
            alpha: 1.0,
        }
    }
}

/// `s(q, x) = cos / tau`.
pub fn score(cos: f64, tau: f64) -> f64 {
    cos / tau
}

/// `log(sigmoid(x))`, stable for large `|x|`.
pub fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// `h` of one pair from its four scores.
pub fn margin(theta_w: f64, ref_w: f64, theta_l: f64, ref_l: f64) -> f64 {
    (theta_w - ref_w) - (theta_l - ref_l)
}

/// `L_pair(h) = -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)`.
pub fn pair_loss(h: f64, beta: f64, eps: f64) -> f64 {
    -(1.0 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
}

/// `dL_pair / dh = beta * (sigmoid(beta h) - (1 - eps))`.
pub fn pair_loss_grad(h: f64, beta: f64, eps: f64) -> f64 {
    beta * (sigmoid(beta * h) - (1.0 - eps))
}

/// The confidence-weighted mean of `L_pair` over a batch of pairs, in f64.
pub fn weighted_pair_loss(margins: &[f64], weights: &[f64], beta: f64, eps: f64) -> f64 {
    assert_eq!(margins.len(), weights.len());
    let total: f64 = weights.iter().sum();
    margins
        .iter()
        .zip(weights)
        .map(|(h, w)| w * pair_loss(*h, beta, eps))
        .sum::<f64>()
        / total
}

/// The same loss on candle tensors (differentiable): all four score
/// tensors and `weights` are `[pairs]`; the reference scores carry no
/// gradient (they come from the frozen encoder).
pub fn ranked_dpo_loss(
    theta_w: &Tensor,
    ref_w: &Tensor,
    theta_l: &Tensor,
    ref_l: &Tensor,
    weights: &Tensor,
    params: &DpoParams,
) -> candle_core::Result<Tensor> {
    let h = ((theta_w - ref_w)? - (theta_l - ref_l)?)?;
    let bh = (h * params.beta)?;
    // log sigmoid(x) = -softplus(-x); softplus(y) = max(y, 0) + log(1 + e^-|y|)
    let log_sig = |x: &Tensor| -> candle_core::Result<Tensor> {
        let y = x.neg()?;
        let softplus = (y.relu()? + (y.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
        softplus.neg()
    };
    let per_pair =
        ((log_sig(&bh)? * -(1.0 - params.eps))? + (log_sig(&bh.neg()?)? * -params.eps)?)?;
    (per_pair * weights)?
        .sum_all()?
        .broadcast_div(&weights.sum_all()?)
}

/// Sizes of D_po construction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DpoSpec {
    /// Candidates retrieved for the rephrased query.
    pub k: usize,
    /// Semantic bands (matrix rows).
    pub u: usize,
    /// Images per band (matrix columns).
    pub v: usize,
    /// Take every `stride`-th candidate in relevance order.
    pub stride: usize,
}

impl DpoSpec {
    /// Checks that `k` candidates are enough for `u * v` cells at `stride`.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.u >= 1 && self.v >= 1, "u and v must be at least 1");
        anyhow::ensure!(self.stride >= 1, "stride must be at least 1");
        let needed = (self.u * self.v - 1) * self.stride + 1;
        anyhow::ensure!(
            self.k >= needed,
            "K = {} candidates cannot fill a {}x{} matrix at stride {} (needs {needed})",
            self.k,
            self.u,
            self.v,
            self.stride
        );
        Ok(())
    }
}

/// The D_po matrix: `ranked` holds candidate indices in order of semantic
/// relevance to the query (best first), `aesthetic[c]` the aesthetic score of
/// candidate `c`. Returns `u` rows of `v` candidates, each row sorted by
/// aesthetic score, best first (ties keep relevance order).
pub fn dpo_matrix(ranked: &[usize], aesthetic: &[f64], spec: &DpoSpec) -> Vec<Vec<usize>> {
    let taken: Vec<usize> = ranked
        .iter()
        .take(spec.k)
        .step_by(spec.stride)
        .take(spec.u * spec.v)
        .copied()
        .collect();
    assert_eq!(taken.len(), spec.u * spec.v, "not enough candidates");
    taken
        .chunks(spec.v)
        .map(|band| {
            let mut row = band.to_vec();
            row.sort_by(|a, b| aesthetic[*b].total_cmp(&aesthetic[*a]));
            row
        })
        .collect()
}

/// The product order on a `u x v` matrix: every `((i1, j1), (i2, j2))` with
/// `i1 <= i2`, `j1 <= j2` and the cells different; the first cell wins.
pub fn product_order_pairs(u: usize, v: usize) -> Vec<((usize, usize), (usize, usize))> {
    let mut pairs = Vec::new();
    for i1 in 0..u {
        for j1 in 0..v {
            for i2 in i1..u {
                for j2 in j1..v {
                    if (i1, j1) != (i2, j2) {
                        pairs.push(((i1, j1), (i2, j2)));
                    }
                }
            }
        }
    }
    pairs
}

/// How many pairs the product order has: `C(u+1, 2) * C(v+1, 2) - u * v`.
pub fn product_order_count(u: usize, v: usize) -> usize {
    (u * (u + 1) / 2) * (v * (v + 1) / 2) - u * v
}

/// (winner, loser) candidate pairs of a D_po matrix.
pub fn dpo_pairs(matrix: &[Vec<usize>]) -> Vec<(usize, usize)> {
    let (u, v) = (matrix.len(), matrix.first().map_or(0, Vec::len));
    product_order_pairs(u, v)
        .into_iter()
        .map(|((i1, j1), (i2, j2))| (matrix[i1][j1], matrix[i2][j2]))
        .collect()
}

/// One HPIR-style judgment for agreement: the model's mean score of row A
/// and of row B, the people's choice and its confidence in (0.5, 1].
#[derive(Debug, Clone, Copy)]
pub struct Judged {
    pub mean_a: f64,
    pub mean_b: f64,
    pub people_chose_a: bool,
    pub confidence: f64,
}

/// `sum(c * agree) / sum(c)`: the model agrees when it prefers (strictly
/// higher mean score) the row people chose; a tie agrees with neither.
pub fn hpir_agreement(items: &[Judged]) -> f64 {
    let total: f64 = items.iter().map(|i| i.confidence).sum();
    let agreed: f64 = items.iter().map(|i| i.confidence * agrees(i)).sum();
    agreed / total
}

/// Whether the model agrees with the people on one item (a tie agrees
/// with neither), as 0 or 1.
fn agrees(item: &Judged) -> f64 {
    let preferred = if item.people_chose_a {
        item.mean_a > item.mean_b
    } else {
        item.mean_b > item.mean_a
    };
    f64::from(u8::from(preferred))
}

/// The change in agreement from `before` to `after`, two models judged on
/// the SAME items in the same order, and its standard error.
///
/// Both agreements share the denominator `sum(c)`, so the change is
/// `D = sum(c_i d_i) / sum(c)` with `d_i = agree_after_i - agree_before_i`
/// in {-1, 0, 1}: a weighted mean of per-item differences. Its standard
/// error is the weighted mean's: `sqrt(n / (n - 1) * sum(c_i^2 (d_i - D)^2)) / sum(c)`.
/// Pairing the items removes the noise the two agreements share (which
/// items were drawn), so the error is far smaller than either agreement's.
pub fn paired_change(before: &[Judged], after: &[Judged]) -> (f64, f64) {
    assert_eq!(before.len(), after.len(), "the same items, judged twice");
    let total: f64 = before.iter().map(|i| i.confidence).sum();
    let d: Vec<(f64, f64)> = before
        .iter()
        .zip(after)
        .map(|(b, a)| (b.confidence, agrees(a) - agrees(b)))
        .collect();
    let change = d.iter().map(|(c, x)| c * x).sum::<f64>() / total;
    let n = d.len() as f64;
    if n < 2.0 {
        return (change, f64::NAN);
    }
    let spread: f64 = d.iter().map(|(c, x)| (c * (x - change)).powi(2)).sum();
    (change, (n / (n - 1.0) * spread).sqrt() / total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    /// The 2-pair example on candle tensors (beta 1, eps 0.1, weights 3 and 1),
    /// with the policy's winner scores given.
    fn two_pair_candle_loss(theta_w: &Tensor) -> Tensor {
        let dev = Device::Cpu;
        let t = |v: &[f32]| Tensor::new(v, &dev).unwrap();
        let params = DpoParams {
            beta: 1.0,
            eps: 0.1,
            ..DpoParams::default()
        };
        ranked_dpo_loss(
            theta_w,
            &t(&[1.5, 0.5]),
            &t(&[1.0, 0.9]),
            &t(&[1.2, 0.4]),
            &t(&[3.0, 1.0]),
            &params,
        )
        .unwrap()
    }

    #[test]
    fn two_pair_loss_matches_hand_computed_values() {
        // pair 1: theta (2.0, 1.0), ref (1.5, 1.2) -> h = 0.5 - (-0.2) = 0.7
        // pair 2: theta (0.3, 0.9), ref (0.5, 0.4) -> h = -0.2 - 0.5 = -0.7
        let h1 = margin(2.0, 1.5, 1.0, 1.2);
        let h2 = margin(0.3, 0.5, 0.9, 0.4);
        assert!(close(h1, 0.7, 1e-12) && close(h2, -0.7, 1e-12));
        // beta = 1, eps = 0.1:
        // L(0.7)  = -0.9 ln s(0.7) - 0.1 ln s(-0.7)
        //         = 0.9 * 0.403186 + 0.1 * 1.103186 = 0.473186
        // L(-0.7) = 0.9 * 1.103186 + 0.1 * 0.403186 = 1.033186
        // (ln s(0.7) = -ln(1 + e^-0.7) = -0.4031860; ln s(-0.7) = -1.1031860)
        assert!(close(pair_loss(h1, 1.0, 0.1), 0.473_186, 1e-6));
        assert!(close(pair_loss(h2, 1.0, 0.1), 1.033_186, 1e-6));
        // weights 3 and 1: (3 * 0.473186 + 1.033186) / 4 = 0.613186
        let mean = weighted_pair_loss(&[h1, h2], &[3.0, 1.0], 1.0, 0.1);
        assert!(close(mean, 0.613_186, 1e-6), "{mean}");

        // the candle loss gives the same number
        let theta_w = Tensor::new(&[2.0f32, 0.3], &Device::Cpu).unwrap();
        let loss = two_pair_candle_loss(&theta_w).to_scalar::<f32>().unwrap();
        assert!(close(loss as f64, 0.613_186, 1e-5), "{loss}");
    }

    #[test]
    fn gradient_matches_finite_differences_in_f64_and_candle() {
        for (beta, eps) in [(1.0, 0.1), (0.5, 0.0), (2.0, 0.3)] {
            for h in [-3.0, -0.7, 0.0, 0.4, 2.5] {
                let d = 1e-6;
                let numeric =
                    (pair_loss(h + d, beta, eps) - pair_loss(h - d, beta, eps)) / (2.0 * d);
                let exact = pair_loss_grad(h, beta, eps);
                assert!(
                    close(numeric, exact, 1e-7),
                    "beta {beta} eps {eps} h {h}: {numeric} vs {exact}"
                );
            }
        }
        // candle's autograd: d loss / d theta_w = w_i / sum(w) * dL/dh
        let theta_w = Var::new(&[2.0f32, 0.3], &Device::Cpu).unwrap();
        let loss = two_pair_candle_loss(theta_w.as_tensor());
        let grads = loss.backward().unwrap();
        let g = grads.get(&theta_w).unwrap().to_vec1::<f32>().unwrap();
        let expect = [
            0.75 * pair_loss_grad(0.7, 1.0, 0.1),
            0.25 * pair_loss_grad(-0.7, 1.0, 0.1),
        ];
        for (got, want) in g.iter().zip(expect) {
            assert!(close(*got as f64, want, 1e-5), "{got} vs {want}");
        }
    }

    #[test]
    fn eps_zero_is_plain_dpo_and_beta_scales_the_margin() {
        for h in [-2.0f64, -0.1, 0.0, 0.3, 4.0] {
            // plain DPO: -log sigmoid(beta h)
            let plain = -(1.0 / (1.0 + (-0.5 * h).exp())).ln();
            assert!(close(pair_loss(h, 0.5, 0.0), plain, 1e-12));
            // beta only ever multiplies h
            assert!(close(
                pair_loss(h, 2.0, 0.1),
                pair_loss(2.0 * h, 1.0, 0.1),
                1e-12
            ));
        }
        // a larger beta sharpens: a right-way margin costs less, a wrong-way one more
        assert!(pair_loss(1.0, 4.0, 0.0) < pair_loss(1.0, 1.0, 0.0));
        assert!(pair_loss(-1.0, 4.0, 0.0) > pair_loss(-1.0, 1.0, 0.0));
        // with smoothing the loss is minimal at a finite margin: sigmoid(beta h) = 1 - eps
        let best = (0.9f64 / 0.1).ln();
        assert!(close(pair_loss_grad(best, 1.0, 0.1), 0.0, 1e-12));
        assert!(
            close(log_sigmoid(-800.0), -800.0, 1e-9),
            "stable for large |x|"
        );
    }

    #[test]
    fn dpo_pairs_of_hand_made_matrices() {
        // 2x3: cells named by (row, col) -> id 10*row + col
        let m: Vec<Vec<usize>> = vec![vec![0, 1, 2], vec![10, 11, 12]];
        let mut got = dpo_pairs(&m);
        got.sort_unstable();
        let mut want = vec![
            (0, 1),
            (0, 2),
            (0, 10),
            (0, 11),
            (0, 12),
            (1, 2),
            (1, 11),
            (1, 12),
            (2, 12),
            (10, 11),
            (10, 12),
            (11, 12),
        ];
        want.sort_unstable();
        assert_eq!(got, want);
        assert_eq!(product_order_count(2, 3), 12);

        // 3x3: 6 * 6 - 9 = 27 pairs; the top-left beats all 8 others, the
        // bottom-right loses to all 8, the centre beats 3 and loses to 3
        let m: Vec<Vec<usize>> = (0..3)
            .map(|i| (0..3).map(|j| 10 * i + j).collect())
            .collect();
        let pairs = dpo_pairs(&m);
        assert_eq!(pairs.len(), 27);
        assert_eq!(product_order_count(3, 3), 27);
        assert_eq!(pairs.iter().filter(|p| p.0 == 0).count(), 8);
        assert_eq!(pairs.iter().filter(|p| p.1 == 22).count(), 8);
        assert_eq!(pairs.iter().filter(|p| p.0 == 11).count(), 3);
        assert_eq!(pairs.iter().filter(|p| p.1 == 11).count(), 3);
        // (0,2) and (1,0) are incomparable
        assert!(!pairs.contains(&(2, 10)) && !pairs.contains(&(10, 2)));
    }

    #[test]
    fn product_order_properties() {
        for (u, v) in [(1, 1), (1, 4), (2, 2), (3, 5), (4, 4)] {
            let pairs = product_order_pairs(u, v);
            assert_eq!(pairs.len(), product_order_count(u, v), "{u}x{v}");
            let set: std::collections::HashSet<_> = pairs.iter().copied().collect();
            assert_eq!(set.len(), pairs.len(), "no duplicates");
            for &(a, b) in &pairs {
                assert_ne!(a, b, "no self pairs");
                assert!(!set.contains(&(b, a)), "antisymmetric");
            }
            // transitively closed: a > b and b > c imply a > c
            for &(a, b) in &pairs {
                for &(b2, c) in &pairs {
                    if b == b2 {
                        assert!(set.contains(&(a, c)), "{a:?} > {b:?} > {c:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn dpo_matrix_takes_every_stride_th_candidate_and_sorts_rows_by_aesthetics() {
        // candidates 0..12 ranked by relevance as given; stride 2 takes
        // ranks 0, 2, 4, 6, 8, 10 -> ids 7, 5, 3, 1, 8, 6
        let ranked = [7, 0, 5, 9, 3, 2, 1, 11, 8, 4, 6, 10];
        let mut aesthetic = vec![0.0; 12];
        for (id, a) in [(7, 0.1), (5, 0.9), (3, 0.5), (1, 0.2), (8, 0.8), (6, 0.3)] {
            aesthetic[id] = a;
        }
        let spec = DpoSpec {
            k: 12,
            u: 2,
            v: 3,
            stride: 2,
        };
        spec.validate().unwrap();
        assert_eq!(
            dpo_matrix(&ranked, &aesthetic, &spec),
            vec![vec![5, 3, 7], vec![8, 6, 1]]
        );
        let too_few = DpoSpec { k: 10, ..spec };
        assert!(too_few
            .validate()
            .unwrap_err()
            .to_string()
            .contains("needs 11"));
    }

    #[test]
    fn hpir_agreement_weights_by_confidence() {
        let items = [
            Judged {
                mean_a: 0.9,
                mean_b: 0.1,
                people_chose_a: true,
                confidence: 1.0,
            },
            Judged {
                mean_a: 0.9,
                mean_b: 0.1,
                people_chose_a: false,
                confidence: 0.6,
            },
            Judged {
                mean_a: 0.2,
                mean_b: 0.4,
                people_chose_a: false,
                confidence: 0.8,
            },
            Judged {
                mean_a: 0.5,
                mean_b: 0.5,
                people_chose_a: true,
                confidence: 0.6,
            },
        ];
        // (1.0 + 0.8) / 3.0
        assert!(close(hpir_agreement(&items), 0.6, 1e-12));
    }

    #[test]
    fn paired_change_is_the_weighted_mean_difference_with_its_error() {
        // people chose A each time; a model "agrees" with mean_a 1 > mean_b 0
        let judged = |agree: &[bool]| -> Vec<Judged> {
            agree
                .iter()
                .zip([1.0, 0.5, 0.5])
                .map(|(&a, confidence)| Judged {
                    mean_a: f64::from(u8::from(a)),
                    mean_b: 0.0,
                    people_chose_a: true,
                    confidence,
                })
                .collect()
        };
        // d = (0, 1, -1): D = 0; sqrt(3/2 * (0.25 + 0.25)) / 2
        let (change, se) =
            paired_change(&judged(&[true, false, true]), &judged(&[true, true, false]));
        assert!(close(change, 0.0, 1e-12), "{change}");
        assert!(close(se, 0.75f64.sqrt() / 2.0, 1e-12), "{se}");
        // d = (1, 1, 0): D = 1.5 / 2; sqrt(3/2 * 0.21875) / 2
        let before = judged(&[false, false, true]);
        let after = judged(&[true, true, true]);
        let (change, se) = paired_change(&before, &after);
        assert!(close(change, 0.75, 1e-12), "{change}");
        assert!(close(se, 0.328125f64.sqrt() / 2.0, 1e-12), "{se}");
        // the change is exactly the difference of the two agreements
        assert!(close(
            change,
            hpir_agreement(&after) - hpir_agreement(&before),
            1e-12
        ));
        // a model judged against itself has changed by nothing, surely
        assert_eq!(paired_change(&after, &after), (0.0, 0.0));
    }
}
