//! A response as the server writes it (issue 18): status, header fields as a [`Fields`] list,
//! and the body. The proxied routes' straight line builds one from the upstream's answer
//! without a `HeaderMap` (whose hashed appends, removals, walk and recycling cost about 900
//! instructions for the handful of fields an answer has, callgrind); everything else (the
//! router, our own errors) makes an `http::Response`, which converts into one.

use axum::body::Body;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::Fields;

/// A response: its status, its header fields in order, its body.
pub struct Reply {
    pub status: StatusCode,
    pub headers: Fields,
    pub body: Body,
}

impl Reply {
    /// A response of `status` with `headers` and `body`.
    pub fn new(status: StatusCode, headers: Fields, body: Body) -> Reply {
        Reply {
            status,
            headers,
            body,
        }
    }
}

/// A router's (or an error's) response as the server writes it: its fields are moved into a
/// list, its map given back for reuse; its extensions and version are not needed to write it.
impl From<Response> for Reply {
    fn from(resp: Response) -> Reply {
        let (parts, body) = resp.into_parts();
        Reply {
            status: parts.status,
            headers: Fields::from_map(parts.headers),
            body,
        }
    }
}

/// Back to an `http::Response`, for the router's proxied routes.
impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let mut resp = Response::new(self.body);
        *resp.status_mut() = self.status;
        super::put_headers(resp.headers_mut(), self.headers.into_header_map());
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{header, HeaderValue};

    #[test]
    fn a_response_and_its_reply_carry_the_same_status_fields_and_body() {
        let resp = Response::builder()
            .status(StatusCode::TOO_MANY_REQUESTS)
            .header(header::RETRY_AFTER, "3")
            .header("x-a", "1")
            .header("x-a", "2")
            .body(Body::from("slow down"))
            .unwrap();
        let reply = Reply::from(resp);
        assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
        let fields: Vec<_> = reply
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().to_string(), v.to_value()))
            .collect();
        assert_eq!(
            fields,
            [
                ("retry-after".to_string(), HeaderValue::from_static("3")),
                ("x-a".to_string(), HeaderValue::from_static("1")),
                ("x-a".to_string(), HeaderValue::from_static("2")),
            ]
        );
        let back = reply.into_response();
        assert_eq!(back.status(), StatusCode::TOO_MANY_REQUESTS);
        let all: Vec<_> = back.headers().get_all("x-a").iter().collect();
        assert_eq!(all, ["1", "2"]);
        assert_eq!(back.headers()[header::RETRY_AFTER], "3");
    }
}
