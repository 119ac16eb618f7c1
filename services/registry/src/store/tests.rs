//! Unit tests of the store on real files in temporary directories.

use std::fs::OpenOptions;
use std::io::Write;

use ml_shared::messages::{Metrics, TrainParams};
use ml_shared::model::ModelKind;

use super::*;

thread_local! {
    /// Each registered model with the metrics its submission claimed.
    static CLAIMED: std::cell::RefCell<Vec<(ModelArtifact, Metrics)>> = Default::default();
}

/// Registers `s` with an evaluation that gives each model the metrics its
/// submission claimed: these tests are of the store's bookkeeping; the
/// registry's own evaluation is tested on real data elsewhere.
fn register(store: &mut Store, s: Submission) -> Result<Registered, StoreError> {
    CLAIMED.with(|c| c.borrow_mut().push((s.artifact.clone(), s.run.metrics)));
    store.register(s, &mut |artifact| {
        CLAIMED.with(|c| {
            c.borrow()
                .iter()
                .rev()
                .find(|(a, _)| a == artifact)
                .map(|(_, m)| *m)
                .ok_or_else(|| StoreError::Invalid("not submitted".into()))
        })
    })
}

fn submission_with(intercept: f64, kind: ModelKind, metrics: Metrics) -> Submission {
    let names: Vec<String> = vec!["feature_1".into(), "feature_3".into()];
    Submission {
        run: RunRecord {
            run_id: format!("run-{intercept}"),
            started_ms: 0,
            duration_ms: 3,
            params: TrainParams {
                model: kind.as_str().into(),
                seed: 1,
                validation_fraction: 0.2,
            },
            metrics,
            rows_train: 8,
            rows_validation: 2,
            data_path: "d.csv".into(),
            data_fingerprint: "sha256:00".into(),
            feature_names: names.clone(),
        },
        artifact: ModelArtifact {
            kind,
            feature_names: names,
            coefficients: vec![1.0, 2.0],
            intercept,
            scaler: None,
            profile: None,
            onnx: None,
        },
    }
}

fn submission(intercept: f64) -> Submission {
    submission_rmse(intercept, 0.1)
}

fn submission_rmse(intercept: f64, rmse: f64) -> Submission {
    submission_with(
        intercept,
        ModelKind::Linear,
        Metrics::regression(rmse, 0.08, 0.99),
    )
}

fn open(dir: &Path) -> Store {
    Store::open(dir, 0.05).unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn versions_survive_a_restart_and_are_never_reused() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    assert_eq!(register(&mut store, submission(1.0)).unwrap().version, 1);
    assert_eq!(register(&mut store, submission(2.0)).unwrap().version, 2);
    drop(store);

    let mut store = open(dir.path());
    let release = store.production_release().unwrap();
    assert_eq!((release.version, release.epoch), (2, 2));
    assert_eq!(release.artifact.intercept, 2.0);
    assert_eq!(store.runs().unwrap().len(), 2);
    assert_eq!(register(&mut store, submission(3.0)).unwrap().version, 3);
    assert_eq!(store.models().models[2].parent, Some(2));
}

#[test]
fn the_gate_holds_a_worse_model_as_candidate_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    let first = register(&mut store, submission_rmse(1.0, 0.10)).unwrap();
    assert!(first.production && first.gate.promoted);
    let worse = register(&mut store, submission_rmse(2.0, 0.20)).unwrap();
    assert!(!worse.production, "{:?}", worse.gate);
    assert_eq!(worse.gate.production, Some(0.10));
    assert_eq!(worse.gate.tolerance, 0.05);
    let near = register(&mut store, submission_rmse(3.0, 0.104)).unwrap();
    assert!(near.production, "within 5%: {:?}", near.gate);

    let models = store.models();
    assert_eq!(models.production, Some(3));
    assert_eq!(models.aliases["candidate"], 3);
    assert_eq!(models.models[1].aliases, Vec::<String>::new());
    let runs = store.runs().unwrap();
    let statuses: Vec<&str> = runs.iter().map(|r| r.status.as_str()).collect();
    assert_eq!(statuses, ["production", "candidate", "production"]);
    assert!(
        runs[1].reason.contains("beyond the 5.00% tolerance"),
        "{}",
        runs[1].reason
    );
    assert_eq!(runs[1].parent, Some(1));

    let history = store.history(None).unwrap();
    let moves: Vec<(Alias, Option<u64>, u64, MoveAction)> = history
        .iter()
        .map(|m| (m.alias, m.from, m.to, m.action))
        .collect();
    assert_eq!(
        moves,
        [
            (Alias::Candidate, None, 1, MoveAction::Register),
            (Alias::Production, None, 1, MoveAction::Gate),
            (Alias::Candidate, Some(1), 2, MoveAction::Register),
            (Alias::Candidate, Some(2), 3, MoveAction::Register),
            (Alias::Production, Some(1), 3, MoveAction::Gate),
        ]
    );
    assert_eq!(history[4].epoch, Some(2));
    assert_eq!(history[4].actor, REGISTRY_ACTOR);
    assert_eq!(store.history(Some(2)).unwrap()[0].seq, 4);
}

#[test]
fn promote_and_rollback_move_production_with_new_epochs_and_survive_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    for i in 1..=3 {
        register(&mut store, submission(i as f64)).unwrap();
    }
    assert_eq!(store.production_release().unwrap().epoch, 3);
    let r = store.rollback("v3 misbehaves", "alice").unwrap();
    assert_eq!((r.from, r.to, r.epoch, r.moved), (Some(3), 2, 4, true));
    let r = store.rollback("v2 too", "alice").unwrap();
    assert_eq!((r.from, r.to, r.epoch), (Some(2), 1, 5));
    assert!(matches!(
        store.rollback("again", "alice"),
        Err(StoreError::NoPrevious)
    ));
    let r = store.promote(3, "fixed upstream", "bob").unwrap();
    assert_eq!((r.from, r.to, r.epoch), (Some(1), 3, 6));
    let again = store.promote(3, "twice", "bob").unwrap();
    assert!(!again.moved);
    assert!(matches!(
        store.promote(9, "nope", "bob"),
        Err(StoreError::UnknownVersion(9))
    ));
    assert!(matches!(
        store.promote(2, " ", "bob"),
        Err(StoreError::Invalid(_))
    ));
    drop(store);

    let mut store = open(dir.path());
    let release = store.production_release().unwrap();
    assert_eq!((release.version, release.epoch), (3, 6));
    let r = store.rollback("back", "carol").unwrap();
    assert_eq!((r.to, r.epoch), (1, 7), "the stack survived the restart");
    let last = store.history(Some(1)).unwrap().remove(0);
    assert_eq!(
        (last.actor.as_str(), last.reason.as_str(), last.action),
        ("carol", "back", MoveAction::Rollback)
    );
}

#[test]
fn moves_the_pointer_missed_are_replayed_from_the_history() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    register(&mut store, submission(1.0)).unwrap();
    register(&mut store, submission(2.0)).unwrap();
    let pointer = fs::read(dir.path().join(PRODUCTION)).unwrap();
    store.rollback("r", "alice").unwrap();
    register(&mut store, submission(3.0)).unwrap();
    let expected = store.production_release().unwrap();
    drop(store);
    // As if the registry died after each history append, before the pointer.
    fs::write(dir.path().join(PRODUCTION), pointer).unwrap();
    let store = open(dir.path());
    assert_eq!(store.production_release().unwrap(), expected);
    assert_eq!(store.alias(Alias::Candidate), Some(3));
    let p: Pointer =
        serde_json::from_slice(&fs::read(dir.path().join(PRODUCTION)).unwrap()).unwrap();
    assert_eq!(p.seq, store.history(None).unwrap().len() as u64);
}

#[test]
fn a_torn_log_line_is_cut_and_a_corrupt_artifact_is_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    register(&mut store, submission(1.0)).unwrap();
    register(&mut store, submission(2.0)).unwrap();
    drop(store);
    let log = dir.path().join(EXPERIMENTS);
    let mut f = OpenOptions::new().append(true).open(&log).unwrap();
    f.write_all(b"2026-01-01T00:00:00Z,3,run-x,lin").unwrap();
    let history = dir.path().join(HISTORY);
    let mut f = OpenOptions::new().append(true).open(&history).unwrap();
    f.write_all(br#"{"seq":5,"timest"#).unwrap();
    let artifact = dir.path().join(model_file(2));
    let mut bytes = fs::read(&artifact).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    fs::write(&artifact, bytes).unwrap();

    let mut store = open(dir.path());
    assert_eq!(store.runs().unwrap().len(), 2);
    assert!(fs::read(&log).unwrap().ends_with(b"\n"));
    assert!(store.corrupt().contains_key(&2));
    assert_eq!(store.models().corrupt[0].version, 2);
    let release = store.production_release().unwrap();
    assert_eq!((release.version, release.epoch), (1, 3), "a new epoch");
    let recovery = store.history(Some(1)).unwrap().remove(0);
    assert_eq!(recovery.action, MoveAction::Recovery);
    assert!(recovery.reason.contains("checksum"), "{}", recovery.reason);
    assert!(matches!(
        store.promote(2, "try", "alice"),
        Err(StoreError::Corrupt { version: 2, .. })
    ));
    assert_eq!(
        register(&mut store, submission(3.0)).unwrap().version,
        3,
        "2 is not reused"
    );
}

#[test]
fn an_artifact_damaged_while_running_is_caught_before_it_is_served_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    register(&mut store, submission(1.0)).unwrap();
    register(&mut store, submission(2.0)).unwrap();
    let artifact = dir.path().join(model_file(1));
    let mut bytes = fs::read(&artifact).unwrap();
    bytes[60] ^= 1;
    fs::write(&artifact, bytes).unwrap();
    let err = store.rollback("r", "alice").unwrap_err();
    assert!(
        matches!(err, StoreError::Corrupt { version: 1, .. }),
        "{err}"
    );
    assert_eq!(store.production_release().unwrap().version, 2);
    assert!(store.corrupt().contains_key(&1));
}

#[test]
fn invalid_models_are_refused_and_consume_no_version() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    let mut bad = submission(1.0);
    bad.artifact.coefficients[0] = f64::NAN;
    assert!(matches!(
        register(&mut store, bad),
        Err(StoreError::InvalidModel(_))
    ));
    let nan_metrics = submission_rmse(1.0, f64::NAN);
    assert!(matches!(
        register(&mut store, nan_metrics),
        Err(StoreError::Invalid(_))
    ));
    let wrong_family =
        submission_with(1.0, ModelKind::Logistic, Metrics::regression(0.1, 0.1, 0.9));
    assert!(matches!(
        register(&mut store, wrong_family),
        Err(StoreError::Invalid(_))
    ));
    assert_eq!(register(&mut store, submission(1.0)).unwrap().version, 1);
}

#[test]
fn failed_runs_are_logged_with_their_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    register(&mut store, submission(1.0)).unwrap();
    let failed = FailedRun {
        run_id: "run-f".into(),
        started_ms: 0,
        duration_ms: 4,
        params: TrainParams {
            model: "linear".into(),
            seed: 42,
            validation_fraction: 0.2,
        },
        data_path: "d.csv".into(),
        data_fingerprint: None,
        reason: "d.csv:3: feature_2: \"oops\" is not a number".into(),
    };
    store.record_failure(&failed).unwrap();
    // A report sent again (its reply lost) is acknowledged, not logged twice,
    // before and after a restart.
    store.record_failure(&failed).unwrap();
    drop(store);
    let mut store = open(dir.path());
    store.record_failure(&failed).unwrap();
    let runs = store.runs().unwrap();
    assert_eq!(runs.len(), 2);
    let failed = &runs[1];
    assert_eq!(
        (failed.status.as_str(), failed.version, failed.rmse),
        ("failed", None, None)
    );
    assert!(failed.reason.contains("oops"), "{failed:?}");
    assert_eq!(store.models().models.len(), 1);
}

#[test]
fn a_classifier_is_gated_on_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    let c = |acc| {
        submission_with(
            acc,
            ModelKind::Logistic,
            Metrics::classification(acc, 0.4, 0.9),
        )
    };
    assert!(register(&mut store, c(0.80)).unwrap().production);
    let worse = register(&mut store, c(0.70)).unwrap();
    assert!(!worse.production);
    assert_eq!(worse.gate.metric, "accuracy");
    assert!(register(&mut store, c(0.79)).unwrap().production);
    let runs = store.runs().unwrap();
    assert_eq!(runs[0].accuracy, Some(0.80));
    assert_eq!(runs[0].rmse, None);
}

#[test]
fn a_row_missing_after_a_crash_is_restored_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    register(&mut store, submission_rmse(1.0, 0.1)).unwrap();
    register(&mut store, submission_rmse(2.0, 0.5)).unwrap();
    drop(store);
    let log = dir.path().join(EXPERIMENTS);
    let text = fs::read_to_string(&log).unwrap();
    let kept: Vec<&str> = text.lines().take(2).collect();
    fs::write(&log, format!("{}\n", kept.join("\n"))).unwrap();
    let store = open(dir.path());
    let runs = store.runs().unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(
        (runs[1].version, runs[1].status.as_str()),
        (Some(2), "candidate")
    );
    assert!(
        runs[1].reason.contains("kept as candidate"),
        "{:?}",
        runs[1]
    );
}

#[test]
fn a_directory_written_by_the_previous_format_opens_and_grows() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1");
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture, dir.path());
    let mut store = open(dir.path());
    assert!(store.corrupt().is_empty(), "{:?}", store.corrupt());
    let models = store.models();
    assert_eq!(models.models.len(), 2);
    assert_eq!(models.production, Some(2));
    assert!(models.models[0].metrics.rmse.is_some());
    let release = store.production_release().unwrap();
    assert_eq!((release.version, release.epoch), (2, 2));
    assert_eq!(release.artifact.scaler, None);
    let runs = store.runs().unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0].status, "production");
    let text = fs::read_to_string(dir.path().join(EXPERIMENTS)).unwrap();
    assert!(text.starts_with(std::str::from_utf8(&csv_header()).unwrap()));

    let r = register(&mut store, submission(5.0)).unwrap();
    assert_eq!((r.version, r.gate.production_version), (3, Some(2)));
    let r = store.promote(1, "old is gold", "alice").unwrap();
    assert_eq!((r.from, r.to, r.moved), (Some(2), 1, true));
    assert_eq!(r.epoch, 3, "the old pointer's epoch carries on");
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.runs().unwrap().len(), 3);
    assert_eq!(store.alias(Alias::Production), Some(1));
}

#[test]
fn a_directory_with_only_a_production_pointer_opens() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join(PRODUCTION), br#"{"version":4,"epoch":7}"#).unwrap();
    let mut store = open(dir.path());
    assert_eq!(store.production_release(), None);
    assert_eq!(store.models().production, None);
    let r = register(&mut store, submission(1.0)).unwrap();
    assert_eq!(r.version, 5, "4 was named once: never reused");
    let release = store.production_release().unwrap();
    assert_eq!((release.version, release.epoch), (5, 8));
}

#[test]
fn a_torn_last_history_line_that_production_json_holds_is_restored_not_lost() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    register(&mut store, submission(1.0)).unwrap();
    register(&mut store, submission(2.0)).unwrap();
    store.promote(1, "back to one", "alice").unwrap();
    let acknowledged = store.production_epoch();
    drop(store);
    // The history's last line torn after production.json was written.
    let path = dir.path().join(HISTORY);
    let text = std::fs::read(&path).unwrap();
    std::fs::write(&path, &text[..text.len() - 7]).unwrap();

    let mut store = open(dir.path());
    assert_eq!(store.alias(Alias::Production), Some(1));
    assert_eq!(store.production_epoch(), acknowledged);
    let moves = store.history(None).unwrap();
    let last = moves.last().unwrap();
    assert_eq!(
        (last.action, last.to, last.epoch),
        (MoveAction::Recovery, 1, Some(acknowledged))
    );
    assert!(last.reason.contains("lost in a crash"), "{last:?}");
    // The next move follows on, and the directory opens again.
    let next = store.promote(2, "forward", "alice").unwrap();
    assert_eq!(next.epoch, acknowledged + 1);
    drop(store);
    let store = open(dir.path());
    let moves = store.history(None).unwrap();
    for (i, m) in moves.iter().enumerate() {
        assert_eq!(m.seq, i as u64 + 1, "{moves:?}");
    }
    assert_eq!(store.alias(Alias::Production), Some(2));
}

#[test]
fn the_identity_is_kept_and_a_fresh_directory_gets_another() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let first = open(a.path()).id().to_owned();
    assert_eq!(open(a.path()).id(), first);
    assert_ne!(open(b.path()).id(), first);
    let mut store = open(a.path());
    register(&mut store, submission(1.0)).unwrap();
    assert_eq!(store.production_release().unwrap().registry_id, first);
}

#[test]
fn an_epoch_seen_beyond_the_directory_is_passed_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    register(&mut store, submission(1.0)).unwrap();
    assert!(!store.fast_forward(0, Some(1)).unwrap(), "nothing to do");
    assert!(store.fast_forward(9, Some(4)).unwrap());
    assert_eq!(store.production_epoch(), 10);
    let last = store.history(None).unwrap().pop().unwrap();
    assert_eq!((last.action, last.epoch), (MoveAction::Recovery, Some(10)));
    drop(store);
    assert_eq!(open(dir.path()).production_epoch(), 10);
}

fn set_table(candidates: &[(u64, u32)], shadow: Option<(u64, u32)>) -> RouteAction {
    use ml_shared::routing::Weighted;
    RouteAction::Set(RouteTable {
        candidates: candidates
            .iter()
            .map(|&(version, percent)| Weighted { version, percent })
            .collect(),
        shadow: shadow.map(|(version, percent)| Weighted { version, percent }),
        sticky: true,
    })
}

fn route_problem(store: &mut Store, action: RouteAction) -> RouteProblem {
    match store.route(action, Some("try"), "alice") {
        Err(StoreError::Route(e)) => e.problem,
        other => panic!("refused, not {other:?}"),
    }
}

#[test]
fn routing_tables_are_checked_committed_replayed_and_cleared_by_a_promotion() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    assert_eq!(
        route_problem(&mut store, set_table(&[(1, 10)], None)),
        RouteProblem::NoProduction
    );
    register(&mut store, submission(1.0)).unwrap();
    for intercept in [2.0, 3.0, 4.0] {
        let r = register(&mut store, submission_rmse(intercept, 0.5)).unwrap();
        assert!(!r.production);
    }
    let epoch = store.production_epoch();
    let pointer_before = fs::read(dir.path().join(PRODUCTION)).unwrap();

    let reply = store
        .route(
            set_table(&[(2, 10)], Some((3, 20))),
            Some("canary"),
            "alice",
        )
        .unwrap();
    assert!(reply.changed);
    assert_eq!((reply.production, reply.epoch), (Some(1), epoch + 1));
    let in_force = RouteReply {
        changed: false,
        ..reply.clone()
    };
    let release = store.production_release().unwrap();
    let routing = release.routing.expect("the table goes with the release");
    assert_eq!(
        routing.models.iter().map(|m| m.version).collect::<Vec<_>>(),
        [2, 3]
    );
    let line = store.history(Some(1)).unwrap().remove(0);
    assert_eq!(
        (
            line.kind,
            line.action,
            line.actor.as_str(),
            line.reason.as_str()
        ),
        (MoveKind::Route, MoveAction::RouteSet, "alice", "canary")
    );
    assert_eq!(line.route.as_ref(), reply.table.as_ref());
    // The same table again changes nothing: no line, no epoch.
    let lines = store.history(None).unwrap().len();
    let again = store
        .route(set_table(&[(2, 10)], Some((3, 20))), None, "alice")
        .unwrap();
    assert!(!again.changed);
    assert_eq!(again.epoch, reply.epoch);
    assert_eq!(store.history(None).unwrap().len(), lines);

    // Refused tables change nothing.
    let seq = store.history(None).unwrap().len();
    assert_eq!(
        route_problem(&mut store, set_table(&[(1, 10)], None)),
        RouteProblem::IsProduction
    );
    assert_eq!(
        route_problem(&mut store, set_table(&[(2, 10)], Some((1, 5)))),
        RouteProblem::IsProduction
    );
    assert_eq!(
        route_problem(&mut store, set_table(&[(99, 10)], None)),
        RouteProblem::UnknownVersion
    );
    let artifact = dir.path().join(model_file(4));
    let mut bytes = fs::read(&artifact).unwrap();
    bytes[60] ^= 0x01;
    fs::write(&artifact, bytes).unwrap();
    assert_eq!(
        route_problem(&mut store, set_table(&[(4, 10)], None)),
        RouteProblem::CorruptVersion
    );
    assert_eq!(store.history(None).unwrap().len(), seq);
    assert_eq!(store.route_state(false), in_force);

    // A crash between the history line and the pointer: replayed.
    drop(store);
    let pointer_after = fs::read(dir.path().join(PRODUCTION)).unwrap();
    fs::write(dir.path().join(PRODUCTION), &pointer_before).unwrap();
    let mut store = open(dir.path());
    assert_eq!(store.route_state(false), in_force);
    assert_eq!(
        fs::read(dir.path().join(PRODUCTION)).unwrap(),
        pointer_after
    );

    // A promotion clears the table, and says so.
    let moved = store.promote(2, "canary good", "alice").unwrap();
    assert!(moved.route_cleared && moved.moved);
    assert_eq!(moved.epoch, reply.epoch + 1);
    assert_eq!(store.route_state(false).table, None);
    assert!(store.production_release().unwrap().routing.is_none());
    let line = store.history(Some(1)).unwrap().remove(0);
    assert!(line.route_cleared && line.kind == MoveKind::Alias);
    drop(store);
    let mut store = open(dir.path());
    assert_eq!(store.route_state(false).table, None, "after a restart too");

    // A clear is recorded; a clear of nothing is not.
    store
        .route(set_table(&[(3, 5)], None), None, "bob")
        .unwrap();
    let cleared = store.route(RouteAction::Clear, None, "bob").unwrap();
    assert!(cleared.changed && cleared.table.is_none());
    let line = store.history(Some(1)).unwrap().remove(0);
    assert_eq!((line.action, line.route), (MoveAction::RouteClear, None));
    assert!(
        !store
            .route(RouteAction::Clear, None, "bob")
            .unwrap()
            .changed
    );
}

#[test]
fn a_table_naming_a_version_that_cannot_be_served_is_cleared_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    register(&mut store, submission(1.0)).unwrap();
    register(&mut store, submission_rmse(2.0, 0.5)).unwrap();
    store
        .route(set_table(&[(2, 10)], None), None, "alice")
        .unwrap();
    let epoch = store.production_epoch();
    drop(store);
    fs::remove_file(dir.path().join(model_file(2))).unwrap();
    let store = open(dir.path());
    assert_eq!(store.route_state(false).table, None);
    assert_eq!(store.production_epoch(), epoch + 1);
    let line = store.history(Some(1)).unwrap().remove(0);
    assert_eq!(
        (line.action, line.actor.as_str()),
        (MoveAction::RouteClear, REGISTRY_ACTOR)
    );
}
