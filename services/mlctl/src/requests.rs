//! The commands that are one request to the platform (or a few, for a
//! paged listing): each builds its request, sends it, and prints the reply
//! as a table or, with `--json`, as received. An error reply is printed on
//! stderr and makes the exit code a failure.

use std::process::ExitCode;

use async_nats::Client;
use ml_shared::lifecycle::{
    HistoryReply, HistoryRequest, MoveReply, PromoteRequest, RollbackRequest, RouteReply,
    RouteRequest,
};
use ml_shared::messages::{
    BatchPredictReply, ModelsReply, PredictReply, PredictRequest, RunsReply,
};
use ml_shared::subjects::Subjects;

use crate::registry_view::{self, Sort};
use crate::{all_runs, print_reply, request_json, train, with_reply, Command};

/// Runs a request command on `client`.
pub async fn run(
    client: &Client,
    subjects: &Subjects,
    command: Command,
) -> anyhow::Result<ExitCode> {
    match command {
        Command::Predict {
            user_ids,
            features,
            routing_key,
        } => predict(client, subjects, user_ids, features, routing_key).await,
        Command::Models { json } => models(client, subjects, json).await,
        Command::Runs {
            json,
            filters,
            sort,
            desc,
        } => runs(client, subjects, json, &filters, sort, desc).await,
        Command::Promote {
            version,
            reason,
            actor,
        } => {
            let request = PromoteRequest {
                version,
                reason,
                actor,
            };
            move_production(client, &subjects.registry_promote, &request).await
        }
        Command::Rollback { reason, actor } => {
            let request = RollbackRequest { reason, actor };
            move_production(client, &subjects.registry_rollback, &request).await
        }
        Command::Route {
            canary,
            shadow,
            sticky,
            clear,
            reason,
            actor,
            json,
        } => {
            let change = clear || sticky || shadow.is_some() || !canary.is_empty();
            let request = if change {
                RouteRequest {
                    candidates: (!clear).then_some(canary),
                    shadow,
                    sticky: (!clear).then_some(sticky),
                    clear,
                    reason,
                    actor: Some(actor),
                }
            } else {
                RouteRequest::default()
            };
            route(client, subjects, &request, json).await
        }
        Command::History { json, limit } => history(client, subjects, json, limit).await,
        Command::Train { timeout, quiet } => train::train(client, subjects, timeout, quiet).await,
        Command::Stats => {
            let reply =
                request_json(client, &subjects.monitor_stats, Vec::new(), "monitor").await?;
            println!("{}", String::from_utf8_lossy(&reply));
            Ok(ExitCode::SUCCESS)
        }
        Command::GenData { .. }
        | Command::Up(_)
        | Command::Bench(_)
        | Command::Echo
        | Command::Secrets
        | Command::Top(_)
        | Command::Import(_) => unreachable!("not a request command"),
    }
}

/// One user, a batch (several ids), or raw features.
async fn predict(
    client: &Client,
    subjects: &Subjects,
    mut user_ids: Vec<String>,
    features: Option<std::collections::BTreeMap<String, f64>>,
    routing_key: Option<String>,
) -> anyhow::Result<ExitCode> {
    let batch = user_ids.len() > 1;
    let request = PredictRequest {
        user_id: if batch { None } else { user_ids.pop() },
        user_ids: batch.then_some(user_ids),
        features,
        routing_key,
    };
    let body = serde_json::to_vec(&request)?;
    let reply = request_json(client, &subjects.predict, body, "predictor").await?;
    Ok(if batch {
        print_reply::<BatchPredictReply>(reply)
    } else {
        print_reply::<PredictReply>(reply)
    })
}

async fn models(client: &Client, subjects: &Subjects, json: bool) -> anyhow::Result<ExitCode> {
    let reply = request_json(client, &subjects.registry_models, Vec::new(), "registry").await?;
    Ok(if json {
        print_reply::<ModelsReply>(reply)
    } else {
        with_reply(reply, |m: ModelsReply| {
            let now = std::time::SystemTime::now();
            print!("{}", registry_view::models_table(&m, now))
        })
    })
}

/// Every run, filtered and sorted here.
async fn runs(
    client: &Client,
    subjects: &Subjects,
    json: bool,
    filters: &[registry_view::Filter],
    sort: Option<String>,
    desc: bool,
) -> anyhow::Result<ExitCode> {
    let sort = sort
        .map(|s| Sort::new(&s, desc))
        .transpose()
        .map_err(|e| anyhow::anyhow!(e))?;
    let reply = all_runs(client, &subjects.registry_runs).await?;
    Ok(with_reply(reply, |r: RunsReply| {
        let runs = registry_view::select(r.runs, filters, sort.as_ref());
        if json {
            let total = runs.len();
            let reply = RunsReply { runs, total };
            println!("{}", serde_json::to_string(&reply).expect("serialisable"));
        } else {
            print!("{}", registry_view::runs_table(&runs));
        }
    }))
}

/// A promotion or a rollback.
async fn move_production(
    client: &Client,
    subject: &str,
    request: &impl serde::Serialize,
) -> anyhow::Result<ExitCode> {
    let body = serde_json::to_vec(request)?;
    let reply = request_json(client, subject, body, "registry").await?;
    Ok(with_reply(reply, |r: MoveReply| {
        println!("{}", registry_view::move_line(&r))
    }))
}

async fn route(
    client: &Client,
    subjects: &Subjects,
    request: &RouteRequest,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let body = serde_json::to_vec(request)?;
    let reply = request_json(client, &subjects.registry_route, body, "registry").await?;
    Ok(if json {
        print_reply::<RouteReply>(reply)
    } else {
        with_reply(reply, |r: RouteReply| {
            print!("{}", registry_view::route_lines(&r))
        })
    })
}

async fn history(
    client: &Client,
    subjects: &Subjects,
    json: bool,
    limit: Option<usize>,
) -> anyhow::Result<ExitCode> {
    let request = HistoryRequest {
        limit,
        offset: None,
    };
    let body = serde_json::to_vec(&request)?;
    let reply = request_json(client, &subjects.registry_history, body, "registry").await?;
    Ok(if json {
        print_reply::<HistoryReply>(reply)
    } else {
        with_reply(reply, |h: HistoryReply| {
            print!("{}", registry_view::history_table(&h.moves))
        })
    })
}
