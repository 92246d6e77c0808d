//! Every schema under `schemas/` compiles as JSON Schema and accepts its own examples.

use std::path::Path;

#[test]
fn schemas_compile_and_accept_their_examples() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let schema: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let validator = jsonschema::validator_for(&schema)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let examples = schema["examples"]
            .as_array()
            .unwrap_or_else(|| panic!("{} has examples", path.display()));
        assert!(!examples.is_empty());
        for ex in examples {
            let errors: Vec<String> = validator.iter_errors(ex).map(|e| e.to_string()).collect();
            assert!(errors.is_empty(), "{}: {errors:?}", path.display());
        }
        checked += 1;
    }
    assert_eq!(checked, 4, "event (v1, v2), image and dlq schemas");
}
