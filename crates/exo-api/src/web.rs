//! The web page every node (and every gateway) serves at `/`: a chat and a live picture of the
//! cluster. Plain HTML, CSS and JavaScript modules from this crate's `web/` folder, embedded in
//! the binary: no build step, nothing from a CDN, so the page works offline on a LAN. It
//! reaches the node only through the same origin's `/v1` routes (so no CORS is needed), with
//! the API key as a bearer token when one is set.

use axum::extract::{Path, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::state::AppState;

/// One embedded file of the page, served at `/ui/{name}`.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const INDEX: &str = include_str!("../web/index.html");

const ASSETS: &[Asset] = &[
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../web/app.js"),
    },
    Asset {
        name: "api.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../web/api.js"),
    },
    Asset {
        name: "chat.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../web/chat.js"),
    },
    Asset {
        name: "cluster.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../web/cluster.js"),
    },
    Asset {
        name: "style.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("../web/style.css"),
    },
    Asset {
        name: "favicon.svg",
        content_type: "image/svg+xml",
        body: include_str!("../web/favicon.svg"),
    },
];

/// Only this origin's scripts, styles and connections; no inline code, no frames.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// `GET /`: the page. It says whether the API wants a key, so that the page asks for it before
/// its first call instead of after a refusal; the key itself never appears in it.
pub(crate) async fn index(State(state): State<AppState>) -> Response {
    let auth = if state.config.api_key.is_some() {
        "key"
    } else {
        "none"
    };
    let page = INDEX
        .replace("{{auth}}", auth)
        .replace("{{version}}", env!("CARGO_PKG_VERSION"));
    with_headers(page, "text/html; charset=utf-8")
}

/// `GET /ui/{file}`: one of the page's scripts, its style sheet or its icon.
pub(crate) async fn asset(Path(file): Path<String>) -> Result<Response, ApiError> {
    ASSETS
        .iter()
        .find(|asset| asset.name == file)
        .map(|asset| with_headers(asset.body.to_owned(), asset.content_type))
        .ok_or_else(|| ApiError::unknown_route("GET", &format!("/ui/{file}")))
}

fn with_headers(body: String, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, content_type),
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        // A new binary may bring a new page: browsers check before reusing their copy.
        (header::CACHE_CONTROL, "no-cache"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// The page's size in bytes: the HTML and every file it loads.
#[cfg(test)]
pub(crate) fn weight() -> usize {
    INDEX.len() + ASSETS.iter().map(|asset| asset.body.len()).sum::<usize>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_embedded_files() {
        // Every `/ui/...` the page or its modules name is embedded, and nothing is fetched
        // from another origin.
        let sources = std::iter::once(INDEX).chain(ASSETS.iter().map(|asset| asset.body));
        for source in sources {
            for reference in source.split("/ui/").skip(1) {
                let name: String = reference
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-')
                    .collect();
                assert!(
                    ASSETS.iter().any(|asset| asset.name == name),
                    "/ui/{name} is referenced but not embedded"
                );
            }
            // SVG's namespace is a name, not an address to fetch.
            let source = source.replace("http://www.w3.org/2000/svg", "");
            for scheme in ["http://", "https://", "//cdn", "@import", "url("] {
                assert!(!source.contains(scheme), "{scheme} in an embedded file");
            }
        }
        for asset in ASSETS.iter().filter(|a| a.name.ends_with(".js")) {
            for import in asset.body.lines().filter(|l| l.starts_with("import ")) {
                let Some(from) = import.split('\'').nth(1) else {
                    continue;
                };
                let name = from.trim_start_matches("./");
                assert!(
                    ASSETS.iter().any(|a| a.name == name),
                    "{} imports {from}, which is not embedded",
                    asset.name
                );
            }
        }
    }

    #[test]
    fn the_page_stays_small() {
        // A budget, not a timing: the whole page, uncompressed.
        assert!(weight() < 64 * 1024, "the page weighs {} bytes", weight());
    }
}
