//! `GET /v1/cluster/events`: the cluster view at once, then each change, as server-sent events.

use axum::Router;
use axum::body::Body;
use axum::http::{Request, header};
use exo_api::{ClusterView, NodeState, NodeView};
use http_body_util::BodyExt;
use tower::ServiceExt;

use crate::fake::{FakeEngine, PROMPTLY, sample_cluster};
use crate::support::{app, send};

/// Reads the next server-sent event of `body`: its name and its data as a `ClusterView`.
async fn next_event(body: &mut Body, pending: &mut String) -> (String, ClusterView) {
    let read = async {
        loop {
            if let Some(end) = pending.find("\n\n") {
                let block: String = pending.drain(..end + 2).collect();
                if block.lines().all(|line| line.starts_with(':')) {
                    continue;
                }
                return block;
            }
            let frame = body.frame().await.expect("the stream ended").unwrap();
            if let Ok(data) = frame.into_data() {
                pending.push_str(std::str::from_utf8(&data).unwrap());
            }
        }
    };
    let block = tokio::time::timeout(PROMPTLY, read)
        .await
        .expect("no event arrived");
    let field = |name: &str| {
        block
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(|value| value.trim_start().to_owned())
            .unwrap_or_else(|| panic!("no {name} in {block:?}"))
    };
    let view = serde_json::from_str(&field("data:")).unwrap();
    (field("event:"), view)
}

async fn open_events(app: &Router) -> (Body, String) {
    let request = Request::get("/v1/cluster/events")
        .body(Body::empty())
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "text/event-stream"
    );
    (response.into_body(), String::new())
}

#[tokio::test]
async fn cluster_events_send_the_view_then_each_change() {
    let engine = FakeEngine::new().live().build();
    let app = app(&engine);
    let (mut body, mut pending) = open_events(&app).await;
    let (name, view) = next_event(&mut body, &mut pending).await;
    assert_eq!(name, "cluster");
    assert_eq!(view, sample_cluster());

    // A second node joins: the open stream carries the new view, without asking again.
    let mut joined = sample_cluster();
    joined.nodes.push(NodeView {
        id: "12D3KooWB".into(),
        name: "laptop".into(),
        role: "worker".into(),
        state: NodeState::Joining,
        ..NodeView::default()
    });
    engine.cluster.send_replace(joined.clone());
    let (_, view) = next_event(&mut body, &mut pending).await;
    assert_eq!(view, joined);
    assert_eq!(view.nodes[1].state, NodeState::Joining);

    // And again when the plan goes away.
    let mut waiting = joined;
    waiting.plan = None;
    waiting.ready = false;
    waiting.status = "waiting: short by 51 MiB".into();
    engine.cluster.send_replace(waiting.clone());
    let (_, view) = next_event(&mut body, &mut pending).await;
    assert_eq!(view, waiting);
}

#[tokio::test]
async fn an_engine_without_a_live_view_sends_one_view_and_keeps_the_stream_open() {
    let engine = FakeEngine::new().build();
    let app = app(&engine);
    let (mut body, mut pending) = open_events(&app).await;
    let (name, view) = next_event(&mut body, &mut pending).await;
    assert_eq!(name, "cluster");
    assert_eq!(view, sample_cluster());
    // Nothing more is sent, and the stream does not end (which would make a browser
    // reconnect in a loop).
    let more = tokio::time::timeout(std::time::Duration::from_millis(200), body.frame()).await;
    assert!(more.is_err(), "the stream sent or ended: {more:?}");
}

#[tokio::test]
async fn the_view_serialises_node_states_in_snake_case() {
    let engine = FakeEngine::new().build();
    let reply = send(
        &app(&engine),
        Request::get("/v1/cluster").body(Body::empty()).unwrap(),
    )
    .await;
    let body = reply.json();
    assert_eq!(body["nodes"][0]["state"], "ready");
    assert_eq!(body["plan"]["stages"][0]["step_ms"], 21.5);
    assert_eq!(body["problems"], serde_json::json!([]));
}
