//! The web page at `/` and its files.

use exo_api::ApiConfig;

use crate::fake::FakeEngine;
use crate::support::{app, app_with, get};

fn keyed() -> ApiConfig {
    ApiConfig {
        api_key: Some("sk-page-key".into()),
        ..ApiConfig::default()
    }
}

#[tokio::test]
async fn the_page_is_served_at_the_root_with_its_files() {
    let engine = FakeEngine::new().build();
    let app = app(&engine);
    let page = get(&app, "/").await;
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let policy = page.header("content-security-policy").unwrap();
    assert!(policy.contains("script-src 'self'"), "{policy}");
    assert!(policy.contains("connect-src 'self'"), "{policy}");
    let html = page.text();
    assert!(
        html.contains(r#"<meta name="exo-auth" content="none">"#),
        "{html}"
    );
    assert!(!html.contains("{{"), "a placeholder was left in the page");
    assert!(html.contains(r#"src="/ui/app.js""#));

    for (file, content_type) in [
        ("app.js", "text/javascript; charset=utf-8"),
        ("api.js", "text/javascript; charset=utf-8"),
        ("chat.js", "text/javascript; charset=utf-8"),
        ("cluster.js", "text/javascript; charset=utf-8"),
        ("style.css", "text/css; charset=utf-8"),
        ("favicon.svg", "image/svg+xml"),
    ] {
        let reply = get(&app, &format!("/ui/{file}")).await;
        assert_eq!(reply.status, 200, "{file}");
        assert_eq!(reply.header("content-type"), Some(content_type), "{file}");
        assert_eq!(reply.header("x-content-type-options"), Some("nosniff"));
        assert!(!reply.body.is_empty());
    }
    // The page follows the live view and chats through the OpenAI routes.
    let app_js = get(&app, "/ui/app.js").await.text();
    assert!(app_js.contains("/v1/cluster/events"));
    let chat_js = get(&app, "/ui/chat.js").await.text();
    assert!(chat_js.contains("/v1/chat/completions"));
}

#[tokio::test]
async fn unknown_page_files_are_404_in_the_api_envelope() {
    let engine = FakeEngine::new().build();
    let app = app(&engine);
    for path in ["/ui/secret.txt", "/ui/..%2FCargo.toml", "/ui/"] {
        let reply = get(&app, path).await;
        reply.assert_error(404, None, Some("unknown_url"));
    }
}

#[tokio::test]
async fn with_an_api_key_the_page_is_open_asks_for_the_key_and_never_holds_it() {
    let engine = FakeEngine::new().build();
    let app = app_with(&engine, keyed());
    let page = get(&app, "/").await;
    assert_eq!(page.status, 200);
    let html = page.text();
    assert!(
        html.contains(r#"<meta name="exo-auth" content="key">"#),
        "{html}"
    );
    assert!(!html.contains("sk-page-key"));
    assert_eq!(get(&app, "/ui/app.js").await.status, 200);
    // What the page reads is not open, events included.
    let reply = get(&app, "/v1/cluster/events").await;
    reply.assert_error(401, None, Some("invalid_api_key"));
}
