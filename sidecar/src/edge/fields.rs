//! Reading a JSON request object field by field, so that every wrong type
//! or value is a 400 naming the field and its limit (serde's derived
//! errors name a line and column, not the field), and every field left
//! unread is refused rather than ignored.

use serde_json::{Map, Value};

use super::error::ApiError;

pub struct Fields {
    /// Where this object is in the request (`""`, `messages[2]`), for errors.
    at: String,
    map: Map<String, Value>,
}

impl Fields {
    pub fn new(at: impl Into<String>, value: Value) -> Result<Self, ApiError> {
        let at = at.into();
        match value {
            Value::Object(map) => Ok(Self { at, map }),
            other => Err(ApiError::field(&name(&at, ""), format!("must be an object, not {}", kind(&other)))),
        }
    }

    /// The path of `key` in the request, for error messages.
    pub fn path(&self, key: &str) -> String {
        name(&self.at, key)
    }

    /// Takes `key`; a JSON `null` counts as absent, as OpenAI's API reads it.
    pub fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key).filter(|v| !v.is_null())
    }

    pub fn string(&mut self, key: &str) -> Result<Option<String>, ApiError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.wrong(key, "a string", &other)),
        }
    }

    pub fn required_string(&mut self, key: &str) -> Result<String, ApiError> {
        self.string(key)?.ok_or_else(|| ApiError::field(&self.path(key), "is required"))
    }

    pub fn bool(&mut self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(other) => Err(self.wrong(key, "true or false", &other)),
        }
    }

    /// An integer in `min..=max`.
    pub fn integer(&mut self, key: &str, min: u64, max: u64) -> Result<Option<u64>, ApiError> {
        let Some(value) = self.take(key) else { return Ok(None) };
        match value.as_u64() {
            Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ if value.is_number() => {
                Err(ApiError::field(&self.path(key), format!("must be an integer from {min} to {max}, not {value}")))
            }
            _ => Err(self.wrong(key, "an integer", &value)),
        }
    }

    /// A number in `min..=max`.
    pub fn number(&mut self, key: &str, min: f64, max: f64) -> Result<Option<f64>, ApiError> {
        let Some(value) = self.take(key) else { return Ok(None) };
        match value.as_f64() {
            Some(x) if (min..=max).contains(&x) => Ok(Some(x)),
            Some(_) => Err(ApiError::field(&self.path(key), format!("must be from {min} to {max}, not {value}"))),
            None => Err(self.wrong(key, "a number", &value)),
        }
    }

    /// A field the mesh does not implement, accepted only with the value
    /// that leaves the output as if it were absent (`n: 1`, `logprobs:
    /// false`); any other value is refused, never ignored.
    pub fn only(&mut self, key: &str, neutral: &[Value], why: &str) -> Result<(), ApiError> {
        match self.take(key) {
            Some(v) if !neutral.contains(&v) => Err(ApiError::field(&self.path(key), why)),
            _ => Ok(()),
        }
    }

    /// Fails on the first field nobody read: it might change the output.
    pub fn finish(self) -> Result<(), ApiError> {
        match self.map.keys().next() {
            Some(key) => Err(ApiError::field(&self.path(key), "is not supported by this server")),
            None => Ok(()),
        }
    }

    fn wrong(&self, key: &str, expected: &str, got: &Value) -> ApiError {
        ApiError::field(&self.path(key), format!("must be {expected}, not {}", kind(got)))
    }
}

fn name(at: &str, key: &str) -> String {
    match (at.is_empty(), key.is_empty()) {
        (true, true) => "body".to_string(),
        (true, false) => key.to_string(),
        (false, true) => at.to_string(),
        (false, false) => format!("{at}.{key}"),
    }
}

/// A JSON value's type, as an error message names it.
pub fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn fields(v: Value) -> Fields {
        Fields::new("mesh", v).unwrap()
    }

    #[test]
    fn wrong_types_and_ranges_name_the_field_and_limit() {
        let mut f = fields(json!({"max_tokens": "ten", "temperature": 3.5, "top_k": -1, "stream": 1}));
        let e = f.integer("max_tokens", 1, 100).unwrap_err();
        assert_eq!(e.message, "mesh.max_tokens: must be an integer, not a string");
        assert_eq!(
            f.number("temperature", 0.0, 2.0).unwrap_err().message,
            "mesh.temperature: must be from 0 to 2, not 3.5"
        );
        assert_eq!(
            f.integer("top_k", 0, 10).unwrap_err().message,
            "mesh.top_k: must be an integer from 0 to 10, not -1"
        );
        assert_eq!(f.bool("stream").unwrap_err().message, "mesh.stream: must be true or false, not a number");
    }

    #[test]
    fn null_is_absent_and_unread_fields_are_refused() {
        let mut f = fields(json!({"seed": null, "n": 1, "tools": []}));
        assert_eq!(f.integer("seed", 0, 9).unwrap(), None);
        f.only("n", &[json!(1)], "only 1 choice is served").unwrap();
        assert_eq!(f.finish().unwrap_err().message, "mesh.tools: is not supported by this server");
        let mut f = fields(json!({"n": 2}));
        assert_eq!(f.only("n", &[json!(1)], "only 1 choice is served").unwrap_err().param.as_deref(), Some("mesh.n"));
    }

    #[test]
    fn a_non_object_is_refused() {
        assert_eq!(Fields::new("", json!([1])).err().unwrap().message, "body: must be an object, not an array");
    }
}
