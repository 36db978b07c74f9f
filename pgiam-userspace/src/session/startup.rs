//! Which of the client's startup parameters reach the server, decided without I/O.
//!
//! The client's `user` never does: pgiam logs in as the mapped role. Anything that could change
//! the session's identity is refused outright, whichever of PostgreSQL's spellings it uses:
//! a `role` or `session_authorization` parameter, the same inside `options` (`-c role=x`,
//! `-crole=x`, `--role=x`, `--session-authorization=x`, any case), and replication.
//!
//! A search_path the client chooses (a `search_path` parameter or `-c search_path=` in
//! `options`) is taken out of both and sent as the one `search_path` parameter in place of
//! `[policy] search_path`, so the value the server starts with is the one pgiam authorizes
//! names against (and what RESET returns to); a role's or database's default never applies.

use crate::identity::Identity;
use crate::wire::{PgError, StartupMessage};

/// The startup as pgiam will present it upstream.
#[derive(Debug, PartialEq, Eq)]
pub struct Checked {
    pub database: String,
    /// Parameters for the server, `user` excluded; `options` rebuilt from what was parsed.
    pub forwarded: Vec<(String, String)>,
    pub negotiation: Option<Negotiation>,
    /// The search_path the client chose at startup, as PostgreSQL would apply it (its last
    /// `search_path` parameter, else the last `-c search_path=` in `options`), checked to be a
    /// list pgiam reads as the server does: the value, and the schemas it names. Not in
    /// `forwarded`: see [`Checked::search_path_setting`].
    pub search_path: Option<(String, Vec<String>)>,
}

impl Checked {
    /// The `search_path` parameter to log in with: the client's choice, else
    /// `[policy] search_path`. Sent after `forwarded`, it is the value the session starts with.
    pub fn search_path_setting(&self, policy: &crate::config::PolicyConfig) -> String {
        match &self.search_path {
            Some((value, _)) => value.clone(),
            None => policy.search_path_setting(),
        }
    }

    /// How the session's names resolve at first: against the search_path it logs in with
    /// ([`Checked::search_path_setting`]), `$user` being `role`.
    pub fn resolver(
        &self,
        policy: &crate::config::PolicyConfig,
        role: &str,
    ) -> crate::policy::Resolver {
        match &self.search_path {
            Some((_, names)) => {
                let mut r = crate::policy::Resolver::new(names, role);
                r.chosen_at_startup = true;
                r
            }
            None => crate::policy::Resolver::new(&policy.search_path, role),
        }
    }
}

/// The client asked for a newer protocol minor or for protocol options: pgiam answers with
/// NegotiateProtocolVersion (3.0, these options unrecognized).
#[derive(Debug, PartialEq, Eq)]
pub struct Negotiation {
    pub unrecognized: Vec<String>,
}

/// GUC names that change who the session acts as.
const IDENTITY_SETTINGS: &[&str] = &["role", "session_authorization"];

/// PostgreSQL looks GUC names up case-insensitively, and `--a-b=c` in `options` means `a_b`.
fn normalize(name: &str) -> String {
    name.to_ascii_lowercase().replace('-', "_")
}

fn refuse_identity_change(how: &str) -> PgError {
    PgError::fatal(
        "42501",
        format!("pgiam: changing the session's role at startup is not allowed ({how})"),
    )
    .with_hint("pgiam chooses the database role from the client's verified identity")
}

/// A startup search_path pgiam accepts: one it reads as the server will, naming no more
/// schemas than a session may.
fn check_search_path(value: &str) -> Result<Vec<String>, PgError> {
    let names = crate::sql::parse_search_path(value).ok_or_else(|| {
        PgError::fatal(
            "22023",
            format!("pgiam: invalid value for parameter \"search_path\": {value:?}"),
        )
        .with_hint("a comma-separated list of schema names, double-quoted where needed")
    })?;
    if names.len() > crate::policy::Resolver::MAX_SCHEMAS {
        return Err(PgError::fatal(
            "22023",
            format!(
                "pgiam: search_path names more than {} schemas",
                crate::policy::Resolver::MAX_SCHEMAS
            ),
        ));
    }
    Ok(names)
}

pub fn unsafe_encoding(value: &str) -> PgError {
    PgError::fatal(
        "22023",
        format!("pgiam: client_encoding {value:?} is not supported"),
    )
    .with_hint(
        "its multibyte characters can contain ASCII bytes, so statements would split \
         differently on the server; use UTF8",
    )
}

pub fn check(m: StartupMessage) -> Result<Checked, PgError> {
    let mut negotiation = (m.minor > 0).then(|| Negotiation {
        unrecognized: Vec::new(),
    });
    let user = m
        .param("user")
        .filter(|u| !u.is_empty())
        .ok_or_else(|| {
            PgError::fatal(
                "28000",
                "no PostgreSQL user name specified in startup packet",
            )
        })?
        .to_owned();
    let mut database = None;
    let mut forwarded = Vec::with_capacity(m.params.len());
    // PostgreSQL applies `options` first, then the other parameters in order: the last
    // `search_path` parameter wins, else the last one in `options`.
    let mut search_path_param = None;
    let mut search_path_option = None;
    for (name, value) in m.params {
        let norm = normalize(&name);
        match norm.as_str() {
            "user" => {}
            "database" => database = Some(value),
            "replication" => {
                if !is_false(&value) {
                    return Err(PgError::fatal(
                        "42501",
                        "pgiam: replication connections are not allowed",
                    ));
                }
            }
            "options" => {
                let settings = parse_options(&value)?;
                let mut kept = Vec::with_capacity(settings.len());
                for (name, value) in settings {
                    if name == "search_path" {
                        let names = check_search_path(&value)?;
                        search_path_option = Some((value, names));
                    } else {
                        kept.push((name, value));
                    }
                }
                let settings = kept;
                if !settings.is_empty() {
                    forwarded.push(("options".to_owned(), encode_options(&settings)));
                }
            }
            "search_path" => {
                let names = check_search_path(&value)?;
                search_path_param = Some((value, names));
            }
            "client_encoding" if crate::sql::is_unsafe_encoding(&value) => {
                return Err(unsafe_encoding(&value))
            }
            n if IDENTITY_SETTINGS.contains(&n) => {
                return Err(refuse_identity_change(&format!(
                    "startup parameter {name:?}"
                )))
            }
            _ if name.starts_with("_pq_.") => {
                negotiation
                    .get_or_insert_with(|| Negotiation {
                        unrecognized: Vec::new(),
                    })
                    .unrecognized
                    .push(name);
            }
            _ => forwarded.push((name, value)),
        }
    }
    // As in PostgreSQL, the database defaults to the user name the client gave.
    let database = database.filter(|d| !d.is_empty()).unwrap_or(user);
    forwarded.insert(0, ("database".to_owned(), database.clone()));
    Ok(Checked {
        database,
        forwarded,
        negotiation,
        search_path: search_path_param.or(search_path_option),
    })
}

fn is_false(v: &str) -> bool {
    matches!(
        v.to_ascii_lowercase().as_str(),
        "false" | "off" | "no" | "0" | "f" | "n"
    )
}

/// Splits `options` as PostgreSQL's `pg_split_opts` does (whitespace separates, a backslash
/// escapes the next character) and accepts only `-c name=value` / `-cname=value` /
/// `--name=value`. Other backend switches are refused rather than passed on unexamined.
pub fn parse_options(options: &str) -> Result<Vec<(String, String)>, PgError> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_ascii_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\\' => {
                in_word = true;
                if let Some(next) = chars.next() {
                    word.push(next);
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }

    let bad = |w: &str| {
        PgError::fatal("42601", format!("pgiam: unsupported startup option {w:?}"))
            .with_hint("only -c name=value and --name=value are accepted in options")
    };
    let mut settings = Vec::new();
    let mut words = words.into_iter();
    while let Some(w) = words.next() {
        let setting = if w == "-c" {
            words.next().ok_or_else(|| bad(&w))?
        } else if let Some(s) = w.strip_prefix("--") {
            s.to_owned()
        } else if let Some(s) = w.strip_prefix("-c") {
            s.to_owned()
        } else {
            return Err(bad(&w));
        };
        let (name, value) = setting.split_once('=').ok_or_else(|| bad(&setting))?;
        let name = normalize(name);
        // Only a well-formed GUC name can reach the server, so what it looks up is what was
        // checked here.
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        {
            return Err(bad(&setting));
        }
        if IDENTITY_SETTINGS.contains(&name.as_str()) {
            return Err(refuse_identity_change(&format!("options {setting:?}")));
        }
        if name == "search_path" {
            check_search_path(value)?;
        }
        if name == "client_encoding" && crate::sql::is_unsafe_encoding(value) {
            return Err(unsafe_encoding(value));
        }
        settings.push((name, value.to_owned()));
    }
    Ok(settings)
}

/// Rebuilds `options` from parsed settings, so the server parses exactly what pgiam checked.
fn encode_options(settings: &[(String, String)]) -> String {
    let escape = |s: &str| {
        let mut out = String::with_capacity(s.len());
        for c in s.chars() {
            if c == '\\' || c.is_ascii_whitespace() {
                out.push('\\');
            }
            out.push(c);
        }
        out
    };
    settings
        .iter()
        .map(|(n, v)| format!("-c {}={}", escape(n), escape(v)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The refusal for an identity that no mapping covers. It tells the client who pgiam thinks
/// it is (that is its own identity), never what the configuration would have allowed.
pub fn no_mapping(identity: &Identity, database: &str) -> PgError {
    PgError::fatal(
        "28000",
        format!("pgiam: no database role is mapped for this client on database \"{database}\""),
    )
    .with_detail(format!("client identity: {identity}"))
    .with_hint("ask the operator to add a [[mapping]] for one of this client's principals")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(params: &[(&str, &str)]) -> StartupMessage {
        StartupMessage {
            minor: 0,
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn user_is_dropped_and_database_defaults_to_it() {
        let c = check(startup(&[("user", "alice"), ("application_name", "x")])).unwrap();
        assert_eq!(c.database, "alice");
        assert_eq!(
            c.forwarded,
            vec![
                ("database".to_string(), "alice".to_string()),
                ("application_name".to_string(), "x".to_string())
            ]
        );
        assert!(c.negotiation.is_none());
    }

    #[test]
    fn missing_user_is_refused() {
        assert_eq!(
            check(startup(&[("database", "d")])).unwrap_err().code,
            "28000"
        );
    }

    #[test]
    fn every_spelling_of_a_role_change_is_refused() {
        for params in [
            vec![("role", "postgres")],
            vec![("ROLE", "postgres")],
            vec![("session_authorization", "postgres")],
            vec![("options", "-c role=postgres")],
            vec![("options", "-crole=postgres")],
            vec![("options", "--role=postgres")],
            vec![("options", "-c ROLE=postgres")],
            vec![("options", "--session-authorization=postgres")],
            vec![(
                "options",
                "-c search_path=x -c Session_Authorization=postgres",
            )],
            vec![("replication", "true")],
            vec![("replication", "database")],
        ] {
            let mut p = vec![("user", "u")];
            p.extend(params.iter().copied());
            let err = check(startup(&p)).unwrap_err();
            assert_eq!(err.code, "42501", "{params:?} -> {err:?}");
        }
        assert!(check(startup(&[("user", "u"), ("replication", "off")])).is_ok());
    }

    #[test]
    fn client_encodings_that_hide_ascii_bytes_are_refused() {
        for params in [
            &[("user", "u"), ("client_encoding", "SJIS")][..],
            &[("user", "u"), ("options", "-c client_encoding=big5")][..],
        ] {
            assert_eq!(
                check(startup(params)).unwrap_err().code,
                "22023",
                "{params:?}"
            );
        }
        assert!(check(startup(&[("user", "u"), ("client_encoding", "UTF8")])).is_ok());
    }

    #[test]
    fn a_search_path_chosen_at_startup_replaces_the_configured_one() {
        let policy: crate::config::PolicyConfig =
            toml::from_str("file = \"p.cedar\"\nsearch_path = [\"public\"]").unwrap();
        let chosen = |params: &[(&str, &str)]| {
            let mut p = vec![("user", "u")];
            p.extend(params.iter().copied());
            let c = check(startup(&p)).unwrap();
            assert!(
                c.forwarded.iter().all(|(k, v)| {
                    normalize(k) != "search_path" && !v.to_ascii_lowercase().contains("search")
                }),
                "{:?}",
                c.forwarded
            );
            let r = c.resolver(&policy, "app");
            (
                c.search_path_setting(&policy),
                r.schemas().to_vec(),
                r.chosen_at_startup,
            )
        };
        assert_eq!(
            chosen(&[]),
            ("public".into(), vec!["public".to_owned()], false)
        );
        assert_eq!(
            chosen(&[("search_path", r#"Tenant_A, "$user""#)]),
            (
                r#"Tenant_A, "$user""#.into(),
                vec!["tenant_a".to_owned(), "app".to_owned()],
                true
            )
        );
        assert_eq!(chosen(&[("Search_Path", "x")]).1, ["x"]);
        // options first, then parameters, each the last of its kind: as the server applies them.
        assert_eq!(
            chosen(&[
                ("search_path", "p1"),
                (
                    "options",
                    "-c search_path=o1 -c work_mem=1MB --search-path=o2"
                ),
                ("search_path", "p2"),
            ])
            .0,
            "p2"
        );
        let (value, schemas, _) = chosen(&[("options", r"-c search_path=a,\ b -c work_mem=1MB")]);
        assert_eq!(
            (value.as_str(), schemas),
            ("a, b", vec!["a".into(), "b".into()])
        );
        // What pgiam cannot read as the server would is refused.
        for params in [
            &[("user", "u"), ("search_path", "a b")][..],
            &[("user", "u"), ("search_path", "\"a")][..],
            &[("user", "u"), ("options", "-c search_path=a,")][..],
        ] {
            assert_eq!(
                check(startup(params)).unwrap_err().code,
                "22023",
                "{params:?}"
            );
        }
    }

    #[test]
    fn options_are_rebuilt_from_what_was_checked() {
        let c = check(startup(&[
            ("user", "u"),
            (
                "options",
                "  -c application_name=a\\ b   --statement-timeout=5s -cwork_mem=4MB",
            ),
        ]))
        .unwrap();
        let options = &c.forwarded.iter().find(|(k, _)| k == "options").unwrap().1;
        assert_eq!(
            options,
            "-c application_name=a\\ b -c statement_timeout=5s -c work_mem=4MB"
        );
        assert_eq!(
            parse_options(options).unwrap(),
            vec![
                ("application_name".to_string(), "a b".to_string()),
                ("statement_timeout".to_string(), "5s".to_string()),
                ("work_mem".to_string(), "4MB".to_string())
            ]
        );
    }

    #[test]
    fn unknown_switches_are_refused() {
        for o in [
            "-B 100",
            "-D /tmp",
            "-c",
            "-c novalue",
            "--=x",
            "-o x",
            "-c\\ role=x",
        ] {
            assert_eq!(parse_options(o).unwrap_err().code, "42601", "{o}");
        }
    }

    #[test]
    fn protocol_options_are_negotiated_away() {
        let mut m = startup(&[("user", "u"), ("_pq_.compression", "on")]);
        m.minor = 2;
        let c = check(m).unwrap();
        assert_eq!(
            c.negotiation,
            Some(Negotiation {
                unrecognized: vec!["_pq_.compression".into()]
            })
        );
        assert!(c.forwarded.iter().all(|(k, _)| !k.starts_with("_pq_")));
    }
}
