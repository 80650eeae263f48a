//! reTHINK addresses: the parts of a URL the node routes on, and the node's own well-known
//! component addresses (`domain://msg-node.<D>/…`, the registry, IdM, `mn:/session`).

/// The host of a `scheme://host[:port]/…` URL, lowercased, without port; `None` for URLs
/// without an authority (`mn:/session`).
pub fn domain(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next().unwrap_or("");
    let host = authority.rsplit('@').next().unwrap_or("");
    let host = host.split(':').next().unwrap_or("");
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

/// The scheme of a URL, lowercased.
pub fn scheme(url: &str) -> Option<String> {
    url.split_once(':')
        .map(|(s, _)| s.to_ascii_lowercase())
        .filter(|s| !s.is_empty())
}

/// The address a sub-resource belongs to, one path segment at a time:
/// `comm://d/x/changes` → `comm://d/x` → `None` (no path left to strip).
pub fn parent(url: &str) -> Option<&str> {
    let authority_end = url.find("://").map(|i| i + 3)?;
    let path_start = url[authority_end..].find('/')? + authority_end;
    let cut = url.rfind('/')?;
    (cut > path_start).then(|| &url[..cut])
}

/// Whether `url` is safe to route on: no userinfo in the authority (`a@b` is read differently
/// by different parsers), no `.`/`..` path segments — also percent-encoded (`%2e%2e`), which
/// receivers that normalise URLs read as dot segments — and no percent-encoded `/` or `\`.
pub fn is_clean(url: &str) -> bool {
    let dot_segment = |segment: &str| {
        let decoded = percent_encoding::percent_decode_str(segment).decode_utf8_lossy();
        decoded == "." || decoded == ".."
    };
    let Some((_, rest)) = url.split_once("://") else {
        // No authority (`mn:/session`): only the dot segments matter.
        return !url.split('/').any(dot_segment);
    };
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let lower = path.to_ascii_lowercase();
    !authority.contains('@')
        && !path.split('/').any(dot_segment)
        && !lower.contains("%2f")
        && !lower.contains("%5c")
        && !path.contains('\\')
}

/// Which node component an address names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    /// `MN/address-allocation`: scheme from `body.scheme` (default `hyperty`).
    Allocation,
    /// Legacy `MN/hyperty-address-allocation`: always `hyperty`.
    HypertyAllocation,
    /// Legacy `MN/object-address-allocation`: scheme from `body.scheme`.
    ObjectAllocation,
    /// `MN/sm`: the subscription manager.
    SubscriptionManager,
    /// `domain://registry.<D>`: the registry connector.
    Registry,
    /// `domain://idm.<D>`: the identity-management connector.
    Idm,
    /// `mn:/session` (and the bare MN address): session messages (`open`, `close`, pings).
    Session,
}

/// The well-known addresses of the node of domain `D`.
#[derive(Debug, Clone)]
pub struct NodeAddresses {
    domain: String,
    /// `domain://msg-node.<D>`.
    pub node: String,
    /// `domain://msg-node.<D>/sm`.
    pub subscription_manager: String,
    /// `domain://registry.<D>`.
    pub registry: String,
    /// `domain://idm.<D>`.
    pub idm: String,
}

impl NodeAddresses {
    /// The addresses of domain `domain`.
    pub fn new(domain: &str) -> Self {
        let domain = domain.to_ascii_lowercase();
        let node = format!("domain://msg-node.{domain}");
        Self {
            subscription_manager: format!("{node}/sm"),
            registry: format!("domain://registry.{domain}"),
            idm: format!("domain://idm.{domain}"),
            node,
            domain,
        }
    }

    /// The node's domain.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The component `to` names, if any.
    pub fn component(&self, to: &str) -> Option<Component> {
        if to == "mn:/session" || to == self.node {
            return Some(Component::Session);
        }
        if let Some(path) = to.strip_prefix(self.node.as_str()) {
            return match path.trim_end_matches('/') {
                "/address-allocation" => Some(Component::Allocation),
                "/hyperty-address-allocation" => Some(Component::HypertyAllocation),
                "/object-address-allocation" => Some(Component::ObjectAllocation),
                "/sm" => Some(Component::SubscriptionManager),
                _ => None,
            };
        }
        let under = |base: &str| {
            to.strip_prefix(base)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        };
        if under(&self.registry) {
            return Some(Component::Registry);
        }
        if under(&self.idm) {
            return Some(Component::Idm);
        }
        None
    }

    /// Why `url` cannot be a runtime URL: it must be `runtime://<domain>/<path>` or
    /// `hyperty-runtime://<domain>/<path>`, written canonically (lowercase host, no port,
    /// 1 to [`MAX_RUNTIME_SEGMENTS`] path segments of letters, digits and `. _ ~ -`, none of
    /// them `.` or `..`), so it can never name a node component or an allocated address.
    /// Whether it nests in (or over) someone else's runtime is the table's call: a runtime
    /// URL or claimed address is its first principal's, and so is everything under it. The
    /// domain is usually this node's; a runtime of another domain may use this node too (it
    /// owns only that URL and what lies under it). The caller refuses the domains of
    /// configured peers.
    ///
    /// A [`SHARED_ROOTS`] segment alone (`hyperty-runtime://D/protostub`) is refused: it is
    /// the namespace every runtime's stubs share, and whoever held it would hold all of them.
    pub fn runtime_url_problem(&self, url: &str) -> Option<String> {
        if url.len() > super::message::MAX_URL_BYTES {
            return super::message::url_problem("the runtime URL", url);
        }
        if let Some(problem) = canonical_problem(url, &["runtime", "hyperty-runtime"], &self.domain)
        {
            return Some(problem);
        }
        let path = url
            .split_once("://")
            .and_then(|(_, rest)| rest.split_once('/'));
        match path {
            Some((_, root)) if SHARED_ROOTS.contains(&root) => Some(format!(
                "{url:?} is the namespace every runtime's stubs share: use {url}/<id>"
            )),
            _ => None,
        }
    }

    /// Why `url` cannot be claimed as a hyperty address: as [`Self::runtime_url_problem`],
    /// with the scheme `hyperty`.
    pub fn hyperty_url_problem(&self, url: &str) -> Option<String> {
        canonical_problem(url, &["hyperty"], &self.domain)
    }

    /// Whether `url` belongs to this node's domain (or one of its direct subdomains, such as
    /// `msg-node.<D>`).
    pub fn is_local(&self, url: &str) -> bool {
        match domain(url) {
            None => true,
            Some(d) => {
                d == self.domain
                    || d.split_once('.')
                        .is_some_and(|(_, parent)| parent == self.domain)
            }
        }
    }
}

/// First path segments that name a namespace shared by every runtime, not one runtime
/// (the reference stubs are all `hyperty-runtime://D/protostub/<n>`): a runtime URL or
/// claim must go below them, since an address is its holder's with everything under it.
pub const SHARED_ROOTS: &[&str] = &["protostub"];

/// Most path segments of a runtime URL (or a claimed address).
pub const MAX_RUNTIME_SEGMENTS: usize = 8;

/// Why `url` is not `<scheme>://<host>/<segment>[/<segment>…]` written canonically with one of
/// `schemes` (see [`NodeAddresses::runtime_url_problem`]); `domain` only names the form.
fn canonical_problem(url: &str, schemes: &[&str], domain: &str) -> Option<String> {
    let form = || {
        Some(format!(
            "{url:?} must be {}://{domain}/<id>[/<id>…], each <id> of letters, digits and . _ ~ - \
             (at most {MAX_RUNTIME_SEGMENTS})",
            schemes.join("|")
        ))
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        return form();
    };
    if !schemes.contains(&scheme) {
        return form();
    }
    let Some((authority, path)) = rest.split_once('/') else {
        return form();
    };
    let host_ok = !authority.is_empty()
        && authority
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && !authority.starts_with(['.', '-'])
        && !authority.ends_with(['.', '-'])
        && !authority.starts_with("msg-node.")
        && !authority.starts_with("registry.")
        && !authority.starts_with("idm.");
    if !host_ok {
        return Some(format!(
            "{url:?}: the host must be a domain name in lowercase, without a port"
        ));
    }
    let segment_ok = |id: &str| {
        !id.is_empty()
            && id != "."
            && id != ".."
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-'))
    };
    let segments = path.split('/').count();
    if segments > MAX_RUNTIME_SEGMENTS || !path.split('/').all(segment_ok) {
        return form();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_and_parents() {
        assert_eq!(
            domain("hyperty://Localhost:8443/abc/changes").as_deref(),
            Some("localhost")
        );
        assert_eq!(domain("mn:/session"), None);
        assert_eq!(parent("comm://d/x/changes"), Some("comm://d/x"));
        assert_eq!(parent("comm://d/x"), None);
        assert_eq!(parent("runtime://d/r/sm/a"), Some("runtime://d/r/sm"));
        assert_eq!(scheme("HYPERTY://d/x").as_deref(), Some("hyperty"));
    }

    #[test]
    fn components() {
        let n = NodeAddresses::new("localhost");
        assert_eq!(
            n.component("domain://msg-node.localhost/address-allocation"),
            Some(Component::Allocation)
        );
        assert_eq!(
            n.component("domain://msg-node.localhost/hyperty-address-allocation"),
            Some(Component::HypertyAllocation)
        );
        assert_eq!(
            n.component("domain://msg-node.localhost/object-address-allocation"),
            Some(Component::ObjectAllocation)
        );
        assert_eq!(
            n.component("domain://msg-node.localhost/sm"),
            Some(Component::SubscriptionManager)
        );
        assert_eq!(
            n.component("domain://registry.localhost"),
            Some(Component::Registry)
        );
        assert_eq!(n.component("domain://idm.localhost"), Some(Component::Idm));
        assert_eq!(n.component("mn:/session"), Some(Component::Session));
        assert_eq!(n.component("domain://msg-node.localhost/nothing"), None);
        assert_eq!(n.component("hyperty://localhost/x"), None);
        assert!(n.is_local("hyperty://localhost/x"));
        assert!(n.is_local("domain://registry.localhost"));
        assert!(!n.is_local("hyperty://other.example/x"));
    }

    #[test]
    fn runtime_urls() {
        let n = NodeAddresses::new("localhost");
        assert_eq!(n.runtime_url_problem("runtime://localhost/abc"), None);
        assert_eq!(n.runtime_url_problem("runtime://other.example/abc"), None);
        assert_eq!(
            n.runtime_url_problem("runtime://localhost/Subscriber/7"),
            None
        );
        assert_eq!(
            n.runtime_url_problem("hyperty-runtime://localhost/protostub/1/registry/allocation"),
            None
        );
        assert_eq!(n.hyperty_url_problem("hyperty://localhost/0f9d-2a61"), None);
        assert!(n.hyperty_url_problem("runtime://localhost/x").is_some());
        // The stubs' shared namespace, alone, is nobody's.
        assert!(n
            .runtime_url_problem("hyperty-runtime://localhost/protostub")
            .is_some_and(|p| p.contains("share")));
        assert!(n
            .runtime_url_problem("runtime://localhost/protostub")
            .is_some());
        assert_eq!(
            n.runtime_url_problem("hyperty-runtime://localhost/protostub/7"),
            None
        );
        assert_eq!(
            n.runtime_url_problem("hyperty-runtime://localhost/abc"),
            None
        );
        for bad in [
            "hyperty://localhost/abc",
            "domain://msg-node.localhost/sm",
            "domain://msg-node.peer.example",
            "runtime://localhost",
            "runtime://localhost/",
            "runtime://localhost/a//b",
            "runtime://localhost/a/",
            "runtime://localhost/a/../b",
            "runtime://localhost/1/2/3/4/5/6/7/8/9",
            "runtime://x@localhost/a",
            "runtime://localhost/..",
            "RUNTIME://localhost/abc",
            "runtime://LOCALHOST/abc",
            "runtime://localhost:443/abc",
            "runtime://localhost/abc?",
            "runtime://localhost/abc#f",
            "runtime://localhost/abc%2e",
        ] {
            assert!(n.runtime_url_problem(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn clean_urls() {
        assert!(is_clean("hyperty://localhost/a/changes"));
        assert!(is_clean("mn:/session"));
        for bad in [
            "hyperty://localhost:1@peer.example/x",
            "hyperty://localhost/mine/../alice",
            "hyperty://localhost/a/./b",
            "hyperty://localhost/a%2Fb",
            "hyperty://localhost/a%5cb",
            "hyperty://localhost/mine/%2e%2e/alice",
            "hyperty://localhost/mine/%2E%2e/alice",
            "hyperty://localhost/a/%2e/b",
            "hyperty://localhost/mine/.%2e/alice",
            "mn:/x/%2e%2e/y",
        ] {
            assert!(!is_clean(bad), "{bad}");
        }
    }
}
