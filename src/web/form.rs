//! Reading `application/x-www-form-urlencoded` bodies and checking their CSRF token. Forms are
//! read by hand (not with `axum::Form`) so that a malformed body becomes a page that says what
//! to do, not a bare text rejection.

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

use crate::app::AppState;
use crate::auth::session::CSRF_FIELD;

/// The largest form body read: the public forms (`/user`, `/admin/login`) are read before anyone
/// is known, so a request with no credential must not make the server buffer megabytes. The
/// largest real form (an admin's user edit) is well under 2 KB. The admin's import upload has
/// its own, larger limit (`MAX_REQUEST_BODY_MB`).
pub const FORM_BODY_LIMIT: usize = 16 * 1024;

/// Reads a form body of at most [`FORM_BODY_LIMIT`] bytes. A larger body is refused (413) as
/// soon as the limit is passed, without reading the rest.
pub async fn read_form(body: Body) -> Result<FormData, Response> {
    match axum::body::to_bytes(body, FORM_BODY_LIMIT).await {
        Ok(bytes) => Ok(FormData::parse(&bytes)),
        Err(e) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            Err(if too_large {
                super::templates::message(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "Form too large",
                    &format!("This form was not accepted: its content is larger than {} KB. Go back and shorten what you typed.", FORM_BODY_LIMIT / 1024),
                    None,
                )
            } else {
                super::templates::message(
                    StatusCode::BAD_REQUEST,
                    "Form not received",
                    "The form could not be read completely. Go back and submit it again.",
                    None,
                )
            })
        }
    }
}

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
