//! Whether the engines that may decide a bundle decide it alike: the interpreter (which runs
//! the policy tests), the bytecode VM (which serves the decision rule) and, when loaded, the
//! real OPA engine (which the bundle claims to be portable to). `policy test` asks this for
//! every fixture and every generated variant of one (`variants`).
//!
//! Two outcomes agree when both are the same document, both undefined, or both errors (an
//! error is a deny wherever the bundle runs; its wording is the engine's own).

use serde_json::Value;

use super::engine::{one_line, CompiledBundle, DataPath};

/// What one engine made of one query.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A document.
    Document(Value),
    /// No document.
    Undefined,
    /// An evaluation error, as the engine worded it.
    Error(String),
}

impl Outcome {
    fn of<E: std::fmt::Display>(result: Result<Option<Value>, E>) -> Outcome {
        match result {
            Ok(Some(value)) => Outcome::Document(value),
            Ok(None) => Outcome::Undefined,
            Err(e) => Outcome::Error(one_line(&e.to_string())),
        }
    }

    /// Whether two engines decided alike (errors agree whatever their wording).
    pub fn agrees(&self, other: &Outcome) -> bool {
        match (self, other) {
            (Outcome::Error(_), Outcome::Error(_)) => true,
            _ => self == other,
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Document(value) => write!(f, "{value}"),
            Outcome::Undefined => f.write_str("undefined"),
            Outcome::Error(e) => write!(f, "error ({e})"),
        }
    }
}

/// An engine other than the interpreter that may evaluate the bundle.
pub trait SecondEngine {
    /// Its name in reports (`vm`, `opa`).
    fn name(&self) -> &'static str;
    /// Whether it evaluates `query` (the VM serves only the decision rule).
    fn evaluates(&self, query: &DataPath) -> bool;
    /// Its outcome for `query` with `input` (`None`: no input).
    fn outcome(&self, query: &DataPath, input: Option<&Value>) -> Outcome;
}

/// The bytecode VM's build of the decision rule.
pub struct Vm<'a>(pub &'a CompiledBundle);

impl SecondEngine for Vm<'_> {
    fn name(&self) -> &'static str {
        "vm"
    }

    fn evaluates(&self, query: &DataPath) -> bool {
        self.0.is_fast_path(query)
    }

    fn outcome(&self, query: &DataPath, input: Option<&Value>) -> Outcome {
        Outcome::of(
            self.0
                .evaluate(query, input.map(|i| regorus::Value::from(i.clone()))),
        )
    }
}

#[cfg(feature = "opa")]
impl SecondEngine for super::opa::OpaBundle {
    fn name(&self) -> &'static str {
        "opa"
    }

    fn evaluates(&self, _: &DataPath) -> bool {
        true
    }

    fn outcome(&self, query: &DataPath, input: Option<&Value>) -> Outcome {
        Outcome::of(self.evaluate(query, input.map(Value::to_string).as_deref()))
    }
}

/// The interpreter's outcome for `query` with `input`.
pub fn interpret(engine: &mut regorus::Engine, query: &DataPath, input: Option<&Value>) -> Outcome {
    engine.set_input(input.map_or(regorus::Value::Undefined, |i| {
        regorus::Value::from(i.clone())
    }));
    match engine.eval_rule(query.as_query().to_string()) {
        Ok(regorus::Value::Undefined) => Outcome::Undefined,
        Ok(value) => Outcome::of(serde_json::to_value(&value).map(Some)),
        Err(e) => Outcome::Error(one_line(&e.to_string())),
    }
}

/// How the second engines that evaluate `query` disagree with the interpreter's `reference`
/// outcome on `input`, one line each (empty: all agree).
pub fn disagreements(
    reference: &Outcome,
    others: &[&dyn SecondEngine],
    query: &DataPath,
    input: Option<&Value>,
) -> Vec<String> {
    others
        .iter()
        .filter(|e| e.evaluates(query))
        .filter_map(|engine| {
            let outcome = engine.outcome(query, input);
            (!outcome.agrees(reference))
                .then(|| format!("{}={outcome}, interpreter={reference}", engine.name()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn errors_agree_whatever_their_wording_documents_only_when_equal() {
        let doc = |v: Value| Outcome::Document(v);
        assert!(Outcome::Error("a".into()).agrees(&Outcome::Error("b".into())));
        assert!(doc(json!({"allow": true})).agrees(&doc(json!({"allow": true}))));
        assert!(!doc(json!({"allow": true})).agrees(&doc(json!({"allow": false}))));
        assert!(!Outcome::Undefined.agrees(&Outcome::Error("x".into())));
        assert!(!Outcome::Undefined.agrees(&doc(json!(false))));
    }
}
