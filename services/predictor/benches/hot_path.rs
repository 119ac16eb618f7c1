//! The predictor's hot path without the network: request decode, feature
//! lookup with derived features, the model's arithmetic, reply encode, and
//! the whole `ServingState::predict` + encode for one user and for a batch.
//!
//! `cargo bench -p predictor --bench hot_path`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ml_shared::data::parse_csv;
use ml_shared::features::{FeatureRegistry, FeatureStore};
use ml_shared::messages::{ModelRelease, PredictRequest};
use ml_shared::model::{ModelArtifact, ModelKind};
use predictor::serving::ServingState;

fn state() -> (ServingState, Vec<String>) {
    let mut csv = Vec::new();
    ml_shared::gen::write_csv(&mut csv, 5000, 42).expect("in memory");
    let registry = FeatureRegistry::default();
    let data = parse_csv("bench.csv".as_ref(), &csv, registry.raw_names()).expect("valid data");
    let ids = data.user_ids.clone();
    let state = ServingState::new(registry, FeatureStore::from_dataset(&data));
    let release = ModelRelease {
        version: 1,
        epoch: 1,
        registry_id: "bench".into(),
        artifact: ModelArtifact {
            kind: ModelKind::Linear,
            feature_names: vec!["feature_1".into(), "feature_2".into(), "feature_3".into()],
            coefficients: vec![2.5, -1.25, 0.8],
            intercept: 3.0,
            scaler: None,
            profile: None,
            onnx: None,
        },
        routing: None,
    };
    state.install(state.prepare(release).expect("valid model"));
    (state, ids)
}

fn hot_path(c: &mut Criterion) {
    let (state, ids) = state();
    let single = format!(r#"{{"user_id":"{}"}}"#, ids[1234]);
    let batch = serde_json::json!({ "user_ids": &ids[..1000] }).to_string();

    c.bench_function("decode request", |b| {
        b.iter(|| {
            serde_json::from_slice::<PredictRequest>(black_box(single.as_bytes())).expect("valid")
        })
    });

    let registry = FeatureRegistry::default();
    let mut csv = Vec::new();
    ml_shared::gen::write_csv(&mut csv, 5000, 42).expect("in memory");
    let data = parse_csv("bench.csv".as_ref(), &csv, registry.raw_names()).expect("valid data");
    let store = FeatureStore::from_dataset(&data);
    let names: Vec<String> = registry.names().map(str::to_owned).collect();
    let plan = registry.plan(&names).expect("known features");
    c.bench_function("feature lookup + derived features", |b| {
        let mut x = [0.0; 3];
        b.iter(|| {
            let raw = store.raw(black_box(&ids[1234])).expect("known user");
            plan.compute_into(raw, &mut x);
            x
        })
    });

    let model = state.model().expect("installed");
    c.bench_function("predict (dot product)", |b| {
        b.iter(|| {
            model
                .production
                .artifact
                .predict(black_box(&[0.3, 1.5, 0.09]))
        })
    });

    let answer = state.predict(single.as_bytes()).expect("known user");
    c.bench_function("encode reply", |b| {
        b.iter(|| serde_json::to_vec(black_box(&answer)).expect("serialisable"))
    });

    c.bench_function("request to reply bytes (one user)", |b| {
        b.iter(|| {
            let answer = state
                .predict(black_box(single.as_bytes()))
                .expect("known user");
            serde_json::to_vec(&answer).expect("serialisable")
        })
    });

    let mut group = c.benchmark_group("batch");
    group.throughput(Throughput::Elements(1000));
    group.bench_function("request to reply bytes (1000 users)", |b| {
        b.iter(|| {
            let answer = state
                .predict(black_box(batch.as_bytes()))
                .expect("known users");
            serde_json::to_vec(&answer).expect("serialisable")
        })
    });
    group.finish();
}

// The macro generates an undocumented public function.
#[allow(missing_docs)]
mod group {
    use super::*;
    criterion_group!(benches, hot_path);
}
criterion_main!(group::benches);
