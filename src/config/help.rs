//! The `[default: …]` texts of `--help`, read from `default.toml` at run time.
//!
//! Doc comments of options carry no default: the value shown is the one
//! [`DEFAULT_TOML`] sets, so the two cannot disagree. Clap's own
//! `default_value` is not used, because it would make every option look set
//! on the command line and win over the config file.

use std::collections::HashMap;
use std::path::Path;

use super::{parse_toml, ConfigError, BUILT_IN, DEFAULT_TOML};

/// Appends ` [default: VALUE]` to the help of every argument, in `command`
/// and all its subcommands, whose id is an option `default.toml` sets to a
/// value (not to an empty list).
pub fn with_defaults_in_help(command: clap::Command) -> Result<clap::Command, ConfigError> {
    let table: toml::Table = parse_toml(DEFAULT_TOML, Path::new(BUILT_IN))?;
    let shown: HashMap<String, String> = table
        .iter()
        .filter_map(|(key, value)| shown_default(value).map(|text| (key.clone(), text)))
        .collect();
    Ok(add_defaults(command, &shown))
}

/// `command` with the defaults in `shown` (by argument id) added to its help.
fn add_defaults(command: clap::Command, shown: &HashMap<String, String>) -> clap::Command {
    command
        .mut_args(|arg| match shown.get(arg.get_id().as_str()) {
            None => arg,
            Some(value) => {
                let suffix = format!("[default: {value}]");
                let help = with_suffix(arg.get_help().map(ToString::to_string), &suffix);
                match arg.get_long_help().map(ToString::to_string) {
                    None => arg.help(help),
                    Some(long) => arg.help(help).long_help(with_suffix(Some(long), &suffix)),
                }
            }
        })
        .mut_subcommands(|sub| add_defaults(sub, shown))
}

/// `help` followed by `suffix`, a space between them.
fn with_suffix(help: Option<String>, suffix: &str) -> String {
    match help {
        Some(help) if !help.is_empty() => format!("{help} {suffix}"),
        _ => suffix.to_string(),
    }
}

/// How a default is written after `default:`; None for what has no single
/// value to show (an empty string or list, a table).
fn shown_default(value: &toml::Value) -> Option<String> {
    use toml::Value;
    match value {
        Value::String(text) if text.is_empty() => None,
        Value::String(text) => Some(text.clone()),
        Value::Array(items) if items.is_empty() => None,
        Value::Array(items) => items
            .iter()
            .map(shown_default)
            .collect::<Option<Vec<_>>>()
            .map(|items| items.join(",")),
        Value::Table(_) => None,
        other => Some(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;
    use clap::Args;

    fn settings_command() -> clap::Command {
        Settings::augment_args(clap::Command::new("serve"))
    }

    fn help_of(command: &clap::Command, id: &str) -> String {
        command
            .get_arguments()
            .find(|a| a.get_id() == id)
            .and_then(|a| a.get_help())
            .map(ToString::to_string)
            .unwrap_or_default()
    }

    #[test]
    fn shown_default_writes_values_as_a_user_types_them() {
        let table: toml::Table = toml::from_str(
            "s = \"127.0.0.1:3128\"\nn = 30\nb = false\nempty = []\n\
             list = [\"a\", \"b\"]\nnums = [1, 2]\n[t]\nx = 1",
        )
        .unwrap();
        let cases = [
            ("s", Some("127.0.0.1:3128")),
            ("n", Some("30")),
            ("b", Some("false")),
            ("empty", None),
            ("list", Some("a,b")),
            ("nums", Some("1,2")),
            ("t", None),
        ];
        for (key, want) in cases {
            assert_eq!(
                shown_default(&table[key]).as_deref(),
                want,
                "default shown for {key}"
            );
        }
    }

    #[test]
    fn doc_comments_carry_no_default() {
        for arg in settings_command().get_arguments() {
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            assert!(
                !help.contains("[default:"),
                "--{}: the default belongs in default.toml, not in the doc comment: {help}",
                arg.get_id()
            );
        }
    }

    #[test]
    fn every_option_set_in_default_toml_shows_that_value_in_help() {
        let command = with_defaults_in_help(settings_command()).unwrap();
        let cases = [
            ("listen", Some("127.0.0.1:3128")),
            ("ca_dir", Some("certs")),
            ("other_hosts", Some("tunnel")),
            ("log_format", Some("text")),
            ("shutdown_grace", Some("30")),
            ("client_idle_timeout", Some("30")),
            ("cert_cache", Some("1000")),
            ("cache_dir", Some("cache")),
            ("tag_ttl", Some("60")),
            ("verify_reads", Some("first")),
            ("public_ttl", Some("600")),
            ("auth_ttl", Some("300")),
            ("offline", Some("false")),
            ("offline_share_private", Some("false")),
            ("shared_single_flight", Some("true")),
            // Unset or empty in default.toml: no default to show.
            ("ca_cert", None),
            ("cache_size", None),
            ("allow", None),
            ("intercept", None),
            ("mirror_tls", None),
            ("metrics_listen", None),
            ("shared_store", None),
            ("peer_listen", None),
            ("peer_advertise", None),
        ];
        for (id, want) in cases {
            let help = help_of(&command, id);
            let shown = help.matches("[default:").count();
            match want {
                Some(value) => assert!(
                    help.ends_with(&format!(" [default: {value}]")) && shown == 1,
                    "--{id}: {help:?}"
                ),
                None => assert_eq!(shown, 0, "--{id}: {help:?}"),
            }
        }
    }

    #[test]
    fn defaults_reach_subcommands_and_long_help() {
        let sub = clap::Command::new("ca").arg(
            clap::Arg::new("ca_dir")
                .long("ca-dir")
                .help("Directory")
                .long_help("Directory.\n\nMore."),
        );
        let command = with_defaults_in_help(clap::Command::new("top").subcommand(sub)).unwrap();
        let arg = command
            .find_subcommand("ca")
            .and_then(|c| c.get_arguments().find(|a| a.get_id() == "ca_dir"))
            .unwrap();
        assert_eq!(
            arg.get_help().map(ToString::to_string).as_deref(),
            Some("Directory [default: certs]")
        );
        assert_eq!(
            arg.get_long_help().map(ToString::to_string).as_deref(),
            Some("Directory.\n\nMore. [default: certs]")
        );
    }
}
