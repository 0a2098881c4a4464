//! A stand-in Kubernetes API server (no cluster runs on this machine): objects in
//! memory with resource versions, list and watch (streamed events, history replayed
//! from the version asked for), get/create/replace, TokenReview answered by the
//! test, an outage switch, and a record of every call as an RBAC (verb, resource)
//! pair — so tests can check that what the code calls is what `deploy/` grants.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::Result;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{json, Value};
use tokio::sync::broadcast;

/// Answers a TokenReview's token with the review's `status`.
pub type TokenReviews = Arc<dyn Fn(&str) -> Value + Send + Sync>;

/// One call, as RBAC sees it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Call {
    pub verb: String,
    /// `group/plural` (`/pods` for the core group).
    pub resource: String,
    /// The namespace of a namespaced call.
    pub namespace: Option<String>,
    /// The object's name, for a call on one object (create names none: the name is
    /// in the body, and RBAC does not limit creation by name).
    pub name: Option<String>,
}

/// Where an object lives: (group, version, plural).
type Collection = (String, String, String);

#[derive(Default)]
struct Store {
    version: u64,
    /// By (collection, namespace, name).
    objects: BTreeMap<(Collection, String, String), Value>,
    /// Every event, oldest first: (version, collection, event).
    history: Vec<(u64, Collection, Value)>,
    calls: Vec<Call>,
    available: bool,
    /// Versions up to this one are forgotten (see `compact`).
    compacted: u64,
}

#[derive(Clone)]
pub struct FakeApiServer {
    pub addr: SocketAddr,
    store: Arc<Mutex<Store>>,
    events: broadcast::Sender<(u64, Collection, Value)>,
    /// Dropped watches end when the server is made unavailable.
    outage: broadcast::Sender<()>,
    token_reviews: Arc<Mutex<Option<TokenReviews>>>,
}

impl FakeApiServer {
    /// Listens on 127.0.0.1.
    pub async fn start() -> Result<Self> {
        Self::serve(tokio::net::TcpListener::bind("127.0.0.1:0").await?)
    }

    /// Serves on a listener bound elsewhere (e.g. in a node's network namespace,
    /// where the tunnels reach it).
    pub fn start_on(listener: std::net::TcpListener) -> Result<Self> {
        listener.set_nonblocking(true)?;
        Self::serve(tokio::net::TcpListener::from_std(listener)?)
    }

    fn serve(listener: tokio::net::TcpListener) -> Result<Self> {
        let (events, _) = broadcast::channel(1024);
        let (outage, _) = broadcast::channel(4);
        let server = Self {
            addr: listener.local_addr()?,
            store: Arc::new(Mutex::new(Store {
                available: true,
                ..Default::default()
            })),
            events,
            outage,
            token_reviews: Arc::default(),
        };
        let this = server.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let this = this.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let this = this.clone();
                        async move { Ok::<_, Infallible>(this.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Ok(server)
    }

    /// A kubeconfig for this server, authenticating with `token`.
    pub fn kubeconfig(&self, dir: &Path, token: &str) -> Result<PathBuf> {
        let path = dir.join(format!("kubeconfig-{token}"));
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: test\n\
                 clusters: [{{name: test, cluster: {{server: 'http://{}'}}}}]\n\
                 users: [{{name: test, user: {{token: {token}}}}}]\n\
                 contexts: [{{name: test, context: {{cluster: test, user: test}}}}]\n",
                self.addr
            ),
        )?;
        Ok(path)
    }

    /// A client for this server, as the code under test builds one from a
    /// kubeconfig.
    pub async fn client(&self, dir: &Path) -> Result<kube::Client> {
        let kubeconfig = kube::config::Kubeconfig::read_from(self.kubeconfig(dir, "test")?)?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }

    pub fn on_token_review(&self, answer: impl Fn(&str) -> Value + Send + Sync + 'static) {
        *self.token_reviews.lock().unwrap() = Some(Arc::new(answer));
    }

    /// Creates or updates an object (YAML or JSON); watchers see ADDED or MODIFIED.
    pub fn apply(&self, object: Value) {
        let (collection, namespace, name) = locate(&object);
        let mut store = self.store.lock().unwrap();
        store.version += 1;
        let version = store.version;
        let key = (collection.clone(), namespace, name);
        let mut object = object;
        object["metadata"]["resourceVersion"] = version.to_string().into();
        if object["metadata"]["uid"].is_null() {
            object["metadata"]["uid"] = format!("uid-{version}").into();
        }
        let kind = match store.objects.insert(key, object.clone()) {
            Some(_) => "MODIFIED",
            None => "ADDED",
        };
        let event = json!({"type": kind, "object": object});
        store
            .history
            .push((version, collection.clone(), event.clone()));
        let _ = self.events.send((version, collection, event));
    }

    pub fn apply_yaml(&self, yaml: &str) {
        for document in yaml.split("\n---") {
            let value: Value = serde_yaml::from_str(document).expect("valid YAML");
            if !value.is_null() {
                self.apply(value);
            }
        }
    }

    /// Deletes an object like `object`; watchers see DELETED.
    pub fn delete(&self, object: &Value) {
        let key = locate(object);
        let mut store = self.store.lock().unwrap();
        let Some(mut gone) = store.objects.remove(&key) else {
            return;
        };
        store.version += 1;
        let version = store.version;
        gone["metadata"]["resourceVersion"] = version.to_string().into();
        let event = json!({"type": "DELETED", "object": gone});
        store.history.push((version, key.0.clone(), event.clone()));
        let _ = self.events.send((version, key.0, event));
    }

    /// An outage: every request fails with 503 and open watches end.
    pub fn set_available(&self, available: bool) {
        self.store.lock().unwrap().available = available;
        if !available {
            let _ = self.outage.send(());
        }
    }

    /// Forgets the history so far, as an API server compacting its storage does:
    /// a watch resuming from an older version is told 410 Gone and must list
    /// again, so what it missed meanwhile (deletions too) only the list shows.
    pub fn compact(&self) {
        let mut store = self.store.lock().unwrap();
        store.history.clear();
        store.compacted = store.version;
    }

    /// Every call made so far.
    pub fn calls(&self) -> Vec<Call> {
        self.store.lock().unwrap().calls.clone()
    }

    pub fn get(&self, object: &Value) -> Option<Value> {
        self.store
            .lock()
            .unwrap()
            .objects
            .get(&locate(object))
            .cloned()
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<BoxBody<Bytes, Infallible>> {
        let query: BTreeMap<String, String> = req
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let Some(target) = Target::parse(req.uri().path()) else {
            return status(StatusCode::NOT_FOUND, "no such path");
        };
        let watch = query.get("watch").is_some_and(|w| w == "true" || w == "1");
        let verb = match (req.method(), target.name.is_some(), watch) {
            (&Method::GET, _, true) => "watch",
            (&Method::GET, false, false) => "list",
            (&Method::GET, true, false) => "get",
            (&Method::POST, _, _) => "create",
            (&Method::PUT, _, _) => "update",
            (&Method::PATCH, _, _) => "patch",
            (&Method::DELETE, _, _) => "delete",
            _ => "unknown",
        };
        {
            let mut store = self.store.lock().unwrap();
            store.calls.push(Call {
                verb: verb.into(),
                resource: format!("{}/{}", target.collection.0, target.collection.2),
                namespace: target.namespace.clone(),
                name: target.name.clone(),
            });
            if !store.available {
                return status(StatusCode::SERVICE_UNAVAILABLE, "the API server is down");
            }
        }
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return status(StatusCode::BAD_REQUEST, "unreadable body"),
        };
        match verb {
            "list" => self.list(&target),
            "watch" => {
                let from = query
                    .get("resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                self.watch(target, from)
            }
            "get" => match self.store.lock().unwrap().objects.get(&target.key()) {
                Some(object) => json_response(StatusCode::OK, object),
                None => status(StatusCode::NOT_FOUND, "not found"),
            },
            "create" if target.collection.2 == "tokenreviews" => {
                let review: Value = serde_json::from_slice(&body).unwrap_or_default();
                let token = review["spec"]["token"].as_str().unwrap_or_default();
                let answer = self.token_reviews.lock().unwrap().clone();
                let status_value = match answer {
                    Some(answer) => answer(token),
                    None => json!({"authenticated": false, "error": "no TokenReview answers"}),
                };
                let mut review = review;
                review["status"] = status_value;
                json_response(StatusCode::CREATED, &review)
            }
            "create" | "update" => {
                let mut object: Value = match serde_json::from_slice(&body) {
                    Ok(v) => v,
                    Err(e) => return status(StatusCode::BAD_REQUEST, &e.to_string()),
                };
                if object["metadata"]["namespace"].is_null() {
                    if let Some(ns) = &target.namespace {
                        object["metadata"]["namespace"] = ns.clone().into();
                    }
                }
                let exists = self.get(&object).is_some();
                if verb == "create" && exists {
                    return status(StatusCode::CONFLICT, "already exists");
                }
                if verb == "update" && !exists {
                    return status(StatusCode::NOT_FOUND, "not found");
                }
                self.apply(object.clone());
                let stored = self.get(&object).unwrap_or(object);
                json_response(StatusCode::CREATED, &stored)
            }
            _ => status(StatusCode::METHOD_NOT_ALLOWED, "not supported here"),
        }
    }

    fn list(&self, target: &Target) -> Response<BoxBody<Bytes, Infallible>> {
        let store = self.store.lock().unwrap();
        let items: Vec<&Value> = store
            .objects
            .iter()
            .filter(|((c, ns, _), _)| {
                *c == target.collection && target.namespace.as_ref().is_none_or(|t| t == ns)
            })
            .map(|(_, o)| o)
            .collect();
        json_response(
            StatusCode::OK,
            &json!({"apiVersion": "v1", "kind": "List",
                    "metadata": {"resourceVersion": store.version.to_string()},
                    "items": items}),
        )
    }

    fn watch(&self, target: Target, from: u64) -> Response<BoxBody<Bytes, Infallible>> {
        // The backlog and the subscription under one lock: no event falls between.
        let (backlog, mut live, gone) = {
            let store = self.store.lock().unwrap();
            if from < store.compacted {
                let expired = json!({"type": "ERROR", "object": {"apiVersion": "v1", "kind": "Status",
                    "metadata": {}, "status": "Failure", "reason": "Expired", "code": 410,
                    "message": format!("too old resource version: {from} ({})", store.compacted)}});
                (vec![expired], self.events.subscribe(), true)
            } else {
                let backlog: Vec<Value> = store
                    .history
                    .iter()
                    .filter(|(v, c, _)| *v > from && *c == target.collection)
                    .map(|(_, _, e)| e.clone())
                    .collect();
                (backlog, self.events.subscribe(), false)
            }
        };
        let mut outage = self.outage.subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
        tokio::spawn(async move {
            for event in backlog {
                if tx.send(line(&event)).await.is_err() {
                    return;
                }
            }
            if gone {
                return;
            }
            loop {
                tokio::select! {
                    event = live.recv() => match event {
                        Ok((_, collection, event)) if collection == target.collection => {
                            if tx.send(line(&event)).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    },
                    _ = outage.recv() => return,
                }
            }
        });
        let frames = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|bytes| (Ok::<_, Infallible>(Frame::data(bytes)), rx))
        });
        Response::builder()
            .header("content-type", "application/json")
            .body(StreamBody::new(frames).boxed())
            .expect("a valid response")
    }
}

fn line(event: &Value) -> Bytes {
    let mut text = event.to_string();
    text.push('\n');
    Bytes::from(text)
}

/// What a request path names.
struct Target {
    collection: Collection,
    namespace: Option<String>,
    name: Option<String>,
}

impl Target {
    /// `/api/v1/[namespaces/NS/]PLURAL[/NAME]`, `/apis/G/V/[namespaces/NS/]PLURAL[/NAME]`
    fn parse(path: &str) -> Option<Self> {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, version, rest) = match parts.as_slice() {
            ["api", version, rest @ ..] => ("", *version, rest),
            ["apis", group, version, rest @ ..] => (*group, *version, rest),
            _ => return None,
        };
        let (namespace, plural, name) = match rest {
            ["namespaces", ns, plural] => (Some(*ns), *plural, None),
            ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
            [plural] => (None, *plural, None),
            [plural, name] => (None, *plural, Some(*name)),
            _ => return None,
        };
        Some(Self {
            collection: (group.into(), version.into(), plural.into()),
            namespace: namespace.map(str::to_owned),
            name: name.map(str::to_owned),
        })
    }

    fn key(&self) -> (Collection, String, String) {
        (
            self.collection.clone(),
            self.namespace.clone().unwrap_or_default(),
            self.name.clone().unwrap_or_default(),
        )
    }
}

/// An object's collection, namespace and name.
fn locate(object: &Value) -> (Collection, String, String) {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let kind = object["kind"].as_str().unwrap_or_default();
    let plural = plural(kind);
    let namespace = match kind {
        "Namespace" => String::new(),
        _ => object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned(),
    };
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    (
        (group.into(), version.into(), plural),
        namespace,
        name.to_owned(),
    )
}

/// Lower-case plural, as the API's paths spell kinds.
fn plural(kind: &str) -> String {
    let lower = kind.to_lowercase();
    match lower.strip_suffix('y') {
        Some(stem) => format!("{stem}ies"),
        None if lower.ends_with('s') => format!("{lower}es"),
        None => format!("{lower}s"),
    }
}

fn json_response(code: StatusCode, value: &Value) -> Response<BoxBody<Bytes, Infallible>> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())).boxed())
        .expect("a valid response")
}

fn status(code: StatusCode, message: &str) -> Response<BoxBody<Bytes, Infallible>> {
    let reason = match code {
        StatusCode::NOT_FOUND => "NotFound",
        StatusCode::CONFLICT => "AlreadyExists",
        StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailable",
        _ => "BadRequest",
    };
    json_response(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": message, "reason": reason, "code": code.as_u16()}),
    )
}
