//! Training cost, on the generated data (`feature_3 = feature_1²`):
//!
//! - `fit linear`: the design matrix through the feature store plus
//!   `linfa_linear::LinearRegression::fit` (the in-memory path), on 10⁴, 10⁵
//!   and 10⁶ rows;
//! - `fit streaming`: the streaming path's statistics and solve
//!   ([`trainer::solve::Moments`], [`trainer::solve::solve_linear`]) on the
//!   same 10⁶ × 3 matrix already in memory, as scikit-learn's
//!   `LinearRegression.fit(X, y)` is timed in `bench/trainer.sh`;
//! - `parse`: reading 10⁶ rows with [`ml_shared::data::RowReader`]
//!   (features and target parsed), throughput in bytes;
//! - `file to model`: [`trainer::stream::train_file`] on a 10⁶-row file:
//!   fingerprint, statistics pass, solve, profile, scoring pass.
//!
//! `cargo bench -p trainer --bench fit`

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use linfa::traits::Fit;
use linfa::Dataset;
use linfa_linear::LinearRegression;
use ml_shared::data::{parse_csv, RowReader};
use ml_shared::features::FeatureRegistry;
use ndarray::Array1;
use trainer::pipeline::{ModelChoice, TrainSpec};
use trainer::solve::{solve_linear, Moments};

fn fit(c: &mut Criterion) {
    let registry = FeatureRegistry::default();
    let names: Vec<String> = registry.names().map(str::to_owned).collect();
    let mut group = c.benchmark_group("fit linear");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    for rows in [10_000usize, 100_000, 1_000_000] {
        let mut csv = Vec::new();
        ml_shared::gen::write_csv(&mut csv, rows, 42).expect("in memory");
        let data = parse_csv("bench.csv".as_ref(), &csv, registry.raw_names()).expect("valid data");
        let all: Vec<usize> = (0..rows).collect();
        let targets: Array1<f64> = data.targets.clone().expect("target column").into();
        group.throughput(Throughput::Elements(rows as u64));
        group.bench_with_input(BenchmarkId::from_parameter(rows), &rows, |b, _| {
            b.iter(|| {
                let x = trainer::pipeline::design_matrix(&data, &registry, &names, &all)
                    .expect("features");
                LinearRegression::new()
                    .fit(&Dataset::new(x, targets.clone()))
                    .map(|m| black_box(m.intercept()))
                    .expect("fit")
            })
        });
    }
    group.finish();
}

fn streaming(c: &mut Criterion) {
    let registry = FeatureRegistry::default();
    let names: Vec<String> = registry.names().map(str::to_owned).collect();
    let rows = 1_000_000usize;
    let mut csv = Vec::new();
    ml_shared::gen::write_csv(&mut csv, rows, 42).expect("in memory");
    let data = parse_csv("bench.csv".as_ref(), &csv, registry.raw_names()).expect("valid data");
    let all: Vec<usize> = (0..rows).collect();
    let x = trainer::pipeline::design_matrix(&data, &registry, &names, &all).expect("features");
    let y = data.targets.clone().expect("target column");

    let mut group = c.benchmark_group("fit streaming");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(10))
        .throughput(Throughput::Elements(rows as u64));
    group.bench_function(BenchmarkId::from_parameter(rows), |b| {
        b.iter(|| {
            let mut moments = Moments::new(4);
            let mut row = [0.0; 4];
            for (features, target) in x.rows().into_iter().zip(&y) {
                row[..3].copy_from_slice(features.as_slice().expect("contiguous"));
                row[3] = *target;
                moments.push(&row);
            }
            black_box(solve_linear(&moments.finish(), &names).expect("solvable"))
        })
    });
    group.finish();

    let mut group = c.benchmark_group("parse");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10))
        .throughput(Throughput::Bytes(csv.len() as u64));
    group.bench_function(BenchmarkId::from_parameter(rows), |b| {
        b.iter(|| {
            let mut reader =
                RowReader::new("bench.csv".as_ref(), csv.as_slice(), registry.raw_names())
                    .expect("header");
            let mut raw = [0.0; 2];
            let mut sum = 0.0;
            while reader.advance().expect("row") {
                black_box(reader.user_id().expect("id"));
                reader.features_into(&mut raw).expect("features");
                sum += raw[0] + reader.target().expect("target").unwrap_or(0.0);
            }
            black_box(sum)
        })
    });
    group.finish();

    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("rows.csv");
    std::fs::write(&path, &csv).expect("write data");
    let spec = TrainSpec {
        model: ModelChoice::Linear,
        ..TrainSpec::default()
    };
    let mut group = c.benchmark_group("file to model");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(15))
        .throughput(Throughput::Elements(rows as u64));
    group.bench_function(BenchmarkId::from_parameter(rows), |b| {
        b.iter(|| {
            black_box(
                trainer::stream::train_file(
                    &path,
                    &registry,
                    &spec,
                    "bench".into(),
                    Default::default(),
                )
                .expect("trained"),
            )
        })
    });
    group.finish();
}

// The macro generates an undocumented public function.
#[allow(missing_docs)]
mod group {
    use super::*;
    criterion_group!(benches, fit, streaming);
}
criterion_main!(group::benches);
