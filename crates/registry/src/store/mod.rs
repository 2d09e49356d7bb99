//! Stores behind the registry, chosen by URL. The memory store is the
//! registry's own state (see [`crate::registry`]); the Redis store mirrors a
//! shared Redis into it.

pub(crate) mod redis;

/// `url` with its userinfo (user and password) replaced by `***`.
/// Hand-written because the `url` crate would reject the very URLs whose
/// errors need it.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) => format!("{scheme}://***{}", &rest[at..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::redact_url;

    #[test]
    fn userinfo_is_hidden() {
        assert_eq!(
            redact_url("redis://:hunter2@127.0.0.1:6379/0"),
            "redis://***@127.0.0.1:6379/0"
        );
        assert_eq!(redact_url("redis://u:p@h:1?x=@"), "redis://***@h:1?x=@");
        assert_eq!(redact_url("redis://h:1/0"), "redis://h:1/0");
        assert_eq!(redact_url("memory://"), "memory://");
        assert_eq!(redact_url("not a url"), "not a url");
    }

    proptest! {
        #[test]
        fn a_password_never_survives(
            scheme in "[a-z+]{1,8}",
            user in "[a-zA-Z0-9]{0,8}",
            password in "[a-zA-Z0-9@:%]{6,20}",
            host in "[a-z0-9.]{1,20}(:[0-9]{1,5})?",
            rest in "(/[a-z0-9?=&@]{0,10})?",
        ) {
            let url = format!("{scheme}://{user}:{password}@{host}{rest}");
            let shown = redact_url(&url);
            prop_assert_eq!(shown, format!("{scheme}://***@{host}{rest}"));
        }
    }
}
