//! Bearer tokens as every msgnode listener reads them, and comparing them in constant time.

use axum::http::{header, HeaderMap};
use subtle::ConstantTimeEq;

/// The token of an `Authorization: Bearer …` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// The token a Matrix request presents: the `Authorization` header, else the (legacy)
/// `access_token` query parameter.
pub fn presented<'a>(headers: &'a HeaderMap, query: &'a [(String, String)]) -> Option<&'a str> {
    bearer(headers).or_else(|| {
        query
            .iter()
            .find(|(k, _)| k == "access_token")
            .map(|(_, v)| v.as_str())
    })
}

/// Whether `presented` is `expected`, compared in constant time (only the length leaks).
pub fn token_matches(presented: &str, expected: &str) -> bool {
    bool::from(presented.as_bytes().ct_eq(expected.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_wins_over_query_and_tokens_compare_exactly() {
        let mut headers = HeaderMap::new();
        let query = vec![("access_token".to_string(), "q".to_string())];
        assert_eq!(presented(&headers, &query), Some("q"));
        headers.insert(header::AUTHORIZATION, "Bearer h".parse().expect("header"));
        assert_eq!(presented(&headers, &query), Some("h"));
        assert_eq!(bearer(&headers), Some("h"));
        assert!(token_matches("secret", "secret"));
        assert!(!token_matches("secret", "secreT") && !token_matches("", "secret"));
    }
}
