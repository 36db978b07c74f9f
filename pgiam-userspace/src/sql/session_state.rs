//! Which statements leave state in their backend that outlives their transaction: what a
//! transaction-pooled session must keep its backend for (its next transaction may land on
//! another), read from the parse tree as the rest of the classification is.
//!
//! Only what the statement itself says is seen: code it runs (a function's body, a DO block,
//! a trigger) may leave more, which is why a backend never goes to another principal without
//! its reset, whatever is seen here.

use serde_json::Value;

/// `DECLARE … WITH HOLD` (CURSOR_OPT_HOLD in parsenodes.h).
const CURSOR_OPT_HOLD: i64 = 0x0020;

/// Settings a SET changes for the current transaction only, whatever LOCAL says.
const TRANSACTION_SETTINGS: &[&str] = &[
    "transaction",
    "transaction_isolation",
    "transaction_read_only",
    "transaction_deferrable",
];

/// Functions whose effect lasts the session: advisory locks held until unlocked (the
/// `_xact_` ones end with the transaction), named dblink connections.
const SESSION_FUNCTIONS: &[&str] = &[
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
    "dblink_connect",
    "dblink_connect_u",
];

/// A statement node (`body`: its fields) whose effect outlives its transaction: SET of the
/// session's value (not LOCAL, not a transaction's characteristics), LISTEN, PREPARE, LOAD,
/// DEALLOCATE, DISCARD, DECLARE … WITH HOLD. (Temporary relations are the walker's `temp`.)
/// RESET and SET … TO DEFAULT go back to the value the session logged in with, which a
/// backend the session has not set anything on holds already: drivers run RESET ALL when a
/// connection goes back to their own pool, and that must not keep the backend.
pub(super) fn node_outlives_transaction(node: &str, body: &Value) -> bool {
    match node {
        "VariableSetStmt" => {
            let local = body.get("is_local").and_then(Value::as_bool) == Some(true);
            let name = body.get("name").and_then(Value::as_str).unwrap_or("");
            // VariableSetKind: VAR_SET_DEFAULT 2, VAR_RESET 5, VAR_RESET_ALL 6.
            let to_default = matches!(body.get("kind").and_then(Value::as_i64), Some(2 | 5 | 6));
            !local
                && !to_default
                && !TRANSACTION_SETTINGS
                    .iter()
                    .any(|s| s.eq_ignore_ascii_case(name))
        }
        // DEALLOCATE and DISCARD reach statements and state the session may not have made
        // on this backend (its protocol-level statements follow it from backend to backend).
        "ListenStmt" | "PrepareStmt" | "LoadStmt" | "DeallocateStmt" | "DiscardStmt" => true,
        "DeclareCursorStmt" => {
            body.get("options").and_then(Value::as_i64).unwrap_or(0) & CURSOR_OPT_HOLD != 0
        }
        _ => false,
    }
}

/// A call of `name` (lower-cased; `builtin`: it resolves to pg_catalog's) with `args` whose
/// effect outlives the transaction: a session advisory lock, a dblink connection, a
/// set_config() that is not provably local (its third argument the constant true).
pub(super) fn call_outlives_transaction(name: &str, builtin: bool, args: &[Value]) -> bool {
    if SESSION_FUNCTIONS.contains(&name) {
        return true;
    }
    if name == "set_config" && builtin {
        let local = args.get(2).and_then(bool_constant).unwrap_or(false);
        return !local;
    }
    false
}

/// A boolean constant argument: `true`, or a string the server reads as a boolean.
fn bool_constant(arg: &Value) -> Option<bool> {
    let val = arg.get("node").unwrap_or(arg).get("AConst")?.get("val")?;
    if let Some(b) = val.get("Boolval") {
        // A false constant's field is left out, as prost leaves out defaults.
        return Some(b.get("boolval").and_then(Value::as_bool).unwrap_or(false));
    }
    super::parse_bool(val.get("Sval")?.get("sval")?.as_str()?)
}

#[cfg(test)]
mod tests {
    fn outlives(sql: &str) -> bool {
        let list = crate::sql::classify(sql, true).unwrap_or_else(|e| panic!("{sql}: {e}"));
        list.iter().any(|s| s.session_state)
    }

    #[test]
    fn what_outlives_its_transaction_is_seen() {
        for sql in [
            "SET work_mem = '1MB'",
            "SET SESSION statement_timeout = 5",
            "SET ROLE other",
            "SET SESSION AUTHORIZATION other",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
            "LISTEN ch",
            "PREPARE p AS SELECT 1",
            "LOAD 'auto_explain'",
            "DEALLOCATE ALL",
            "DISCARD PLANS",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            "CREATE TEMP TABLE t (a int)",
            "CREATE TEMPORARY SEQUENCE s",
            "SELECT * INTO TEMP t FROM items",
            "SELECT * FROM pg_temp.t",
            "SELECT pg_advisory_lock(1)",
            "SELECT pg_try_advisory_lock_shared(1, 2)",
            "SELECT set_config('app.x', 'y', false)",
            "SELECT set_config('app.x', 'y', $1)",
            "SELECT pg_catalog.set_config('app.x', 'y', 'off')",
            "BEGIN; SET work_mem = '1MB'; COMMIT",
        ] {
            assert!(outlives(sql), "{sql}");
        }
    }

    #[test]
    fn what_ends_with_its_transaction_is_not() {
        for sql in [
            "SELECT 1",
            "INSERT INTO items VALUES (1)",
            "SET LOCAL work_mem = '1MB'",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SET transaction_read_only = on",
            "SELECT set_config('app.x', 'y', true)",
            "SELECT set_config('app.x', 'y', 't')",
            "SELECT pg_advisory_xact_lock(1)",
            "RESET work_mem",
            "RESET ALL",
            "SET work_mem TO DEFAULT",
            "RESET ROLE",
            "SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;",
            "DECLARE c CURSOR FOR SELECT 1",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET work_mem = '1MB' AS 'SELECT 1'",
            "ALTER ROLE r SET work_mem = '1MB'",
            "BEGIN",
            "COMMIT",
            "SHOW work_mem",
        ] {
            assert!(!outlives(sql), "{sql}");
        }
    }
}
