//! Connection URLs made safe to show in errors, logs, metrics and the
//! dashboard: the one rule every crate uses.
//!
//! [`redact_url`] replaces the userinfo (`user:password@`) with `***@`,
//! replaces the value of every query parameter whose name looks like a
//! credential (it contains `pass`, `pwd`, `secret`, `token`, `key`, `auth`,
//! `cred` or `sig`, in any case) with `***`, and drops the fragment. Scheme,
//! host, port, path and the other query parameters stay, so an error still
//! says which server and which options were meant.
//!
//! Hand-written rather than on the `url` crate: the URLs whose errors need
//! redacting are often the ones `url` rejects (a password with an unescaped
//! `/` or `?`, a bracket left open), and those must lose their secret too.

/// Query parameter names (lowercased substrings) whose values are hidden.
const SECRET_KEYS: [&str; 8] = [
    "pass", "pwd", "secret", "token", "key", "auth", "cred", "sig",
];

/// `url` with its userinfo, credential-like query values and fragment hidden:
/// `redis://user:pw@h:6379/0?password=x&db=1#f` becomes
/// `redis://***@h:6379/0?password=***&db=1`. Text without `://` is treated
/// the same way (an `@` before the path still marks userinfo).
///
/// When in doubt it hides too much rather than too little: userinfo runs to
/// the last `@` anywhere, so a password holding an unescaped `/`, `?`, `#`
/// or `@` is hidden whole; the price is that an `@` in a path or query value
/// hides everything before it as well.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, url),
    };
    let mut out = String::with_capacity(url.len());
    if let Some(s) = scheme {
        out.push_str(s);
        out.push_str("://");
    }
    let rest = match rest.rfind('@') {
        Some(at) => {
            out.push_str("***");
            &rest[at..]
        }
        None => rest,
    };
    let rest = rest.split_once('#').map_or(rest, |(before, _)| before);
    let Some((head, query)) = rest.split_once('?') else {
        out.push_str(rest);
        return out;
    };
    out.push_str(head);
    out.push('?');
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        match pair.split_once('=') {
            Some((k, _)) if is_secret_key(k) => {
                out.push_str(k);
                out.push_str("=***");
            }
            _ => out.push_str(pair),
        }
    }
    out
}

fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    SECRET_KEYS.iter().any(|s| key.contains(s))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::redact_url;

    #[test]
    fn userinfo_password_is_removed() {
        assert_eq!(
            redact_url("redis://:hunter2@127.0.0.1:6379/0?block=5ms"),
            "redis://***@127.0.0.1:6379/0?block=5ms"
        );
        assert_eq!(
            redact_url("redis://user:s3cret@10.0.0.1:6379/0"),
            "redis://***@10.0.0.1:6379/0"
        );
        assert_eq!(redact_url("nats://tok@h:4222"), "nats://***@h:4222");
        // Unescaped `/`, `?`, `#` or `@` inside the password: hidden whole.
        assert_eq!(redact_url("redis://u:pa/ss@h:1/0"), "redis://***@h:1/0");
        assert_eq!(redact_url("redis://u:pa?ss@h:1"), "redis://***@h:1");
        assert_eq!(redact_url("redis://u:pa#ss@h:1"), "redis://***@h:1");
        assert_eq!(redact_url("redis://u:p@ss@h:1"), "redis://***@h:1");
        assert_eq!(redact_url("a:b@host/x"), "***@host/x");
    }

    #[test]
    fn query_secrets_are_hidden_and_other_options_kept() {
        assert_eq!(
            redact_url("redis://h:6379/0?password=x&db=1"),
            "redis://h:6379/0?password=***&db=1"
        );
        assert_eq!(
            redact_url("nats://h:4222?Token=abc&name=x&api_key=k&AUTH=a&sig="),
            "nats://h:4222?Token=***&name=x&api_key=***&AUTH=***&sig=***"
        );
        // An `@` in a query value hides what comes before it too.
        assert_eq!(redact_url("redis://h:1/0?x=a@b"), "redis://***@b");
        assert_eq!(redact_url("redis://h:1?flag&&x="), "redis://h:1?flag&&x=");
    }

    #[test]
    fn fragments_go_and_plain_text_stays() {
        assert_eq!(redact_url("memory://shop#frag"), "memory://shop");
        assert_eq!(redact_url("memory://"), "memory://");
        assert_eq!(redact_url("memory://shop"), "memory://shop");
        assert_eq!(redact_url("not a url"), "not a url");
        assert_eq!(redact_url(""), "");
    }

    proptest! {
        #[test]
        fn no_secret_survives(
            scheme in "[a-z+]{1,10}",
            user in "[a-zA-Z0-9]{0,8}",
            password in "[a-zA-Z0-9@:%/?#&=]{12,20}",
            host in "[a-z0-9.]{1,20}(:[0-9]{1,5})?",
            path in "(/[a-z0-9]{0,8}){0,2}",
            key in "(password|token|secret|authKey)",
            query_secret in "[a-zA-Z0-9]{12,20}",
            option in "[a-j]{1,5}=[a-z0-9]{0,5}",
        ) {
            let url = format!(
                "{scheme}://{user}:{password}@{host}{path}?{option}&{key}={query_secret}"
            );
            let shown = redact_url(&url);
            prop_assert!(!shown.contains(&password), "{shown}");
            prop_assert!(!shown.contains(&query_secret), "{shown}");
            {
                // The password is the only thing removed.
                prop_assert_eq!(
                    shown,
                    format!("{scheme}://***@{host}{path}?{option}&{key}=***")
                );
            }
        }

        #[test]
        fn urls_without_secrets_are_unchanged(
            scheme in "[a-z+]{1,10}",
            host in "[a-z0-9.]{1,20}(:[0-9]{1,5})?",
            path in "(/[a-z0-9]{0,8}){0,2}",
            query in "(\\?[a-j]{1,5}=[a-z0-9]{0,5}(&[a-j]{1,5}=[a-z0-9]{0,5}){0,3})?",
        ) {
            let url = format!("{scheme}://{host}{path}{query}");
            prop_assert_eq!(redact_url(&url), url);
        }

        #[test]
        fn never_panics(s in "\\PC{0,60}") {
            let _ = redact_url(&s);
        }
    }
}
