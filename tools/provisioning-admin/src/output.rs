//! Rows as an operator reads them (aligned columns), as a spreadsheet does (CSV) and as a
//! script does (JSON: an array of objects, absent values `null`).

use std::io::{self, Write};

use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

/// Named columns of JSON values, written in one of the [`Format`]s.
pub struct Rows {
    columns: &'static [&'static str],
    rows: Vec<Vec<Value>>,
}

impl Rows {
    pub fn new(columns: &'static [&'static str]) -> Self {
        Self {
            columns,
            rows: Vec::new(),
        }
    }

    pub fn push(&mut self, row: Vec<Value>) {
        debug_assert_eq!(row.len(), self.columns.len());
        self.rows.push(row);
    }

    /// The first row alone, for `show`: a column per line, or one JSON object.
    pub fn write_one(&self, format: Format, out: &mut dyn Write) -> io::Result<()> {
        let Some(row) = self.rows.first() else {
            return Ok(());
        };
        match format {
            Format::Json => {
                let object: Map<String, Value> = self
                    .columns
                    .iter()
                    .zip(row)
                    .map(|(c, v)| ((*c).to_owned(), v.clone()))
                    .collect();
                serde_json::to_writer_pretty(&mut *out, &Value::Object(object))?;
                writeln!(out)
            }
            Format::Csv => self.write(format, out),
            Format::Table => {
                let width = self.columns.iter().map(|c| c.len()).max().unwrap_or(0);
                for (column, value) in self.columns.iter().zip(row) {
                    writeln!(out, "{column:<width$}  {}", text(value))?;
                }
                Ok(())
            }
        }
    }

    pub fn write(&self, format: Format, out: &mut dyn Write) -> io::Result<()> {
        match format {
            Format::Json => {
                let objects: Vec<Value> = self
                    .rows
                    .iter()
                    .map(|row| {
                        let map: Map<String, Value> = self
                            .columns
                            .iter()
                            .zip(row)
                            .map(|(c, v)| ((*c).to_owned(), v.clone()))
                            .collect();
                        Value::Object(map)
                    })
                    .collect();
                serde_json::to_writer_pretty(&mut *out, &objects)?;
                writeln!(out)
            }
            Format::Csv => {
                let mut writer = csv::Writer::from_writer(out);
                writer.write_record(self.columns)?;
                for row in &self.rows {
                    writer.write_record(row.iter().map(text))?;
                }
                writer.flush()
            }
            Format::Table => {
                let cells: Vec<Vec<String>> = self
                    .rows
                    .iter()
                    .map(|row| row.iter().map(text).collect())
                    .collect();
                let widths: Vec<usize> = (0..self.columns.len())
                    .map(|i| {
                        cells
                            .iter()
                            .map(|row| row[i].chars().count())
                            .chain([self.columns[i].len()])
                            .max()
                            .unwrap_or(0)
                    })
                    .collect();
                let line = |out: &mut dyn Write, row: &[String]| {
                    let padded: Vec<String> = row
                        .iter()
                        .zip(&widths)
                        .map(|(cell, width)| format!("{cell:<width$}"))
                        .collect();
                    writeln!(out, "{}", padded.join("  ").trim_end())
                };
                let header: Vec<String> = self.columns.iter().map(|c| (*c).to_owned()).collect();
                line(out, &header)?;
                for row in &cells {
                    line(out, row)?;
                }
                Ok(())
            }
        }
    }
}

/// A cell as text: strings as they are, absent as empty.
fn text(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Rows {
        let mut rows = Rows::new(&["imsi", "status", "valid_until"]);
        rows.push(vec![
            json!("440103000000001"),
            json!("allowed"),
            Value::Null,
        ]);
        rows.push(vec![
            json!("4401030000002"),
            json!("blocked, really"),
            json!(5),
        ]);
        rows
    }

    fn written(format: Format) -> String {
        let mut out = Vec::new();
        sample().write(format, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn each_format_keeps_every_cell() {
        assert_eq!(
            written(Format::Table),
            "imsi             status           valid_until\n\
             440103000000001  allowed\n\
             4401030000002    blocked, really  5\n"
        );
        // CSV quotes what needs it; JSON keeps types and nulls.
        assert!(written(Format::Csv).contains("\"blocked, really\",5"));
        let json: Value = serde_json::from_str(&written(Format::Json)).unwrap();
        assert_eq!(json[0]["valid_until"], Value::Null);
        assert_eq!(json[1]["valid_until"], json!(5));
    }
}
