//! The streaming run: a data file of any size trained in passes over the
//! file, in memory that does not grow with the row count.
//!
//! - **Pass 1, statistics.** Each row is parsed in place
//!   ([`ml_shared::data::RowReader`]), put in the training split or the
//!   holdout by [`ml_shared::holdout::is_holdout`] on its `user_id` (so the
//!   split does not depend on the order or number of passes), and its model
//!   features and target go into a [`Moments`] accumulator (count, means,
//!   centred co-moments). A reservoir sample of [`SAMPLE_ROWS`] training rows
//!   (seeded, so reproducible) keeps what the reference profile's quantile
//!   bins are cut from; with fewer training rows the sample is all of them
//!   and the profile is exactly the in-memory one. The file's SHA-256 is
//!   taken on the way when the caller has not already taken it.
//! - **The fit.** Linear: least squares solved from the co-moments
//!   ([`crate::solve::solve_linear`]): no further pass. Logistic: Newton's
//!   method (IRLS), one pass per iteration, each accumulating the loss,
//!   gradient and Hessian of the same objective as `linfa-logistic`, with a
//!   step halved when the loss does not decrease; the number of passes and
//!   the final gradient norm are reported.
//! - **Scoring.** Validation metrics of the fitted artifact on the holdout
//!   rows, and the check that no `user_id` repeats (below). When the holdout
//!   fits in [`HOLDOUT_BUFFER_ROWS`] (kept from pass 1) and no id is
//!   suspect, this needs no further read; otherwise a last pass reads the
//!   file again (parsing only the holdout rows' numbers).
//!
//! Duplicate ids are found in bounded memory: pass 1 hashes every id (64
//! bits); up to [`SMALL_FILE_ROWS`] rows the hashes are kept and sorted,
//! beyond that a Bloom filter of at most 16 MiB keeps the hashes it reports
//! as possibly seen. Only when some hash is suspect does a last pass compare
//! the actual ids of the rows carrying it, and report a true duplicate with
//! both lines.
//!
//! The file's size and modification time are checked after every pass: a
//! file replaced during the run abandons it. Progress (rows, MB/s, ETA) is
//! logged every [`PROGRESS_INTERVAL`] of a pass.

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use ml_shared::data::{DataError, FileStamp, HashingReader, RowReader};
use ml_shared::features::{FeaturePlan, FeatureRegistry};
use ml_shared::holdout::is_holdout;
use ml_shared::messages::{Metrics, ProgressEvent, ProgressReport, RunRecord};
use ml_shared::model::{ModelArtifact, ModelKind, Scaler, DECISION_THRESHOLD};
use ml_shared::profile::{ReferenceProfile, DEFAULT_BINS};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::pipeline::{self, TrainError, TrainSpec, LOGISTIC_C, MIN_ROWS};
use crate::solve::{LinearSolution, Moments, NewtonStep, Summary};

/// Training rows kept (uniformly at random) for the reference profile's
/// quantile bins.
pub const SAMPLE_ROWS: usize = 65_536;

/// Time between two progress lines of a pass.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);

/// Gradient norm (of the mean loss) at which Newton's method stops early:
/// far below [`pipeline::CONVERGENCE_TOLERANCE`], which decides success.
pub const NEWTON_TOLERANCE: f64 = 1e-10;

/// Most bytes of the duplicate-id filter.
pub const MAX_FILTER_BYTES: usize = 16 << 20;

/// Files of at most this many rows keep every id's 64-bit hash (16 MiB at
/// most) for an exact duplicate check by sorting, instead of the filter's.
pub const SMALL_FILE_ROWS: usize = 1 << 21;

/// Most holdout rows kept in memory (16 MiB with three features): when the
/// holdout fits and no id is suspect, it is scored without a last pass.
pub const HOLDOUT_BUFFER_ROWS: usize = 1 << 19;

/// One pass over the file.
#[derive(Debug, Clone, PartialEq)]
pub struct PassReport {
    /// What the pass did.
    pub name: &'static str,
    /// Rows read.
    pub rows: u64,
    /// Bytes read.
    pub bytes: u64,
    /// How long it took.
    pub seconds: f64,
}

impl PassReport {
    /// Read throughput in MB/s (10⁶ bytes).
    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.seconds.max(1e-9)
    }

    /// Rows per second.
    pub fn rows_per_s(&self) -> f64 {
        self.rows as f64 / self.seconds.max(1e-9)
    }
}

/// How the logistic optimiser ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Convergence {
    /// Newton iterations (each one pass over the file).
    pub iterations: u64,
    /// Norm of the mean loss's gradient at the returned parameters.
    pub gradient: f64,
    /// The objective there (sum of log-losses plus the penalty).
    pub loss: f64,
}

/// What a streaming run did, besides its result.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RunReport {
    /// Every pass, in order.
    pub passes: Vec<PassReport>,
    /// The logistic optimiser's end, for a logistic model.
    pub convergence: Option<Convergence>,
}

impl RunReport {
    /// Parse throughput of the first pass, in MB/s.
    pub fn parse_mb_per_s(&self) -> f64 {
        self.passes.first().map_or(0.0, PassReport::mb_per_s)
    }
}

/// A trained model, its run record, and how the run went.
#[derive(Debug)]
pub struct Trained {
    /// The artifact.
    pub artifact: ModelArtifact,
    /// The run.
    pub run: RunRecord,
    /// Passes and convergence.
    pub report: RunReport,
}

/// Receives a run's progress reports, on the training thread: it must not
/// block (the trainer's forwards them through a bounded channel).
pub type ProgressSink<'a> = &'a (dyn Fn(ProgressReport) + Sync);

/// How a run goes, besides its data and parameters.
#[derive(Clone, Copy)]
pub struct RunOptions<'a> {
    /// The file's fingerprint and the stamp it was taken at, when the
    /// caller has them (otherwise the first pass computes them).
    pub fingerprinted: Option<(&'a str, FileStamp)>,
    /// Where progress reports go, besides the log.
    pub progress: Option<ProgressSink<'a>>,
    /// Time between two progress reports (and log lines) of a pass.
    pub interval: Duration,
}

impl Default for RunOptions<'_> {
    fn default() -> Self {
        Self {
            fingerprinted: None,
            progress: None,
            interval: PROGRESS_INTERVAL,
        }
    }
}

/// The file and what stays true across passes.
struct Source<'a> {
    path: &'a Path,
    raw_names: &'a [String],
    stamp: FileStamp,
    options: RunOptions<'a>,
    started: Instant,
    passes: std::cell::Cell<u32>,
}

impl<'a> Source<'a> {
    /// The file at `path`, checked unchanged since its fingerprint when the
    /// options carry one.
    fn new(
        path: &'a Path,
        raw_names: &'a [String],
        options: RunOptions<'a>,
        started: Instant,
    ) -> Result<Self, DataError> {
        let source = Source {
            path,
            raw_names,
            stamp: match &options.fingerprinted {
                Some((_, stamp)) => *stamp,
                None => FileStamp::of(path)?,
            },
            options,
            started,
            passes: std::cell::Cell::new(0),
        };
        source.check_unchanged()?;
        Ok(source)
    }

    fn open(&self) -> Result<std::fs::File, DataError> {
        std::fs::File::open(self.path).map_err(|source| DataError::Io {
            path: self.path.to_owned(),
            source,
        })
    }

    fn check_unchanged(&self) -> Result<(), DataError> {
        if FileStamp::of(self.path)? == self.stamp {
            Ok(())
        } else {
            Err(DataError::Changed {
                path: self.path.to_owned(),
            })
        }
    }

    /// Reads every row of `reader`, calling `row` on each; reports
    /// progress every [`RunOptions::interval`] and at the end.
    fn pass<R: Read>(
        &self,
        name: &'static str,
        reader: R,
        mut row: impl FnMut(&RowReader<R>) -> Result<(), TrainError>,
    ) -> Result<(PassReport, R), TrainError> {
        let started = Instant::now();
        self.passes.set(self.passes.get() + 1);
        let mut rows = RowReader::new(self.path, reader, self.raw_names)?;
        let mut n = 0u64;
        let mut next_report = started + self.options.interval;
        while rows.advance()? {
            row(&rows)?;
            n += 1;
            if n.is_multiple_of(4_096) && Instant::now() >= next_report {
                next_report = Instant::now() + self.options.interval;
                let report =
                    self.progress(ProgressEvent::Reading, name, n, rows.bytes_read(), started);
                tracing::info!(
                    pass = name,
                    rows = n,
                    mb = report.bytes as f64 / 1e6,
                    mb_per_s = format_args!("{:.1}", report.mb_per_s),
                    rows_per_s = format_args!("{:.0}", report.rows_per_s),
                    eta_s = format_args!("{:.1}", report.eta_s.unwrap_or(0.0)),
                    "reading the data"
                );
                self.send(report);
            }
        }
        let report = PassReport {
            name,
            rows: n,
            bytes: rows.bytes_read(),
            seconds: started.elapsed().as_secs_f64(),
        };
        tracing::debug!(
            pass = name,
            rows = n,
            mb_per_s = format_args!("{:.1}", report.mb_per_s()),
            seconds = format_args!("{:.3}", report.seconds),
            "pass done"
        );
        self.check_unchanged()?;
        self.send(self.progress(ProgressEvent::PassDone, name, n, report.bytes, started));
        Ok((report, rows.into_inner()))
    }

    /// A progress report of the current pass.
    fn progress(
        &self,
        event: ProgressEvent,
        pass: &str,
        rows: u64,
        bytes: u64,
        pass_started: Instant,
    ) -> ProgressReport {
        let seconds = pass_started.elapsed().as_secs_f64().max(1e-9);
        let rate = bytes as f64 / seconds;
        let eta_s = (event == ProgressEvent::Reading && rate > 0.0)
            .then(|| self.stamp.len.saturating_sub(bytes) as f64 / rate);
        ProgressReport {
            event,
            pass: Some(pass.to_owned()),
            pass_number: self.passes.get(),
            rows,
            bytes,
            total_bytes: self.stamp.len,
            elapsed_s: self.started.elapsed().as_secs_f64(),
            rows_per_s: rows as f64 / seconds,
            mb_per_s: rate / 1e6,
            eta_s,
        }
    }

    fn send(&self, report: ProgressReport) {
        if let Some(sink) = self.options.progress {
            sink(report);
        }
    }
}

/// A Bloom filter over hashes of ids, and the hashes it could not rule out.
/// Blocked: the probes of one id fall in one 64-byte block (one cache line),
/// so an insertion costs one memory access however large the filter.
struct IdFilter {
    blocks: Vec<[u64; 8]>,
    mask: u64,
    candidates: HashSet<u64>,
}

const FILTER_PROBES: u32 = 6;

impl IdFilter {
    /// A filter sized for a file of `file_len` bytes (about 16 bits per
    /// row of 70 bytes), at most [`MAX_FILTER_BYTES`].
    fn for_file(file_len: u64) -> Self {
        let bytes = (file_len / 32).clamp(1 << 12, MAX_FILTER_BYTES as u64);
        let blocks = (bytes / 64).next_power_of_two();
        Self {
            blocks: vec![[0; 8]; blocks as usize],
            mask: blocks - 1,
            candidates: HashSet::new(),
        }
    }

    fn hash(id: &str) -> u64 {
        foldhash::quality::FixedState::with_seed(0x6d6c_706c_6174_666f).hash_one(id)
    }

    /// Records `h`; remembers it as a candidate duplicate when every probe
    /// was already set.
    #[inline]
    fn insert(&mut self, h: u64) {
        // The low bits choose the block; 9 bits of the rest each probe.
        let block = &mut self.blocks[(h & self.mask) as usize];
        let mut bits = h.rotate_right(20);
        let mut seen = true;
        for _ in 0..FILTER_PROBES {
            let bit = (bits & 511) as usize;
            bits >>= 9;
            let (word, mask) = (bit / 64, 1u64 << (bit % 64));
            seen &= block[word] & mask != 0;
            block[word] |= mask;
        }
        if seen {
            self.candidates.insert(h);
        }
    }
}

/// Exact duplicate check of the candidate ids during a later pass.
struct DuplicateCheck {
    candidates: HashSet<u64>,
    first_line: HashMap<String, u64>,
}

impl DuplicateCheck {
    fn check<R: Read>(&mut self, rows: &RowReader<R>, id: &str) -> Result<(), DataError> {
        if self.candidates.is_empty() || !self.candidates.contains(&IdFilter::hash(id)) {
            return Ok(());
        }
        if let Some(&first) = self.first_line.get(id) {
            return Err(rows.bad_row(format!("duplicate user_id {id:?} (first on line {first})")));
        }
        self.first_line.insert(id.to_owned(), rows.line());
        Ok(())
    }
}

/// Algorithm R over training rows' model features.
struct Reservoir {
    width: usize,
    rows: Vec<f64>,
    seen: u64,
    rng: ChaCha8Rng,
}

impl Reservoir {
    fn new(width: usize, seed: u64) -> Self {
        Self {
            width,
            rows: Vec::new(),
            seen: 0,
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x7265_7365_7276_6f69),
        }
    }

    #[inline]
    fn offer(&mut self, x: &[f64]) {
        self.seen += 1;
        if self.rows.len() < SAMPLE_ROWS * self.width {
            self.rows.extend_from_slice(x);
        } else {
            let j = self.rng.gen_range(0..self.seen) as usize;
            if j < SAMPLE_ROWS {
                self.rows[j * self.width..(j + 1) * self.width].copy_from_slice(x);
            }
        }
    }
}

/// What pass 1 gathers: the training rows' moments and sample, the id
/// filter, the holdout rows while they fit, and whether the target is binary.
struct FirstPass<'a> {
    plan: &'a FeaturePlan,
    spec: &'a TrainSpec,
    p: usize,
    moments: Moments,
    sample: Reservoir,
    filter: IdFilter,
    non_binary: Option<f64>,
    n_validation: u64,
    raw: Vec<f64>,
    row: Vec<f64>,
    /// Every id's hash while they fit [`SMALL_FILE_ROWS`] (an exact
    /// duplicate check by sorting), else `None`.
    id_hashes: Option<Vec<u64>>,
    /// The holdout rows (features then target) while they fit
    /// [`HOLDOUT_BUFFER_ROWS`] (scored without a last pass), else `None`.
    holdout: Option<Vec<f64>>,
}

impl<'a> FirstPass<'a> {
    fn new(source: &Source<'_>, plan: &'a FeaturePlan, spec: &'a TrainSpec, p: usize) -> Self {
        Self {
            plan,
            spec,
            p,
            moments: Moments::new(p + 1),
            sample: Reservoir::new(p, spec.seed),
            filter: IdFilter::for_file(source.stamp.len),
            non_binary: None,
            n_validation: 0,
            raw: vec![0.0; source.raw_names.len()],
            row: vec![0.0; p + 1],
            // Reserved whole: untouched pages cost nothing, and no doubling
            // reallocation holds two copies at once.
            id_hashes: Some(Vec::with_capacity(SMALL_FILE_ROWS)),
            holdout: Some(Vec::with_capacity(HOLDOUT_BUFFER_ROWS * (p + 1))),
        }
    }

    fn add<R: Read>(&mut self, rows: &RowReader<R>, path: &Path) -> Result<(), TrainError> {
        let id = rows.user_id()?;
        let h = IdFilter::hash(id);
        self.filter.insert(h);
        if let Some(hashes) = self.id_hashes.as_mut() {
            if hashes.len() < SMALL_FILE_ROWS {
                hashes.push(h);
            } else {
                self.id_hashes = None;
            }
        }
        rows.features_into(&mut self.raw)?;
        let Some(y) = rows.target()? else {
            return Err(TrainError::NoTarget(path.display().to_string()));
        };
        if self.non_binary.is_none() && y != 0.0 && y != 1.0 {
            self.non_binary = Some(y);
        }
        let p = self.p;
        self.plan.compute_into(&self.raw, &mut self.row[..p]);
        self.row[p] = y;
        if is_holdout(id, self.spec.validation_fraction, self.spec.seed) {
            self.n_validation += 1;
            if let Some(kept) = self.holdout.as_mut() {
                if kept.len() < HOLDOUT_BUFFER_ROWS * (p + 1) {
                    kept.extend_from_slice(&self.row);
                } else {
                    self.holdout = None;
                }
            }
        } else {
            self.moments.push(&self.row);
            self.sample.offer(&self.row[..p]);
        }
        Ok(())
    }

    /// The suspected duplicates: exactly those hashes seen twice when every
    /// hash was kept, else what the filter could not rule out.
    fn duplicate_check(&mut self) -> DuplicateCheck {
        let candidates = match self.id_hashes.take() {
            Some(mut hashes) => {
                hashes.sort_unstable();
                hashes
                    .windows(2)
                    .filter(|w| w[0] == w[1])
                    .map(|w| w[0])
                    .collect()
            }
            None => std::mem::take(&mut self.filter.candidates),
        };
        self.filter = IdFilter::for_file(0);
        DuplicateCheck {
            candidates,
            first_line: HashMap::new(),
        }
    }
}

/// One run over one file: the file, the spec and the features, shared by
/// its steps.
struct FileRun<'a> {
    source: Source<'a>,
    spec: &'a TrainSpec,
    plan: FeaturePlan,
    names: Vec<String>,
}

/// Trains on the file at `path` in passes (see the module documentation).
/// With [`RunOptions::fingerprinted`], a file changed since the fingerprint
/// was taken fails the run.
pub fn train_file(
    path: &Path,
    registry: &FeatureRegistry,
    spec: &TrainSpec,
    run_id: String,
    options: RunOptions<'_>,
) -> Result<Trained, TrainError> {
    let started = Instant::now();
    let started_ms = ml_shared::time::now_ms();
    pipeline::check_spec(spec)?;
    let source = Source::new(path, registry.raw_names(), options, started)?;
    let names: Vec<String> = registry.names().map(str::to_owned).collect();
    let run = FileRun {
        plan: registry.plan(&names)?,
        source,
        spec,
        names,
    };
    let mut report = RunReport::default();
    let mut first = FirstPass::new(&run.source, &run.plan, spec, run.names.len());
    let fingerprint = run.first_pass(&mut first, &mut report)?;
    let mut duplicates = first.duplicate_check();
    let stats = std::mem::replace(&mut first.moments, Moments::new(0)).finish();
    let n_train = stats.n;
    let fitted = run.fit(&stats, &first, &mut report);
    let mut artifact = match fitted {
        Ok(a) => a,
        Err(error) => {
            // A duplicate id would be the truer reason for the failure.
            run.check_duplicates(&mut duplicates, &mut report)?;
            return Err(error);
        }
    };
    artifact.profile = Some(Box::new(run.profile(&artifact, &first.sample, n_train)));
    let holdout = first.holdout.take();
    let metrics = run.score(&artifact, holdout, &mut duplicates, &mut report)?;
    let run = pipeline::run_record(pipeline::RunParts {
        run_id,
        started_ms,
        started,
        kind: artifact.kind,
        spec,
        metrics,
        rows_train: n_train as usize,
        rows_validation: first.n_validation as usize,
        data_path: path,
        data_fingerprint: fingerprint,
        feature_names: run.names,
    })?;
    Ok(Trained {
        artifact,
        run,
        report,
    })
}

impl FileRun<'_> {
    /// Pass 1 (statistics, sample, id filter); returns the file's
    /// fingerprint, taken on the way unless the caller gave it.
    fn first_pass(
        &self,
        first: &mut FirstPass<'_>,
        report: &mut RunReport,
    ) -> Result<String, TrainError> {
        let given = self.source.options.fingerprinted.map(|(f, _)| f.to_owned());
        let file = self.source.open()?;
        let reader = match given {
            Some(_) => HashingReader::plain(file),
            None => HashingReader::new(file),
        };
        let path = self.source.path;
        let (pass, reader) = self
            .source
            .pass("statistics", reader, |rows| first.add(rows, path))?;
        let rows = pass.rows;
        report.passes.push(pass);
        if rows == 0 {
            return Err(DataError::Empty {
                path: path.to_owned(),
            }
            .into());
        }
        Ok(given
            .or_else(|| reader.fingerprint())
            .expect("a fingerprint given or taken"))
    }

    /// The model, from pass 1's statistics (and, for a logistic model,
    /// Newton's passes).
    fn fit(
        &self,
        stats: &Summary,
        first: &FirstPass<'_>,
        report: &mut RunReport,
    ) -> Result<ModelArtifact, TrainError> {
        let (n_train, n_validation) = (stats.n as usize, first.n_validation as usize);
        if n_train < MIN_ROWS || n_validation < MIN_ROWS {
            return Err(TrainError::TooFewRows {
                rows: n_train + n_validation,
                train: n_train,
                validation: n_validation,
            });
        }
        let p = self.names.len();
        let kind = pipeline::resolve_kind(self.spec.model, first.non_binary)?;
        let scaler = scaler_of(stats, p);
        let (coefficients, intercept) = match kind {
            ModelKind::Linear => {
                let fit = crate::solve::solve_linear(stats, &self.names)?;
                in_standard_units(&fit, &scaler)
            }
            ModelKind::Logistic => {
                crate::solve::check_constant(stats, p, &self.names)?;
                let (theta, convergence) =
                    newton(&self.source, self.spec, &self.plan, &scaler, p, report)?;
                report.convergence = Some(convergence);
                (theta[..p].to_vec(), theta[p])
            }
            ModelKind::OnnxRegressor | ModelKind::OnnxClassifier => {
                return Err(TrainError::Fit(format!(
                    "{} models are imported, not trained",
                    kind.as_str()
                )))
            }
        };
        let artifact = ModelArtifact {
            kind,
            feature_names: self.names.clone(),
            coefficients,
            intercept,
            scaler: Some(scaler),
            profile: None,
            onnx: None,
        };
        artifact.validate()?;
        Ok(artifact)
    }

    /// A pass that only compares the suspect ids, when there are any.
    fn check_duplicates(
        &self,
        duplicates: &mut DuplicateCheck,
        report: &mut RunReport,
    ) -> Result<(), TrainError> {
        if duplicates.candidates.is_empty() {
            return Ok(());
        }
        let (pass, _) = self
            .source
            .pass("duplicate check", self.source.open()?, |rows| {
                Ok(duplicates.check(rows, rows.user_id()?)?)
            })?;
        report.passes.push(pass);
        Ok(())
    }

    /// The reference profile, from the sample of training rows.
    fn profile(
        &self,
        artifact: &ModelArtifact,
        sample: &Reservoir,
        n_train: u64,
    ) -> ReferenceProfile {
        let p = self.names.len();
        let sample_rows = sample.rows.len() / p.max(1);
        let columns: Vec<Vec<f64>> = (0..p)
            .map(|j| (0..sample_rows).map(|i| sample.rows[i * p + j]).collect())
            .collect();
        let predictions: Vec<f64> = sample
            .rows
            .chunks_exact(p)
            .map(|x| artifact.predict(x))
            .collect();
        let mut profile =
            ReferenceProfile::from_columns(&self.names, &columns, &predictions, DEFAULT_BINS)
                .expect("finite training data and a validated model give finite histograms");
        profile.rows = n_train;
        profile
    }

    /// The holdout's metrics, and the duplicate check: from the rows kept
    /// in memory when they all fit and no id is suspect, else in a last pass.
    fn score(
        &self,
        artifact: &ModelArtifact,
        holdout: Option<Vec<f64>>,
        duplicates: &mut DuplicateCheck,
        report: &mut RunReport,
    ) -> Result<Metrics, TrainError> {
        let p = self.names.len();
        let mut scores = Scoring::new(artifact.kind);
        if let Some(kept) = holdout.filter(|_| duplicates.candidates.is_empty()) {
            for r in kept.chunks_exact(p + 1) {
                scores.add(r[p], artifact.predict(&r[..p]));
            }
            return Ok(scores.finish());
        }
        let (mut raw, mut x) = (vec![0.0; self.source.raw_names.len()], vec![0.0; p]);
        let spec = self.spec;
        let (pass, _) = self.source.pass("scoring", self.source.open()?, |rows| {
            let id = rows.user_id()?;
            duplicates.check(rows, id)?;
            if is_holdout(id, spec.validation_fraction, spec.seed) {
                rows.features_into(&mut raw)?;
                let y = rows.target()?.expect("the target column was checked");
                self.plan.compute_into(&raw, &mut x);
                scores.add(y, artifact.predict(&x));
            }
            Ok(())
        })?;
        report.passes.push(pass);
        Ok(scores.finish())
    }
}

/// Standardising scales: each feature's standard deviation, or 1 for a
/// constant one.
fn scaler_of(stats: &Summary, p: usize) -> Scaler {
    Scaler {
        mean: stats.mean[..p].to_vec(),
        scale: (0..p)
            .map(|j| {
                let sd = stats.sd(j);
                if sd > f64::EPSILON {
                    sd
                } else {
                    1.0
                }
            })
            .collect(),
    }
}

/// A least-squares fit in raw units, in the artifact's standardised units:
/// z = (x − m)/s.
fn in_standard_units(fit: &LinearSolution, scaler: &Scaler) -> (Vec<f64>, f64) {
    let coefficients = fit
        .coefficients
        .iter()
        .zip(&scaler.scale)
        .map(|(b, s)| b * s)
        .collect();
    let intercept = fit.intercept
        + fit
            .coefficients
            .iter()
            .zip(&scaler.mean)
            .map(|(b, m)| b * m)
            .sum::<f64>();
    (coefficients, intercept)
}

/// Newton's method on the regularised logistic loss, one pass per
/// iteration. Returns `θ = [w₁ … w_p, b]` in standardised units.
fn newton(
    source: &Source<'_>,
    spec: &TrainSpec,
    plan: &FeaturePlan,
    scaler: &Scaler,
    p: usize,
    report: &mut RunReport,
) -> Result<(Vec<f64>, Convergence), TrainError> {
    let mut theta = vec![0.0; p + 1];
    // The last point whose loss was accepted, its evaluation, and the
    // direction taken from it.
    let mut accepted: Option<(Vec<f64>, NewtonStep)> = None;
    let mut direction: Vec<f64> = Vec::new();
    let mut step = 1.0;
    let mut iterations = 0u64;
    while iterations < spec.max_iterations {
        iterations += 1;
        let eval = newton_pass(source, spec, plan, scaler, &theta, report)?;
        let gradient = eval.gradient_norm();
        tracing::info!(
            iteration = iterations,
            loss = eval.loss,
            gradient,
            step,
            "logistic fit: Newton iteration"
        );
        if let Some((previous, last)) = &accepted {
            let decreased = eval.loss <= last.loss + 1e-12 * last.loss.abs();
            if !decreased {
                // No decrease: halve the step from the accepted point.
                step *= 0.5;
                if step < 1e-8 {
                    break;
                }
                theta = previous
                    .iter()
                    .zip(&direction)
                    .map(|(t, d)| t + step * d)
                    .collect();
                continue;
            }
        }
        let done = gradient <= NEWTON_TOLERANCE;
        direction = if done { Vec::new() } else { eval.direction()? };
        let tiny = direction
            .iter()
            .zip(&theta)
            .all(|(d, t)| d.abs() <= 1e-13 * (1.0 + t.abs()));
        accepted = Some((theta.clone(), eval));
        if done || tiny {
            break;
        }
        step = 1.0;
        theta = theta.iter().zip(&direction).map(|(t, d)| t + d).collect();
    }
    converged(accepted.map(|(theta, last)| (theta, last, iterations)))
}

/// One Newton pass: the loss, gradient and Hessian at `theta` over the
/// training rows.
fn newton_pass(
    source: &Source<'_>,
    spec: &TrainSpec,
    plan: &FeaturePlan,
    scaler: &Scaler,
    theta: &[f64],
    report: &mut RunReport,
) -> Result<NewtonStep, TrainError> {
    let p = theta.len() - 1;
    let mut eval = NewtonStep::new(p);
    let (mut raw, mut z) = (vec![0.0; source.raw_names.len()], vec![0.0; p]);
    let (pass, _) = source.pass("newton", source.open()?, |rows| {
        let id = rows.user_id()?;
        if !is_holdout(id, spec.validation_fraction, spec.seed) {
            rows.features_into(&mut raw)?;
            let y = rows.target()?.expect("the target column was checked");
            plan.compute_into(&raw, &mut z);
            scaler.transform(&mut z);
            eval.add(&z, y, theta);
        }
        Ok(())
    })?;
    report.passes.push(pass);
    eval.finish(1.0 / LOGISTIC_C, theta);
    Ok(eval)
}

/// The last accepted point when its gradient is small enough, else
/// [`TrainError::NotConverged`].
fn converged(
    accepted: Option<(Vec<f64>, NewtonStep, u64)>,
) -> Result<(Vec<f64>, Convergence), TrainError> {
    let (theta, last, iterations) = accepted.ok_or(TrainError::NotConverged {
        iterations: 0,
        gradient: f64::NAN,
    })?;
    let gradient = last.gradient_norm();
    if !gradient.is_finite() || gradient > pipeline::CONVERGENCE_TOLERANCE {
        return Err(TrainError::NotConverged {
            iterations,
            gradient,
        });
    }
    tracing::info!(
        iterations,
        gradient,
        loss = last.loss,
        "logistic fit converged"
    );
    Ok((
        theta,
        Convergence {
            iterations,
            gradient,
            loss: last.loss,
        },
    ))
}

/// Validation metrics accumulated over the holdout rows.
enum Scoring {
    Regression {
        n: u64,
        sse: f64,
        sae: f64,
        mean: f64,
        m2: f64,
    },
    Classification {
        n: u64,
        correct: u64,
        loss: f64,
        positives: Vec<f64>,
        negatives: Vec<f64>,
    },
}

impl Scoring {
    fn new(kind: ModelKind) -> Self {
        if !kind.is_classifier() {
            Scoring::Regression {
                n: 0,
                sse: 0.0,
                sae: 0.0,
                mean: 0.0,
                m2: 0.0,
            }
        } else {
            Scoring::Classification {
                n: 0,
                correct: 0,
                loss: 0.0,
                positives: Vec::new(),
                negatives: Vec::new(),
            }
        }
    }

    fn add(&mut self, truth: f64, predicted: f64) {
        match self {
            Scoring::Regression {
                n,
                sse,
                sae,
                mean,
                m2,
            } => {
                *n += 1;
                let e = truth - predicted;
                *sse += e * e;
                *sae += e.abs();
                let delta = truth - *mean;
                *mean += delta / *n as f64;
                *m2 += delta * (truth - *mean);
            }
            Scoring::Classification {
                n,
                correct,
                loss,
                positives,
                negatives,
            } => {
                *n += 1;
                if (predicted >= DECISION_THRESHOLD) == (truth == 1.0) {
                    *correct += 1;
                }
                let q = predicted.clamp(1e-15, 1.0 - 1e-15);
                *loss -= if truth == 1.0 { q.ln() } else { (1.0 - q).ln() };
                if truth == 1.0 {
                    positives.push(predicted);
                } else {
                    negatives.push(predicted);
                }
            }
        }
    }

    fn finish(self) -> Metrics {
        match self {
            Scoring::Regression {
                n, sse, sae, m2, ..
            } => {
                let n = n as f64;
                Metrics::regression(
                    (sse / n).sqrt(),
                    sae / n,
                    if m2 > 0.0 { 1.0 - sse / m2 } else { f64::NAN },
                )
            }
            Scoring::Classification {
                n,
                correct,
                loss,
                mut positives,
                mut negatives,
            } => {
                let auc = auc_of_sorted({
                    positives.sort_by(f64::total_cmp);
                    negatives.sort_by(f64::total_cmp);
                    (&positives, &negatives)
                });
                Metrics::classification(correct as f64 / n as f64, loss / n as f64, auc)
            }
        }
    }
}

/// ROC AUC from the sorted scores of the positives and of the negatives:
/// the share of (positive, negative) pairs ranked right, ties counting half
/// (the same figure as [`pipeline::roc_auc`]). NaN when a class is absent.
pub fn auc_of_sorted((positives, negatives): (&[f64], &[f64])) -> f64 {
    if positives.is_empty() || negatives.is_empty() {
        return f64::NAN;
    }
    // For each positive: negatives strictly below it, plus half the equal.
    let (mut below, mut upto) = (0usize, 0usize);
    let mut wins = 0.0;
    for &s in positives {
        while below < negatives.len() && negatives[below] < s {
            below += 1;
        }
        upto = upto.max(below);
        while upto < negatives.len() && negatives[upto] <= s {
            upto += 1;
        }
        wins += below as f64 + 0.5 * (upto - below) as f64;
    }
    wins / (positives.len() as f64 * negatives.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_from_sorted_classes_matches_the_rank_formula() {
        let truth = [0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0];
        let score = [0.1, 0.6, 0.4, 0.9, 0.6, 0.6, 0.2];
        let mut pos: Vec<f64> = truth
            .iter()
            .zip(&score)
            .filter(|(t, _)| **t == 1.0)
            .map(|(_, s)| *s)
            .collect();
        let mut neg: Vec<f64> = truth
            .iter()
            .zip(&score)
            .filter(|(t, _)| **t == 0.0)
            .map(|(_, s)| *s)
            .collect();
        pos.sort_by(f64::total_cmp);
        neg.sort_by(f64::total_cmp);
        let want = pipeline::roc_auc(&truth, &score);
        let got = auc_of_sorted((&pos, &neg));
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        assert!(auc_of_sorted((&[], &[0.5])).is_nan());
    }

    #[test]
    fn the_filter_flags_every_repeat() {
        let mut f = IdFilter::for_file(1 << 20);
        for i in 0..1000 {
            f.insert(IdFilter::hash(&format!("id-{i}")));
        }
        f.insert(IdFilter::hash("id-17"));
        assert!(f.candidates.contains(&IdFilter::hash("id-17")));
        assert!(f.candidates.len() < 5, "{}", f.candidates.len());
    }
}
