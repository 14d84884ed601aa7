//! Secrets: which settings hold one, where they may come from, and how they
//! are kept out of what the programs print.
//!
//! A secret comes from the environment or a file, never from a flag: the
//! command line of every process is readable by every user of the machine
//! (`ps`, `/proc/PID/cmdline`). [`refuse_on_command_line`] turns such a
//! flag away with where to put the value instead; the rest of the crate
//! prints URLs through [`redact_url`] and librdkafka properties through
//! [`redact_property`].

use std::ffi::OsStr;

use clap::parser::ValueSource;
use clap::ArgMatches;

use crate::error::{Error, Result};

/// What is printed in place of a secret.
pub const REDACTED: &str = "<redacted>";

/// The Redis password, when the URL carries none.
pub const REDIS_PASSWORD_ENV: &str = "CRYPTOPULSE_REDIS_PASSWORD";
/// For `rediss://`: the CA certificate (PEM) to trust instead of the
/// system's, and a client certificate and its key (PEM) for servers that
/// ask for one. Paths, from the environment.
pub const REDIS_CA_FILE_ENV: &str = "CRYPTOPULSE_REDIS_CA_FILE";
pub const REDIS_CERT_FILE_ENV: &str = "CRYPTOPULSE_REDIS_CERT_FILE";
pub const REDIS_KEY_FILE_ENV: &str = "CRYPTOPULSE_REDIS_KEY_FILE";

/// Whether a librdkafka property holds a secret: passwords, client secrets,
/// a private key in PEM, SASL/JAAS and OAuth settings that embed one.
pub fn is_secret_property(key: &str) -> bool {
    let key = key.trim().to_ascii_lowercase();
    ["password", "secret", "jaas", "token"].iter().any(|word| key.contains(word))
        || key == "ssl.key.pem"
        || key == "sasl.oauthbearer.config"
}

/// `value`, or [`REDACTED`] when `key` names a secret.
pub fn redact_property<'a>(key: &str, value: &'a str) -> &'a str {
    if is_secret_property(key) {
        REDACTED
    } else {
        value
    }
}

/// `url` with the password of its user part replaced: `redis://:pw@host` ->
/// `redis://:<redacted>@host`. A URL without one is returned as it is.
pub fn redact_url(url: &str) -> String {
    match password_span(url) {
        Some((from, to)) => format!("{}{REDACTED}{}", &url[..from], &url[to..]),
        None => url.to_owned(),
    }
}

/// Where the password of `url`'s user part is (byte range), if it has one.
fn password_span(url: &str) -> Option<(usize, usize)> {
    let authority_start = url.find("://")? + 3;
    let rest = &url[authority_start..];
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let at = rest[..authority_len].rfind('@')?;
    let colon = rest[..at].find(':')?;
    (colon + 1 < at).then_some((authority_start + colon + 1, authority_start + at))
}

/// A secret from the environment: `NAME`, or the contents of the file
/// named by `NAME_FILE` (a trailing newline dropped), or none.
pub fn from_env(name: &str) -> Result<Option<String>> {
    if let Some(value) = std::env::var_os(name) {
        return value.into_string().map(Some).map_err(|_| Error::Config(format!("{name} is not valid UTF-8")));
    }
    let file_var = format!("{name}_FILE");
    let Some(path) = std::env::var_os(&file_var) else { return Ok(None) };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::Config(format!("{file_var}: cannot read {}: {e}", std::path::Path::new(&path).display())))?;
    Ok(Some(text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(&text).to_owned()))
}

/// An error for every flag given on the command line that carries a
/// secret: a URL with a password, or `-X` with a secret property. Values
/// from the environment twins are fine.
pub fn refuse_on_command_line(matches: &ArgMatches) -> std::result::Result<(), String> {
    for id in matches.ids() {
        let id = id.as_str();
        if matches.value_source(id) != Some(ValueSource::CommandLine) {
            continue;
        }
        let Ok(Some(values)) = matches.try_get_raw(id) else { continue };
        for value in values.filter_map(OsStr::to_str) {
            if password_span(value).is_some() {
                return Err(format!(
                    "--{} carries a password in its URL, which every user of this machine can read on the command line; \
                     put the URL in its environment variable instead (see --help), or, for Redis, the password alone in \
                     {REDIS_PASSWORD_ENV} or a file named by {REDIS_PASSWORD_ENV}_FILE",
                    id.replace('_', "-")
                ));
            }
            if id == "properties" {
                if let Some((key, _)) = value.split_once('=').filter(|(key, _)| is_secret_property(key)) {
                    return Err(format!(
                        "-X {} holds a secret, which every user of this machine can read on the command line; put it in \
                         the file named by CRYPTOPULSE_KAFKA_CONFIG_FILE (or in CRYPTOPULSE_KAFKA_PROPERTIES)",
                        key.trim()
                    ));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_password_and_nothing_else() {
        for (url, shown) in [
            ("redis://:s3cret@host:6379/0", "redis://:<redacted>@host:6379/0"),
            ("rediss://user:p@ss@host", "rediss://user:<redacted>@host"),
            ("http://admin:pw@grafana:3000/api?x=@y", "http://admin:<redacted>@grafana:3000/api?x=@y"),
            ("redis://user@host", "redis://user@host"),
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            ("redis://host/path@x:y", "redis://host/path@x:y"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn secret_properties_are_known_by_name() {
        for key in [
            "sasl.password",
            "ssl.key.password",
            "ssl.keystore.password",
            "sasl.oauthbearer.client.secret",
            " SSL.KEY.PEM ",
            "sasl.oauthbearer.config",
        ] {
            assert!(is_secret_property(key), "{key}");
            assert_eq!(redact_property(key, "hunter2"), REDACTED);
        }
        for key in ["sasl.username", "security.protocol", "ssl.ca.location", "sasl.mechanism", "ssl.key.location"] {
            assert!(!is_secret_property(key), "{key}");
            assert_eq!(redact_property(key, "x"), "x");
        }
    }

    fn matches(args: &[&str]) -> ArgMatches {
        clap::Command::new("t")
            .arg(clap::Arg::new("properties").short('X').action(clap::ArgAction::Append))
            .arg(clap::Arg::new("redis_url").long("redis-url"))
            .try_get_matches_from(args)
            .expect("parse")
    }

    #[test]
    fn secrets_on_the_command_line_are_refused_with_where_to_put_them() {
        let err = refuse_on_command_line(&matches(&["t", "-X", "acks=all", "-X", "sasl.password=hunter2"])).unwrap_err();
        assert!(err.contains("-X sasl.password holds a secret") && err.contains("CRYPTOPULSE_KAFKA_CONFIG_FILE"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        let err = refuse_on_command_line(&matches(&["t", "--redis-url", "redis://:hunter2@h:6379"])).unwrap_err();
        assert!(err.contains("--redis-url carries a password") && err.contains(REDIS_PASSWORD_ENV), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        assert_eq!(refuse_on_command_line(&matches(&["t", "-X", "sasl.username=u", "--redis-url", "redis://h:6379"])), Ok(()));
    }

    #[test]
    fn secrets_from_elsewhere_are_fine() {
        // Only the command line is refused; the environment twin (like a
        // default here) is not.
        let matches = clap::Command::new("t")
            .arg(clap::Arg::new("properties").short('X').action(clap::ArgAction::Append).default_value("sasl.password=hunter2"))
            .try_get_matches_from(["t"])
            .expect("parse");
        assert_eq!(refuse_on_command_line(&matches), Ok(()));
    }
}
