//! One user lookup per request (issue 12): the gatekeeper looks the token up once and hands the
//! entry's key on in the `Principal`; the quota's check-and-reserve and the settlement at the
//! end of the response reach the same entry without looking the token up again. Before, a
//! proxied request looked its token up 3 to 5 times. Counted by the store in debug builds.

mod common;

use common::quota::{add_user, eventually, post, proxy, used};
use common::upstream::FakeUpstream;
use llm_gatekeeper::users::UserType;
use serde_json::json;

#[tokio::test]
async fn a_proxied_request_looks_its_token_up_once() {
    let fake = FakeUpstream::start().await;
    let app = proxy(&fake, &["--text-model-rate-limit", "0"], &[]).await;
    add_user(&app, "tok", UserType::Normal, &[("turbo", 100_000)]);
    let c = reqwest::Client::new();
    let body = json!({"model": "gpt-4o-mini", "max_tokens": 20,
        "messages": [{"role": "user", "content": "hi"}]});
    // The first request also records the address and `lastUsedAt` (same lookup).
    let mut charged = 0;
    for round in 0..3 {
        let before = app.state.users.lookups();
        let r = post(&c, &app, "/v1/chat/completions", "tok", &body).await;
        assert_eq!(r.status(), 200, "round {round}");
        let _ = r.bytes().await.expect("body");
        // The settlement runs when the response ends; wait for it, counting the test's own
        // lookups (one per `used`/`reserved` call) to leave them out.
        let mut own = 0;
        eventually("the usage is charged", || {
            own += 1;
            used(&app, "tok", "turbo") > charged
        })
        .await;
        eventually("the reservation is released", || {
            own += 1;
            common::quota::reserved(&app, "tok", "turbo") == 0
        })
        .await;
        charged = used(&app, "tok", "turbo");
        own += 1;
        let lookups = app.state.users.lookups() - before - own;
        assert_eq!(
            lookups, 1,
            "round {round}: lookups of the token for one request"
        );
    }
}
