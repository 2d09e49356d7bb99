//! The route table: longest prefix on segment boundaries, optional method and
//! host match, and the prefix rewrite.
//!
//! The table is immutable; the engine holds it in an `ArcSwap` so a reload is
//! one pointer swap and a lookup takes no lock.

use bytes::{BufMut, BytesMut};
use http::uri::PathAndQuery;
use http::{Method, Uri};

use crate::config::RouteConfig;

/// One route, resolved.
#[derive(Debug)]
pub struct RouteMatch {
    /// Index in the file's route order (stable id for metrics and snapshots).
    pub index: usize,
    /// The resolved configuration.
    pub config: RouteConfig,
}

/// Immutable list of routes ordered for longest-prefix-first lookup.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// Sorted: longer prefixes first, then host-specific, then method-specific.
    order: Vec<usize>,
    routes: Vec<RouteMatch>,
}

impl RouteTable {
    /// Builds the table from routes in file order.
    pub fn new(routes: Vec<RouteConfig>) -> Self {
        let routes: Vec<RouteMatch> = routes
            .into_iter()
            .enumerate()
            .map(|(index, config)| RouteMatch { index, config })
            .collect();
        let mut order: Vec<usize> = (0..routes.len()).collect();
        order.sort_by_key(|&i| {
            let c = &routes[i].config;
            (
                std::cmp::Reverse(c.prefix.len()),
                c.host.is_none(),
                c.methods.is_none(),
            )
        });
        Self { order, routes }
    }

    /// Every route in file order.
    pub fn routes(&self) -> &[RouteMatch] {
        &self.routes
    }

    /// The best route for a request. `host` is the Host header value (a port
    /// is ignored); it only narrows the choice among configured routes.
    pub fn find(&self, method: &Method, host: Option<&[u8]>, path: &str) -> Option<&RouteMatch> {
        let host = host.map(strip_port);
        self.order.iter().map(|&i| &self.routes[i]).find(|r| {
            let c = &r.config;
            prefix_matches(&c.prefix, path)
                && c.methods.as_ref().is_none_or(|m| m.contains(method))
                && c.host
                    .as_ref()
                    .is_none_or(|h| host.is_some_and(|x| x.eq_ignore_ascii_case(h.as_bytes())))
        })
    }
}

fn strip_port(host: &[u8]) -> &[u8] {
    if host.first() == Some(&b'[') {
        // [v6]:port
        return match host.iter().position(|&b| b == b']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.iter().rposition(|&b| b == b':') {
        Some(i) => &host[..i],
        None => host,
    }
}

/// True when `path` is `prefix` or continues it with a `/`.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return path.starts_with('/');
    }
    path.starts_with(prefix)
        && (path.len() == prefix.len() || path.as_bytes()[prefix.len()] == b'/')
}

/// Rewrites `uri` (origin form) for the upstream: the matched `prefix` is
/// replaced by `replacement` (`""` strips it). Returns an origin-form URI.
pub fn rewrite(uri: &Uri, prefix: &str, replacement: &str) -> Uri {
    let path = uri.path();
    let rest = if prefix == "/" {
        path
    } else {
        &path[prefix.len().min(path.len())..]
    };
    let query = uri.query();
    let mut out = BytesMut::with_capacity(
        replacement.len() + rest.len() + query.map_or(0, |q| q.len() + 1) + 1,
    );
    out.put_slice(replacement.as_bytes());
    if rest.is_empty() {
        if replacement.is_empty() {
            out.put_u8(b'/');
        }
    } else if !rest.starts_with('/') {
        out.put_u8(b'/');
        out.put_slice(rest.as_bytes());
    } else {
        out.put_slice(rest.as_bytes());
    }
    if let Some(q) = query {
        out.put_u8(b'?');
        out.put_slice(q.as_bytes());
    }
    // The pieces came from a valid URI and a validated replacement prefix.
    match PathAndQuery::from_maybe_shared(out.freeze()) {
        Ok(pq) => Uri::from(pq),
        Err(_) => uri.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Balance, RawBreaker, RawRetry};
    use std::time::Duration;

    fn route(prefix: &str, methods: Option<&[&str]>, host: Option<&str>) -> RouteConfig {
        RouteConfig {
            prefix: prefix.into(),
            service: format!("svc{prefix}"),
            methods: methods.map(|m| m.iter().map(|x| x.parse().unwrap()).collect()),
            host: host.map(Into::into),
            rewrite: None,
            timeout: Duration::from_secs(1),
            attempt_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            retry: RawRetry::default(),
            breaker: RawBreaker::default(),
            balance: Balance::P2c,
            max_body_bytes: 1,
            retry_buffer_bytes: 1,
            policy: Default::default(),
            protocol: crate::config::Protocol::Http1,
        }
    }

    #[test]
    fn longest_prefix_on_segment_boundary() {
        let t = RouteTable::new(vec![
            route("/", None, None),
            route("/users", None, None),
            route("/users/admin", None, None),
        ]);
        let f = |p: &str| {
            t.find(&Method::GET, None, p)
                .map(|r| r.config.prefix.clone())
        };
        assert_eq!(f("/users/42").as_deref(), Some("/users"));
        assert_eq!(f("/users").as_deref(), Some("/users"));
        assert_eq!(f("/usersx").as_deref(), Some("/"));
        assert_eq!(f("/users/admin/1").as_deref(), Some("/users/admin"));
        let t = RouteTable::new(vec![route("/users", None, None)]);
        assert!(t.find(&Method::GET, None, "/orders").is_none());
    }

    #[test]
    fn method_and_host_narrow() {
        let t = RouteTable::new(vec![
            route("/a", Some(&["POST"]), None),
            route("/a", None, Some("api.example.com")),
            route("/a", Some(&["GET"]), None),
        ]);
        let f =
            |m: Method, h: Option<&str>| t.find(&m, h.map(str::as_bytes), "/a/1").map(|r| r.index);
        assert_eq!(f(Method::POST, None), Some(0));
        assert_eq!(f(Method::GET, None), Some(2));
        assert_eq!(f(Method::POST, Some("API.example.com:8080")), Some(1));
        assert_eq!(f(Method::DELETE, None), None);
    }

    #[test]
    fn rewrites() {
        let u: Uri = "/users/42?x=1".parse().unwrap();
        assert_eq!(rewrite(&u, "/users", ""), "/42?x=1");
        assert_eq!(rewrite(&u, "/users", "/api/v1"), "/api/v1/42?x=1");
        let u: Uri = "/users".parse().unwrap();
        assert_eq!(rewrite(&u, "/users", ""), "/");
        assert_eq!(rewrite(&u, "/users", "/v2"), "/v2");
        let u: Uri = "/x/y".parse().unwrap();
        assert_eq!(rewrite(&u, "/", "/base"), "/base/x/y");
        assert_eq!(rewrite(&u, "/", ""), "/x/y");
    }
}
