//! The server starts on port 0 and answers `/health` without authentication.

mod common;

#[tokio::test]
async fn health_is_public_in_every_mode() {
    let app = common::spawn(&["--gatekeeper", "proxy_key", "--proxy-key", "secret"], &[]).await;
    let resp = reqwest::get(format!("{}/health", app.url))
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    app.shutdown().await.expect("clean shutdown");
}
