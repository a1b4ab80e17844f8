//! A small path router for the hyper services (no framework): literal segments and `{param}`
//! captures, 404 for an unknown path, 405 with `Allow` for a known path and a wrong method.
//! Routes are listed by [`Router::routes`] so tests can check the OpenAPI document covers them.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use http::Method;

use super::{ApiRequest, Response};
use crate::error::{Error, ErrorCode, Result};

type BoxFut = Pin<Box<dyn Future<Output = Result<Response>> + Send + 'static>>;
type Handler<S> = Box<dyn Fn(Arc<S>, ApiRequest) -> BoxFut + Send + Sync>;

enum Seg {
    Lit(&'static str),
    Param(&'static str),
}

struct Route<S> {
    method: Method,
    pattern: &'static str,
    segs: Vec<Seg>,
    handler: Handler<S>,
}

pub struct Router<S> {
    routes: Vec<Route<S>>,
}

impl<S: Send + Sync + 'static> Default for Router<S> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S: Send + Sync + 'static> Router<S> {
    pub fn new() -> Self {
        Router { routes: Vec::new() }
    }

    /// Register `handler` for `method` on `pattern` (e.g. `/v1/agents/{agent_id}`).
    pub fn route<F, Fut>(mut self, method: Method, pattern: &'static str, handler: F) -> Self
    where
        F: Fn(Arc<S>, ApiRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Response>> + Send + 'static,
    {
        let segs = split(pattern)
            .map(|s| {
                if let Some(p) = s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    Seg::Param(p)
                } else {
                    Seg::Lit(s)
                }
            })
            .collect();
        self.routes.push(Route {
            method,
            pattern,
            segs,
            handler: Box::new(move |s, r| Box::pin(handler(s, r))),
        });
        self
    }

    pub fn get<F, Fut>(self, p: &'static str, h: F) -> Self
    where
        F: Fn(Arc<S>, ApiRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Response>> + Send + 'static,
    {
        self.route(Method::GET, p, h)
    }
    pub fn post<F, Fut>(self, p: &'static str, h: F) -> Self
    where
        F: Fn(Arc<S>, ApiRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Response>> + Send + 'static,
    {
        self.route(Method::POST, p, h)
    }
    pub fn put<F, Fut>(self, p: &'static str, h: F) -> Self
    where
        F: Fn(Arc<S>, ApiRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Response>> + Send + 'static,
    {
        self.route(Method::PUT, p, h)
    }
    pub fn patch<F, Fut>(self, p: &'static str, h: F) -> Self
    where
        F: Fn(Arc<S>, ApiRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Response>> + Send + 'static,
    {
        self.route(Method::PATCH, p, h)
    }
    pub fn delete<F, Fut>(self, p: &'static str, h: F) -> Self
    where
        F: Fn(Arc<S>, ApiRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Response>> + Send + 'static,
    {
        self.route(Method::DELETE, p, h)
    }

    /// (method, pattern) of every route, in registration order.
    pub fn routes(&self) -> Vec<(Method, &'static str)> {
        self.routes.iter().map(|r| (r.method.clone(), r.pattern)).collect()
    }

    /// Find the route for `method` and `path`; returns its pattern (for metrics labels) and a
    /// future running the handler. Unknown path → 404; known path, other method → 405.
    pub fn dispatch(&self, state: Arc<S>, mut req: ApiRequest) -> (&'static str, BoxFut) {
        let path = req.parts.uri.path().to_string();
        let segs: Vec<&str> = split(&path).collect();
        let mut allowed: Vec<&Method> = Vec::new();
        for r in &self.routes {
            let Some(params) = matches(&r.segs, &segs) else {
                continue;
            };
            if r.method != req.parts.method && !(req.parts.method == Method::HEAD && r.method == Method::GET) {
                allowed.push(&r.method);
                continue;
            }
            req.params = params;
            return (r.pattern, (r.handler)(state, req));
        }
        if allowed.is_empty() {
            let err = Error::new(ErrorCode::NotFound, "no such route");
            return ("unmatched", Box::pin(async move { Err(err) }));
        }
        let allow = allowed.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(", ");
        let err = Error::new(ErrorCode::MethodNotAllowed, "method not allowed on this route")
            .with_details(serde_json::json!({ "allow": allow }));
        ("unmatched", Box::pin(async move { Err(err) }))
    }
}

fn split(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|s| !s.is_empty())
}

fn matches(pattern: &[Seg], segs: &[&str]) -> Option<Vec<(&'static str, String)>> {
    if pattern.len() != segs.len() {
        return None;
    }
    let mut params = Vec::new();
    for (p, s) in pattern.iter().zip(segs) {
        match p {
            Seg::Lit(l) if l == s => {}
            Seg::Lit(_) => return None,
            Seg::Param(name) => params.push((*name, (*s).to_string())),
        }
    }
    Some(params)
}
