//! The one error type of the request path and its OpenAI-shaped JSON body
//! (`{"error":{"message","type","param","code"}}`), so every answer the proxy itself
//! produces looks like one from OpenAI to an SDK client.

use serde_json::json;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
    /// Extra response headers, e.g. `Allow` on 405 or `Retry-After` on 429.
    pub headers: Vec<(&'static str, String)>,
}

impl ApiError {
    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            headers: Vec::new(),
        }
    }

    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(400, "invalid_request_error", message)
    }

    pub fn not_found(method: &str, path: &str) -> Self {
        Self::new(
            404,
            "invalid_request_error",
            format!("Invalid URL ({method} {path})"),
        )
        .code("unknown_url")
    }

    pub fn method_not_allowed(method: &str, path: &str, allowed: &'static str) -> Self {
        Self::new(
            405,
            "invalid_request_error",
            format!("Method {method} is not allowed on {path}; use {allowed}"),
        )
        .code("method_not_allowed")
        .header("Allow", allowed)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "server_error", message).code("internal_error")
    }

    pub fn body(&self) -> Vec<u8> {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
        .to_string()
        .into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_the_openai_shape_with_nulls() {
        let body: serde_json::Value =
            serde_json::from_slice(&ApiError::invalid_request("bad").body()).unwrap();
        assert_eq!(
            body,
            json!({"error": {"message": "bad", "type": "invalid_request_error",
                              "param": null, "code": null}})
        );
    }

    #[test]
    fn method_not_allowed_names_the_allowed_method() {
        let e = ApiError::method_not_allowed("GET", "/v1/embeddings", "POST");
        assert_eq!(e.status, 405);
        assert_eq!(e.headers, vec![("Allow", "POST".to_string())]);
        assert!(e.message.contains("GET"), "{}", e.message);
    }
}
