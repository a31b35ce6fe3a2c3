//! The compile errors `#[rpc_service]` gives for the common mistakes,
//! pinned (`rpc/tests/ui/*.stderr`). Regenerate after an intended change
//! with `TRYBUILD=overwrite cargo test -p netchan-rpc --test macro_errors`.

#[test]
fn common_mistakes_get_clear_compile_errors() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
