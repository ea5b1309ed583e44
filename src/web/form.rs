//! Reading `application/x-www-form-urlencoded` bodies and checking their CSRF token. Forms are
//! read by hand (not with `axum::Form`) so that a malformed body becomes a page that says what
//! to do, not a bare text rejection.

use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

use crate::app::AppState;
use crate::auth::session::CSRF_FIELD;

/// The fields of a submitted form, in order.
#[derive(Debug, Default, Clone)]
pub struct FormData(Vec<(String, String)>);

impl FormData {
    pub fn parse(body: &[u8]) -> FormData {
        FormData(
            url::form_urlencoded::parse(body)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    pub fn from_pairs(pairs: Vec<(String, String)>) -> FormData {
        FormData(pairs)
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The first value of `name`, trimmed, `None` when empty.
    pub fn text(&self, name: &str) -> Option<&str> {
        self.get(name).map(str::trim).filter(|v| !v.is_empty())
    }

    /// True when a checkbox named `name` was ticked.
    pub fn checked(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Every field, in order.
    pub fn pairs(&self) -> &[(String, String)] {
        &self.0
    }
}

/// The refusal page unless the form carries this browser's CSRF token for `who`.
pub fn check_csrf(
    state: &AppState,
    headers: &HeaderMap,
    who: &str,
    form: &FormData,
) -> Option<Response> {
    if state
        .sessions
        .verify_csrf(headers, who, form.get(CSRF_FIELD))
    {
        None
    } else {
        Some(csrf_refusal())
    }
}

/// The page shown when a form's CSRF token is missing or wrong.
pub fn csrf_refusal() -> Response {
    super::templates::message(
        StatusCode::FORBIDDEN,
        "Form expired",
        "This form was not accepted: it is missing its security token, the token is wrong, or it was sent from another site. Reload the page and submit the form again. (If this keeps happening and you reach this server over plain http:// on an address other than localhost, your browser drops its Secure cookies: serve it over HTTPS, or set USE_INSECURE_COOKIES=true on the server.)",
        None,
    )
}
