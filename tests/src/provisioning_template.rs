//! A fleet provisioning template body (the JSON of `AWS::IoT::ProvisioningTemplate`'s
//! `TemplateBody`), applied as RegisterThing applies it: the device's parameters (with the
//! pre-provisioning hook's `parameterOverrides` merged over them) and the parameters' defaults
//! give the thing's name, attributes, thing type and thing groups, and the `DeviceConfiguration`
//! returned to the device. The simulator applies the same body infra/template.yaml deploys
//! (`tests/tests/e2e/aws_interop.rs` reads it from there), so the two cannot drift apart.
//!
//! What it evaluates: literal strings, `{"Ref": "Parameter"}` and `{"Fn::Join": ["sep",
//! [...]]}`. Anything else in the parts it reads is refused when the template is loaded.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// A value in the template: what `Ref` and `Fn::Join` make of parameters and literals.
#[derive(Debug, Clone, PartialEq)]
enum Expr {
    Literal(String),
    Ref(String),
    Join(String, Vec<Expr>),
}

impl Expr {
    fn parse(value: &Value, at: &str) -> Result<Self, String> {
        match value {
            Value::String(s) => Ok(Expr::Literal(s.clone())),
            Value::Object(o) if o.len() == 1 => {
                if let Some(name) = o.get("Ref").and_then(Value::as_str) {
                    return Ok(Expr::Ref(name.to_owned()));
                }
                match o
                    .get("Fn::Join")
                    .and_then(Value::as_array)
                    .map(Vec::as_slice)
                {
                    Some([Value::String(sep), Value::Array(parts)]) => Ok(Expr::Join(
                        sep.clone(),
                        parts
                            .iter()
                            .map(|p| Expr::parse(p, at))
                            .collect::<Result<_, _>>()?,
                    )),
                    _ => Err(format!(
                        "{at}: only strings, Ref and Fn::Join are evaluated"
                    )),
                }
            }
            _ => Err(format!(
                "{at}: only strings, Ref and Fn::Join are evaluated"
            )),
        }
    }

    fn eval(&self, parameters: &BTreeMap<String, String>) -> Result<String, String> {
        match self {
            Expr::Literal(s) => Ok(s.clone()),
            Expr::Ref(name) => parameters
                .get(name)
                .cloned()
                .ok_or_else(|| format!("the template needs parameter {name}")),
            Expr::Join(sep, parts) => Ok(parts
                .iter()
                .map(|p| p.eval(parameters))
                .collect::<Result<Vec<_>, _>>()?
                .join(sep)),
        }
    }
}

/// What RegisterThing makes of a template for one device.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Applied {
    pub thing_name: String,
    pub attributes: BTreeMap<String, String>,
    pub thing_type: Option<String>,
    pub thing_groups: Vec<String>,
    pub device_configuration: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TemplateBody {
    /// Declared parameters and their defaults.
    defaults: BTreeMap<String, Option<String>>,
    thing_name: Expr,
    attributes: BTreeMap<String, Expr>,
    thing_type: Option<Expr>,
    thing_groups: Vec<Expr>,
    device_configuration: BTreeMap<String, Expr>,
}

impl TemplateBody {
    /// The body `Template::new` stood for before templates were read: the thing named
    /// `prefix` + the serial parameter, nothing else.
    pub fn named(prefix: &str, serial_parameter: &str) -> Self {
        Self {
            defaults: BTreeMap::from([(serial_parameter.to_owned(), None)]),
            thing_name: Expr::Join(
                String::new(),
                vec![
                    Expr::Literal(prefix.to_owned()),
                    Expr::Ref(serial_parameter.to_owned()),
                ],
            ),
            attributes: BTreeMap::new(),
            thing_type: None,
            thing_groups: Vec::new(),
            device_configuration: BTreeMap::new(),
        }
    }

    /// Reads a template body; refuses one the simulator could not apply faithfully.
    pub fn parse(json: &str) -> Result<Self, String> {
        let body: Value =
            serde_json::from_str(json).map_err(|e| format!("template body is not JSON: {e}"))?;
        let defaults = body
            .get("Parameters")
            .and_then(Value::as_object)
            .map(|params| {
                params
                    .iter()
                    .map(|(name, p)| {
                        let default = p.get("Default").and_then(Value::as_str);
                        (name.clone(), default.map(str::to_owned))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let things: Vec<&Map<String, Value>> = body
            .get("Resources")
            .and_then(Value::as_object)
            .map(|r| {
                r.values()
                    .filter(|res| {
                        res.get("Type").and_then(Value::as_str) == Some("AWS::IoT::Thing")
                    })
                    .filter_map(|res| res.get("Properties").and_then(Value::as_object))
                    .collect()
            })
            .unwrap_or_default();
        let [thing] = things.as_slice() else {
            return Err("the template must have exactly one AWS::IoT::Thing resource".into());
        };
        let field = |name: &str| thing.get(name).map(|v| Expr::parse(v, name)).transpose();
        let thing_name = field("ThingName")?.ok_or("the thing resource has no ThingName")?;
        let attributes = match thing.get("AttributePayload") {
            Some(Value::Object(a)) => map_of(a, "AttributePayload")?,
            Some(_) => return Err("AttributePayload must be a map".into()),
            None => BTreeMap::new(),
        };
        let thing_groups = match thing.get("ThingGroups") {
            Some(Value::Array(groups)) => groups
                .iter()
                .map(|g| Expr::parse(g, "ThingGroups"))
                .collect::<Result<_, _>>()?,
            Some(_) => return Err("ThingGroups must be a list".into()),
            None => Vec::new(),
        };
        let device_configuration = match body.get("DeviceConfiguration") {
            Some(Value::Object(c)) => map_of(c, "DeviceConfiguration")?,
            Some(_) => return Err("DeviceConfiguration must be a map".into()),
            None => BTreeMap::new(),
        };
        Ok(Self {
            defaults,
            thing_name,
            attributes,
            thing_type: field("ThingTypeName")?,
            thing_groups,
            device_configuration,
        })
    }

    /// Applies the template to a device's parameters (overrides already merged), as
    /// RegisterThing does; a missing parameter is the device's error.
    pub fn apply(&self, given: &BTreeMap<String, String>) -> Result<Applied, String> {
        let mut parameters: BTreeMap<String, String> = self
            .defaults
            .iter()
            .filter_map(|(name, default)| Some((name.clone(), default.clone()?)))
            .collect();
        parameters.extend(given.iter().map(|(k, v)| (k.clone(), v.clone())));
        let eval_all =
            |exprs: &BTreeMap<String, Expr>| -> Result<BTreeMap<String, String>, String> {
                exprs
                    .iter()
                    .map(|(k, e)| Ok((k.clone(), e.eval(&parameters)?)))
                    .collect()
            };
        Ok(Applied {
            thing_name: self.thing_name.eval(&parameters)?,
            attributes: eval_all(&self.attributes)?,
            thing_type: self
                .thing_type
                .as_ref()
                .map(|t| t.eval(&parameters))
                .transpose()?,
            thing_groups: self
                .thing_groups
                .iter()
                .map(|g| g.eval(&parameters))
                .collect::<Result<_, _>>()?,
            device_configuration: eval_all(&self.device_configuration)?
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect(),
        })
    }
}

fn map_of(map: &Map<String, Value>, at: &str) -> Result<BTreeMap<String, Expr>, String> {
    map.iter()
        .map(|(k, v)| Ok((k.clone(), Expr::parse(v, &format!("{at}.{k}"))?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &str = r#"{
      "Parameters": {
        "SerialNumber": {"Type": "String"},
        "Location": {"Type": "String", "Default": "unknown"}
      },
      "DeviceConfiguration": {"Region": "ap-northeast-1", "Site": {"Ref": "Location"}},
      "Resources": {
        "thing": {"Type": "AWS::IoT::Thing", "Properties": {
          "ThingName": {"Fn::Join": ["", ["fleet-", {"Ref": "SerialNumber"}]]},
          "AttributePayload": {"serial": {"Ref": "SerialNumber"}, "location": {"Ref": "Location"}},
          "ThingTypeName": "soracom-device",
          "ThingGroups": ["fleet", {"Fn::Join": ["-", ["site", {"Ref": "Location"}]]}]
        }},
        "certificate": {"Type": "AWS::IoT::Certificate", "Properties": {}}
      }
    }"#;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    #[test]
    fn a_template_gives_the_thing_and_the_device_configuration() {
        let body = TemplateBody::parse(BODY).unwrap();
        let applied = body
            .apply(&params(&[
                ("SerialNumber", "SN-1"),
                ("Location", "tokyo-1"),
            ]))
            .unwrap();
        assert_eq!(applied.thing_name, "fleet-SN-1");
        assert_eq!(
            applied.attributes,
            params(&[("serial", "SN-1"), ("location", "tokyo-1")])
        );
        assert_eq!(applied.thing_type.as_deref(), Some("soracom-device"));
        assert_eq!(applied.thing_groups, ["fleet", "site-tokyo-1"]);
        assert_eq!(applied.device_configuration["Site"], "tokyo-1");
        // A default stands in for a parameter the device did not send.
        let applied = body.apply(&params(&[("SerialNumber", "SN-2")])).unwrap();
        assert_eq!(applied.attributes["location"], "unknown");
        // A parameter without a default must be sent.
        assert!(body
            .apply(&params(&[]))
            .unwrap_err()
            .contains("SerialNumber"));
    }

    #[test]
    fn what_cannot_be_applied_faithfully_is_refused_at_load() {
        for bad in [
            "not json",
            r#"{"Resources": {}}"#,
            r#"{"Resources": {"t": {"Type": "AWS::IoT::Thing", "Properties": {}}}}"#,
            r#"{"Resources": {"t": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": {"Fn::Sub": "x"}}}}}"#,
            r#"{"Resources": {"t": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": "a", "ThingGroups": "g"}}}}"#,
        ] {
            assert!(TemplateBody::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_named_body_is_the_prefix_and_the_serial() {
        let applied = TemplateBody::named("fleet-", "SerialNumber")
            .apply(&params(&[("SerialNumber", "SN-9")]))
            .unwrap();
        assert_eq!(applied.thing_name, "fleet-SN-9");
        assert!(applied.attributes.is_empty() && applied.device_configuration.is_empty());
    }
}
