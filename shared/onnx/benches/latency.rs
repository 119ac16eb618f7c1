//! Per-row and batch latency of the engine on the tree models of the fixtures
//! (`scripts/onnx-fixtures.py`, generated into a temporary directory), and
//! onnxruntime's on the same files for comparison (timed by python3 with the
//! packages of `scripts/ci-python-deps.sh`). Needs a quiet machine to mean
//! anything: `cargo bench -p ml-onnx`.

use criterion::{criterion_main, BenchmarkId, Criterion};
use ml_onnx::{Limits, OnnxModel};
use std::path::Path;
use std::process::Command;

const MODELS: [&str; 2] = ["gradient_boosting", "random_forest"];

/// onnxruntime's median latency for one row and for a batch of 200, in µs.
const ORT_TIMING: &str = r#"
import sys, time, numpy as np, onnxruntime as ort
path = sys.argv[1]
sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
name = sess.get_inputs()[0].name
rng = np.random.default_rng(1)
for n in (1, 200):
    x = rng.normal(size=(n, 3)).astype(np.float32)
    times = []
    for _ in range(2000 if n == 1 else 200):
        t = time.perf_counter(); sess.run(None, {name: x}); times.append(time.perf_counter() - t)
    print(f"onnxruntime {path.rsplit('/', 1)[-1]} {n} row(s): median {np.median(times) * 1e6:.1f} us")
"#;

fn fixtures(dir: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/onnx-fixtures.py");
    let status = Command::new("python3")
        .arg(script)
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("python3 runs (scripts/ci-python-deps.sh installs its packages)");
    assert!(
        status.success(),
        "onnx-fixtures.py failed: see scripts/ci-python-deps.sh"
    );
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    fixtures(dir.path());
    let mut group = c.benchmark_group("onnx_predict");
    for name in MODELS {
        let path = dir.path().join(format!("{name}.onnx"));
        let model = OnnxModel::load(&std::fs::read(&path).unwrap(), &Limits::new(3)).unwrap();
        for n in [1usize, 200] {
            let rows: Vec<f64> = (0..n * 3)
                .map(|i| ((i * 37 % 101) as f64) / 25.0 - 2.0)
                .collect();
            group.bench_with_input(BenchmarkId::new(name, n), &rows, |b, rows| {
                b.iter(|| model.predict(rows, n).unwrap())
            });
        }
        let out = Command::new("python3")
            .arg("-c")
            .arg(ORT_TIMING)
            .arg(&path)
            .output();
        match out {
            Ok(out) => print!("{}", String::from_utf8_lossy(&out.stdout)),
            Err(e) => println!("onnxruntime timing skipped: {e}"),
        }
    }
    group.finish();
}

#[allow(missing_docs)]
mod group {
    // criterion's macro writes a function without documentation.
    criterion::criterion_group!(benches, super::bench);
}
criterion_main!(group::benches);
