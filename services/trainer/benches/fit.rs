//! Training cost: building the design matrix through the feature store and
//! fitting `linfa_linear::LinearRegression`, on 10⁴, 10⁵ and 10⁶ rows (the
//! same steps as `pipeline::train`, without reading the CSV).
//!
//! `cargo bench -p trainer --bench fit`

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use linfa::traits::Fit;
use linfa::Dataset;
use linfa_linear::LinearRegression;
use ml_shared::data::parse_csv;
use ml_shared::features::FeatureRegistry;
use ndarray::Array1;

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

// The macro generates an undocumented public function.
#[allow(missing_docs)]
mod group {
    use super::*;
    criterion_group!(benches, fit);
}
criterion_main!(group::benches);
