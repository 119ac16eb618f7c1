//! Sufficient statistics and the small solves behind the streaming fits.
//!
//! [`Moments`] accumulates, in one pass and in memory proportional to the
//! square of the number of columns, the count, the means and the centred
//! cross-products (co-moments) of its columns: rows are gathered in blocks of
//! [`BLOCK_ROWS`], each block is centred on its own mean (two passes over a
//! block that sits in cache), and blocks are merged with the pairwise update
//! of Chan, Golub and LeVeque. Centring before multiplying keeps the
//! cross-products free of the cancellation that raw sums `Σxᵢxⱼ` suffer when
//! a column's mean is large against its spread.
//!
//! [`solve_linear`] turns the co-moments of the features and the target into
//! the least-squares coefficients: the features' co-moment matrix is scaled
//! to a correlation matrix (unit diagonal) and factorised by Cholesky. A
//! constant feature, or one that the features before it explain almost
//! exactly (a Cholesky pivot `1 − R²` below [`COLLINEARITY_TOLERANCE`]), is a
//! [`DesignError`] naming the feature: the platform refuses to fit a
//! singular or numerically ill-conditioned design rather than return
//! arbitrary coefficients.
//!
//! [`NewtonStep`] accumulates the loss, gradient and Hessian of the
//! L2-regularised logistic loss over a pass, for the Newton (IRLS) fit of
//! the streaming logistic model.

use ml_shared::model::sigmoid;

/// Rows gathered before a block is centred and merged.
pub const BLOCK_ROWS: usize = 1024;

/// Smallest Cholesky pivot of the features' correlation matrix, that is
/// `1 − R²` of a feature regressed on the features before it, for the design
/// to count as full rank. Below it, the condition number of the correlation
/// matrix exceeds about `10¹⁰` and the coefficients are not determined by
/// the data to any useful precision.
pub const COLLINEARITY_TOLERANCE: f64 = 1e-10;

/// A design that cannot be fitted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DesignError {
    /// No row to fit on.
    #[error("no training rows")]
    NoRows,
    /// A feature takes one value on every training row.
    #[error("feature {feature} is constant on the training rows (every value {value}): its coefficient is not determined; remove it from the model or supply data where it varies")]
    Constant {
        /// The feature.
        feature: String,
        /// Its value.
        value: f64,
    },
    /// A feature is (almost) a linear combination of the features before it.
    #[error("feature {feature} is a linear combination of the features before it on the training rows (1 − R² = {residual:.3e}, tolerance {COLLINEARITY_TOLERANCE:e}): the design is singular or too ill-conditioned to fit; remove the feature or supply data that separates it")]
    Collinear {
        /// The feature.
        feature: String,
        /// `1 − R²` of the feature on the ones before it.
        residual: f64,
    },
    /// The Newton system of the logistic fit is not positive definite
    /// (every probability saturated at 0 or 1).
    #[error("the logistic fit's curvature vanished (the classes are separated or the scores saturated); the regularised optimum cannot be reached")]
    Degenerate,
}

/// Count, means and centred co-moments of fixed-width rows, accumulated in
/// one pass.
#[derive(Debug, Clone)]
pub struct Moments {
    width: usize,
    n: u64,
    /// The first row: rows are accumulated relative to it, so that means
    /// far from zero keep their precision.
    shift: Vec<f64>,
    /// Mean relative to `shift`.
    mean: Vec<f64>,
    /// Row-major `width × width`; only the upper triangle is maintained
    /// until [`Moments::finish`].
    comoment: Vec<f64>,
    block: Vec<f64>,
    block_rows: usize,
    block_mean: Vec<f64>,
    block_comoment: Vec<f64>,
}

/// What [`Moments`] found: `n`, the means, and the symmetric matrix
/// `Σ (x − mean)(x − mean)ᵀ`.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Rows.
    pub n: u64,
    /// Mean of each column.
    pub mean: Vec<f64>,
    /// Centred co-moments, row-major `width × width`, symmetric.
    pub comoment: Vec<f64>,
}

impl Summary {
    /// Number of columns.
    pub fn width(&self) -> usize {
        self.mean.len()
    }

    /// Co-moment of columns `i` and `j`.
    pub fn c(&self, i: usize, j: usize) -> f64 {
        self.comoment[i * self.width() + j]
    }

    /// Population standard deviation of column `i`.
    pub fn sd(&self, i: usize) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            (self.c(i, i).max(0.0) / self.n as f64).sqrt()
        }
    }
}

impl Moments {
    /// An empty accumulator of rows of `width` values.
    pub fn new(width: usize) -> Self {
        Self {
            width,
            n: 0,
            shift: Vec::new(),
            mean: vec![0.0; width],
            comoment: vec![0.0; width * width],
            block: Vec::with_capacity(BLOCK_ROWS * width),
            block_rows: 0,
            block_mean: vec![0.0; width],
            block_comoment: vec![0.0; width * width],
        }
    }

    /// Adds one row (`row.len() == width`).
    #[inline]
    pub fn push(&mut self, row: &[f64]) {
        debug_assert_eq!(row.len(), self.width);
        if self.shift.is_empty() {
            self.shift = row.to_vec();
        }
        self.block
            .extend(row.iter().zip(&self.shift).map(|(x, s)| x - s));
        self.block_rows += 1;
        if self.block_rows == BLOCK_ROWS {
            self.flush();
        }
    }

    /// Rows added so far.
    pub fn count(&self) -> u64 {
        self.n + self.block_rows as u64
    }

    fn flush(&mut self) {
        if self.block_rows == 0 {
            return;
        }
        self.block_moments();
        self.merge_block();
        self.n += self.block_rows as u64;
        self.block_rows = 0;
        self.block.clear();
    }

    /// The buffered block's mean and centred co-moments.
    fn block_moments(&mut self) {
        let w = self.width;
        let m = self.block_rows as f64;
        self.block_mean.iter_mut().for_each(|v| *v = 0.0);
        for row in self.block.chunks_exact(w) {
            for (s, x) in self.block_mean.iter_mut().zip(row) {
                *s += x;
            }
        }
        self.block_mean.iter_mut().for_each(|v| *v /= m);
        self.block_comoment.iter_mut().for_each(|v| *v = 0.0);
        // The corrected two-pass algorithm: the deviations' sums (zero but
        // for the rounding of the block mean) correct the co-moments.
        let mut dsum = [0.0f64; 16];
        let mut d = [0.0f64; 16];
        if w <= d.len() {
            for row in self.block.chunks_exact(w) {
                for (((di, x), mu), ds) in
                    d.iter_mut().zip(row).zip(&self.block_mean).zip(&mut dsum)
                {
                    *di = x - mu;
                    *ds += *di;
                }
                for i in 0..w {
                    let di = d[i];
                    let line = &mut self.block_comoment[i * w..(i + 1) * w];
                    for (c, dj) in line[i..].iter_mut().zip(&d[i..w]) {
                        *c += di * dj;
                    }
                }
            }
            for i in 0..w {
                for j in i..w {
                    self.block_comoment[i * w + j] -= dsum[i] * dsum[j] / m;
                }
            }
            for (mu, ds) in self.block_mean.iter_mut().zip(&dsum) {
                *mu += ds / m;
            }
        } else {
            let mut d = vec![0.0; w];
            for row in self.block.chunks_exact(w) {
                for ((di, x), mu) in d.iter_mut().zip(row).zip(&self.block_mean) {
                    *di = x - mu;
                }
                for i in 0..w {
                    for j in i..w {
                        self.block_comoment[i * w + j] += d[i] * d[j];
                    }
                }
            }
        }
    }

    /// Merges the block's moments into the running ones.
    fn merge_block(&mut self) {
        let (w, m) = (self.width, self.block_rows as f64);
        // Chan, Golub and LeVeque: merge (n, mean, C) with (m, mean_b, C_b).
        let n = self.n as f64;
        let total = n + m;
        let mut delta = vec![0.0; w];
        for (dl, (a, b)) in delta.iter_mut().zip(self.mean.iter().zip(&self.block_mean)) {
            *dl = b - a;
        }
        let factor = n * m / total;
        for i in 0..w {
            for j in i..w {
                self.comoment[i * w + j] +=
                    self.block_comoment[i * w + j] + delta[i] * delta[j] * factor;
            }
        }
        for (mu, dl) in self.mean.iter_mut().zip(&delta) {
            *mu += dl * m / total;
        }
    }

    /// The statistics of every row added.
    pub fn finish(mut self) -> Summary {
        self.flush();
        let w = self.width;
        for i in 0..w {
            for j in 0..i {
                self.comoment[i * w + j] = self.comoment[j * w + i];
            }
        }
        let mean = if self.shift.is_empty() {
            self.mean
        } else {
            self.mean
                .iter()
                .zip(&self.shift)
                .map(|(m, s)| m + s)
                .collect()
        };
        Summary {
            n: self.n,
            mean,
            comoment: self.comoment,
        }
    }
}

/// A least-squares fit: `y ≈ intercept + Σ coefficients[j]·x[j]` on the raw
/// features.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearSolution {
    /// One per feature, in raw units.
    pub coefficients: Vec<f64>,
    /// The constant term.
    pub intercept: f64,
}

/// Checks that no feature (the first `width − 1` columns of `s`) is
/// constant; `names` names them.
pub fn check_constant(s: &Summary, features: usize, names: &[String]) -> Result<(), DesignError> {
    if s.n == 0 {
        return Err(DesignError::NoRows);
    }
    for (j, name) in names.iter().enumerate().take(features) {
        let sd = s.sd(j);
        if sd == 0.0 || sd <= 1e-12 * s.mean[j].abs() {
            return Err(DesignError::Constant {
                feature: name.clone(),
                value: s.mean[j],
            });
        }
    }
    Ok(())
}

/// Least squares with an intercept from the statistics of rows
/// `[x₁ … x_p, y]` (the target last); `names` names the `p` features.
pub fn solve_linear(s: &Summary, names: &[String]) -> Result<LinearSolution, DesignError> {
    let p = s.width() - 1;
    check_constant(s, p, names)?;
    // Correlation form: R = D⁻¹ C D⁻¹, r = D⁻¹ c_xy with D = diag(√C_jj).
    let d: Vec<f64> = (0..p).map(|j| s.c(j, j).sqrt()).collect();
    let mut r = vec![0.0; p * p];
    let mut rhs = vec![0.0; p];
    for i in 0..p {
        for j in 0..p {
            r[i * p + j] = if i == j {
                1.0
            } else {
                s.c(i, j) / (d[i] * d[j])
            };
        }
        rhs[i] = s.c(i, p) / d[i];
    }
    let l = cholesky(&r, p).map_err(|(j, residual)| DesignError::Collinear {
        feature: names[j].clone(),
        residual,
    })?;
    let gamma = cholesky_solve(&l, p, &rhs);
    let coefficients: Vec<f64> = gamma.iter().zip(&d).map(|(g, dj)| g / dj).collect();
    let intercept = s.mean[p]
        - coefficients
            .iter()
            .zip(&s.mean)
            .map(|(b, m)| b * m)
            .sum::<f64>();
    Ok(LinearSolution {
        coefficients,
        intercept,
    })
}

/// Cholesky factor `L` (row-major, lower) of the symmetric `n × n` matrix
/// `a`, whose diagonal is taken as the scale of each pivot. On failure, the
/// index of the first pivot that falls below [`COLLINEARITY_TOLERANCE`]
/// times its diagonal entry, and that relative pivot.
pub fn cholesky(a: &[f64], n: usize) -> Result<Vec<f64>, (usize, f64)> {
    let mut l = vec![0.0; n * n];
    for j in 0..n {
        let mut pivot = a[j * n + j];
        for k in 0..j {
            pivot -= l[j * n + k] * l[j * n + k];
        }
        let relative = pivot / a[j * n + j];
        if !(relative.is_finite() && relative > COLLINEARITY_TOLERANCE) {
            return Err((j, relative.max(0.0)));
        }
        let ljj = pivot.sqrt();
        l[j * n + j] = ljj;
        for i in j + 1..n {
            let mut v = a[i * n + j];
            for k in 0..j {
                v -= l[i * n + k] * l[j * n + k];
            }
            l[i * n + j] = v / ljj;
        }
    }
    Ok(l)
}

/// Solves `L Lᵀ x = b` for the factor of [`cholesky`].
pub fn cholesky_solve(l: &[f64], n: usize, b: &[f64]) -> Vec<f64> {
    let mut y = b.to_vec();
    for i in 0..n {
        for k in 0..i {
            y[i] -= l[i * n + k] * y[k];
        }
        y[i] /= l[i * n + i];
    }
    for i in (0..n).rev() {
        for k in i + 1..n {
            y[i] -= l[k * n + i] * y[k];
        }
        y[i] /= l[i * n + i];
    }
    y
}

/// `ln(1 + eᵗ)` without overflow.
#[inline]
pub fn softplus(t: f64) -> f64 {
    if t > 0.0 {
        t + (-t).exp().ln_1p()
    } else {
        t.exp().ln_1p()
    }
}

/// The loss `Σ logloss + α/2·‖w‖²` (intercept not penalised, as
/// `linfa-logistic` and scikit-learn), its gradient and its Hessian at
/// parameters `θ = [w₁ … w_p, b]`, accumulated over a pass.
#[derive(Debug, Clone)]
pub struct NewtonStep {
    dim: usize,
    /// Rows seen.
    pub n: u64,
    /// Sum of the log-losses (without the penalty).
    pub loss: f64,
    /// Gradient of the sum of log-losses, `dim` entries.
    pub gradient: Vec<f64>,
    /// Hessian of the sum of log-losses, row-major `dim × dim` (upper
    /// triangle until [`NewtonStep::finish`]).
    pub hessian: Vec<f64>,
    row: Vec<f64>,
}

impl NewtonStep {
    /// An empty accumulation for `features` features (plus the intercept).
    pub fn new(features: usize) -> Self {
        let dim = features + 1;
        Self {
            dim,
            n: 0,
            loss: 0.0,
            gradient: vec![0.0; dim],
            hessian: vec![0.0; dim * dim],
            row: vec![1.0; dim],
        }
    }

    /// Adds a row of standardised features `z` with label `y` (0 or 1), at
    /// parameters `theta`.
    #[inline]
    pub fn add(&mut self, z: &[f64], y: f64, theta: &[f64]) {
        let dim = self.dim;
        self.row[..dim - 1].copy_from_slice(z);
        let s: f64 = self.row.iter().zip(theta).map(|(a, t)| a * t).sum();
        let p = sigmoid(s);
        self.loss += if y == 1.0 { softplus(-s) } else { softplus(s) };
        let residual = p - y;
        let weight = p * (1.0 - p);
        for i in 0..dim {
            let ai = self.row[i];
            self.gradient[i] += residual * ai;
            let wa = weight * ai;
            let line = &mut self.hessian[i * dim..(i + 1) * dim];
            for (h, aj) in line[i..].iter_mut().zip(&self.row[i..]) {
                *h += wa * aj;
            }
        }
        self.n += 1;
    }

    /// Adds the penalty `α/2·‖w‖²` at `theta` and completes the Hessian.
    pub fn finish(&mut self, alpha: f64, theta: &[f64]) {
        let dim = self.dim;
        for (i, t) in theta.iter().enumerate().take(dim - 1) {
            self.loss += 0.5 * alpha * t * t;
            self.gradient[i] += alpha * t;
            self.hessian[i * dim + i] += alpha;
        }
        for i in 0..dim {
            for j in 0..i {
                self.hessian[i * dim + j] = self.hessian[j * dim + i];
            }
        }
    }

    /// Norm of the gradient of the mean loss.
    pub fn gradient_norm(&self) -> f64 {
        self.gradient.iter().map(|g| g * g).sum::<f64>().sqrt() / self.n.max(1) as f64
    }

    /// The Newton direction `−H⁻¹g`.
    pub fn direction(&self) -> Result<Vec<f64>, DesignError> {
        let l = cholesky(&self.hessian, self.dim).map_err(|_| DesignError::Degenerate)?;
        Ok(cholesky_solve(&l, self.dim, &self.gradient)
            .into_iter()
            .map(|v| -v)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn names(p: usize) -> Vec<String> {
        (1..=p).map(|i| format!("x{i}")).collect()
    }

    /// The two-pass co-moments of `rows` shifted by `shift` (co-moments do
    /// not depend on a shift; means are shifted back).
    fn two_pass(rows: &[Vec<f64>], shift: &[f64]) -> Summary {
        let rows: Vec<Vec<f64>> = rows
            .iter()
            .map(|r| r.iter().zip(shift).map(|(x, s)| x - s).collect())
            .collect();
        let w = rows[0].len();
        let n = rows.len() as f64;
        let mean: Vec<f64> = (0..w)
            .map(|j| rows.iter().map(|r| r[j]).sum::<f64>() / n)
            .collect();
        let mut c = vec![0.0; w * w];
        for r in &rows {
            for i in 0..w {
                for j in 0..w {
                    c[i * w + j] += (r[i] - mean[i]) * (r[j] - mean[j]);
                }
            }
        }
        Summary {
            n: rows.len() as u64,
            mean: mean.iter().zip(shift).map(|(m, s)| m + s).collect(),
            comoment: c,
        }
    }

    #[test]
    fn blocked_moments_equal_the_two_pass_ones_even_far_from_zero() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        // 1e9 offset, unit spread: raw sums of squares would lose every digit.
        let rows: Vec<Vec<f64>> = (0..5000)
            .map(|_| {
                let a: f64 = rng.gen_range(-1.0..1.0);
                vec![1e9 + a, 3.0 * a + rng.gen_range(0.0..1.0), -2.0]
            })
            .collect();
        let mut m = Moments::new(3);
        for r in &rows {
            m.push(r);
        }
        let got = m.finish();
        // Subtracting 1e9 from 1e9 + a is exact: the reference has no
        // cancellation to suffer.
        let want = two_pass(&rows, &[1e9, 0.0, 0.0]);
        assert_eq!(got.n, want.n);
        for (a, b) in got.mean.iter().zip(&want.mean) {
            assert!((a - b).abs() <= 1e-12 * b.abs().max(1.0), "{a} {b}");
        }
        for (a, b) in got.comoment.iter().zip(&want.comoment) {
            assert!((a - b).abs() <= 1e-11 * b.abs().max(1e-9), "{a} {b}");
        }
    }

    #[test]
    fn constant_and_collinear_features_are_named() {
        let mut m = Moments::new(3);
        for i in 0..100 {
            let x = i as f64;
            m.push(&[x, 5.0, 2.0 * x]);
        }
        let err = solve_linear(&m.finish(), &names(2)).unwrap_err();
        assert!(
            matches!(err, DesignError::Constant { ref feature, value } if feature == "x2" && value == 5.0),
            "{err}"
        );
        assert!(err.to_string().contains("x2 is constant"), "{err}");

        let mut m = Moments::new(4);
        for i in 0..100 {
            let x = i as f64;
            let z = (i % 7) as f64;
            m.push(&[x, z, 3.0 * x - 2.0 * z + 1.0, x + z]);
        }
        let err = solve_linear(&m.finish(), &names(3)).unwrap_err();
        assert!(
            matches!(err, DesignError::Collinear { ref feature, .. } if feature == "x3"),
            "{err}"
        );
        assert!(err.to_string().contains("linear combination"), "{err}");
        assert_eq!(
            solve_linear(&Moments::new(2).finish(), &names(1)),
            Err(DesignError::NoRows)
        );
    }

    #[test]
    fn an_exact_relation_is_recovered() {
        let mut m = Moments::new(3);
        for i in 0..3000 {
            let a = (i as f64 * 0.37).sin() * 4.0;
            let b = (i % 13) as f64 + 1e6;
            m.push(&[a, b, 1.5 - 2.0 * a + 0.25 * b]);
        }
        let fit = solve_linear(&m.finish(), &names(2)).unwrap();
        assert!((fit.coefficients[0] + 2.0).abs() < 1e-9, "{fit:?}");
        assert!((fit.coefficients[1] - 0.25).abs() < 1e-9, "{fit:?}");
        assert!((fit.intercept - 1.5).abs() < 1e-3, "{fit:?}");
    }

    #[test]
    fn softplus_is_stable() {
        assert!((softplus(0.0) - 2f64.ln()).abs() < 1e-15);
        assert_eq!(softplus(1000.0), 1000.0);
        assert!(softplus(-1000.0) >= 0.0 && softplus(-1000.0) < 1e-300);
    }
}
